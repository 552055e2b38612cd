// The avatar page: microphone in, talking face out, over one WebRTC connection (POST /offer).
// Plain script, no build step. Live numbers go to the panel and, as JSON, to #rtc-stats (read by tests).
"use strict";

const EMOTIONS = ["neutral", "happy", "sad", "angry", "surprised", "disgusted", "fear", "contempt"];
// the order controls are shown in (any other key of the schema follows)
const ORDER = ["emotion", "intensity", "emotion_b", "mix", "mouth_emotion", "eyes_emotion", "pure_emotion",
  "emotion_source", "lip_scale", "loudness_lips", "head_pose", "blink", "blink_rate", "gaze", "smoothing", "ramp_s"];
const LABELS = { emotion_b: "second emotion", mix: "mix (second emotion)", mouth_emotion: "mouth emotion",
  eyes_emotion: "eyes emotion", pure_emotion: "pure emotion", emotion_source: "emotion source",
  lip_scale: "lip scale", loudness_lips: "lips follow loudness", head_pose: "head pose", blink_rate: "blinks / s",
  ramp_s: "ramp (s)" };
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

let pc = null;
let channel = null;
let statsTimer = null;
let nextId = 1;
let schema = {};  // control -> {kind, choices | min/max, default, honoured, does}
let stored = [];  // emotions with a stored example for this server's avatar
let state = {};  // the session's state as last acknowledged
const pending = new Map();  // message id -> the keys it changed (a refusal names them)
const live = { framesDecoded: 0, freezeCount: 0, fps: 0, serverFps: null, latencyMs: null, acks: 0, errors: 0 };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").style.color = isError ? "#e55" : "";
}

function showBanner(text, isError = false) {
  const banner = $("banner");
  banner.hidden = !text;
  banner.textContent = text || "";
  banner.classList.toggle("error", isError);
}

function describe(info) {
  if (!info) return;
  const parts = [info.mode && `${info.mode} mode`, info.avatar && `avatar ${info.avatar}`, info.fps && `${info.fps} fps`];
  $("server-info").textContent = parts.filter(Boolean).join(" · ");
  if (info.banner) showBanner(info.banner);
  else if (info.untrained) showBanner("untrained weights — the video is noise; import LivePortrait/Ditto weights");
}

function options(select, list, none = false) {
  select.innerHTML = "";
  for (const name of (none ? [""] : []).concat(list)) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name === "" ? "(none)" : stored.includes(name) ? `${name} (example)` : name;
    select.appendChild(option);
  }
}

function fillEmotions(list) {
  for (const [key, spec] of Object.entries(schema)) {
    if (spec.kind === "emotion" || spec.kind === "emotion?") {
      const select = $(key);
      const keep = select.value;
      options(select, list, spec.kind === "emotion?");
      select.value = keep || (spec.kind === "emotion" ? "neutral" : "");
    }
  }
  options($("upload-name"), list);
}

function widgetValue(key) {
  const spec = schema[key];
  const el = $(key);
  if (spec.kind === "bool") return el.checked;
  if (spec.kind === "float") return Number(el.value);
  if (spec.kind === "emotion?") return el.value === "" ? null : el.value;
  return el.value;
}

function showValue(key, value) {
  const spec = schema[key];
  const el = $(key);
  if (!el) return;
  if (spec.kind === "bool") el.checked = Boolean(value);
  else if (spec.kind === "emotion?") el.value = value === null || value === undefined ? "" : value;
  else el.value = String(value);
  const out = $(`${key}-value`);
  if (out) out.textContent = Number(value).toFixed(2);
}

function buildControls(info) {
  // one widget per control the schema has: ranges and choices are the server's, what the session's motion
  // generator does not honour stays visible but disabled, with what it would take
  schema = info.control_schema || {  // an older server: the two controls every server had
    emotion: { kind: "emotion", choices: EMOTIONS, default: "neutral" },
    intensity: { kind: "float", min: 0, max: 1.5, default: 1 },
  };
  stored = Array.isArray(info.stored_emotions) ? info.stored_emotions : [];
  const box = $("controls");
  box.innerHTML = "";
  const keys = ORDER.filter((k) => k in schema).concat(Object.keys(schema).filter((k) => !ORDER.includes(k)));
  for (const key of keys) {
    const spec = schema[key];
    const row = document.createElement("div");
    row.className = "control";
    const label = document.createElement("label");
    label.htmlFor = key;
    label.textContent = LABELS[key] || key;
    let el;
    if (spec.kind === "bool") {
      el = document.createElement("input");
      el.type = "checkbox";
    } else if (spec.kind === "float") {
      el = document.createElement("input");
      el.type = "range";
      el.min = spec.min;
      el.max = spec.max;
      el.step = (spec.max - spec.min) / 100;
      const out = document.createElement("output");
      out.id = `${key}-value`;
      label.appendChild(out);
      el.oninput = () => { out.textContent = Number(el.value).toFixed(2); };
    } else {
      el = document.createElement("select");
      options(el, spec.choices || [], spec.kind === "emotion?");
    }
    el.id = key;
    el.disabled = spec.honoured === false;
    row.title = spec.honoured === false ? `not honoured by this server's ${info.motion || ""} motion` : spec.does || "";
    if (spec.honoured === false) row.classList.add("disabled");
    el.onchange = () => sendControl({ [key]: widgetValue(key) });
    const why = document.createElement("div");
    why.className = "why";
    why.id = `${key}-why`;
    row.append(label, el, why);
    box.appendChild(row);
    showValue(key, spec.default);
  }
  if ("intensity" in schema && state.intensity === undefined) showValue("intensity", 0.5);
}

function applyState(next) {
  state = { ...state, ...next };
  for (const [key, value] of Object.entries(state)) if (key in schema) showValue(key, value);
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function sendControl(message) {
  if (!channel || channel.readyState !== "open") return;
  const id = nextId++;
  pending.set(id, Object.keys(message));
  channel.send(JSON.stringify({ id, ...message }));
}

function onChannelMessage(event) {
  let data;
  try {
    data = JSON.parse(event.data);
  } catch {
    return;
  }
  if (data.type === "stats") {
    live.serverFps = data.fps;
    live.videoFps = data.video_fps;
    live.videoState = data.video_state;
    live.latencyMs = data.latency_ms;
    $("server-fps").textContent = `${data.video_fps.toFixed(1)} new / ${data.fps.toFixed(1)} sent`;
    $("latency").textContent = `${Math.round(data.latency_ms)} ms`;
    showVideoState(data.video_state, data.video_fps);
  } else if (data.type === "ack") {
    live.acks += 1;
    for (const key of pending.get(data.id) || []) if ($(`${key}-why`)) $(`${key}-why`).textContent = "";
    pending.delete(data.id);
    applyState(data.state || {});
    setStatus("control applied");
  } else if (data.type === "error") {
    live.errors += 1;
    live.lastError = data.message;
    // the widget goes back to the session's state and shows why the server refused
    for (const key of pending.get(data.id) || []) {
      if ($(`${key}-why`)) $(`${key}-why`).textContent = data.message;
      if (key in state) showValue(key, state[key]);
    }
    pending.delete(data.id);
    setStatus(`control rejected: ${data.message}`, true);
  }
  publish();
}

function showVideoState(state, fps) {
  // the server repeats its last picture when rendering falls behind; say so instead of looking normal
  const notice = $("video-state");
  notice.hidden = state === "ok" || !state;
  notice.textContent =
    state === "stalled"
      ? "video stalled: the server is not rendering new pictures (audio continues)"
      : `video degraded: ${fps.toFixed(1)} new pictures/s, the server is slower than real time`;
  notice.classList.toggle("error", state === "stalled");
}

function publish() {
  $("rtc-stats").textContent = JSON.stringify(live);
  window.avatarStats = { ...live };
}

async function pollStats() {
  if (!pc) return;
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") {
      live.framesDecoded = s.framesDecoded || 0;
      live.freezeCount = s.freezeCount || 0;
      live.fps = s.framesPerSecond || 0;
      live.codec = report.get(s.codecId)?.mimeType;
    }
  });
  $("fps").textContent = live.fps.toFixed(1);
  $("frames").textContent = String(live.framesDecoded);
  $("freezes").textContent = String(live.freezeCount);
  publish();
}

function waitForIce(peer) {
  // the server does not trickle candidates: send the offer once gathering is complete (or after 2 s)
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (peer.iceGatheringState === "complete") {
        peer.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    peer.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 2000);
  });
}

async function start() {
  $("start").disabled = true;
  setStatus("asking for the microphone…");
  let mic = null;
  try {
    mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (err) {
    setStatus(`no microphone (${err.name}): receiving only`, true);
  }
  pc = new RTCPeerConnection();
  if (mic) {
    for (const track of mic.getAudioTracks()) pc.addTransceiver(track, { direction: "sendrecv", streams: [mic] });
  } else {
    pc.addTransceiver("audio", { direction: "recvonly" });
  }
  pc.addTransceiver("video", { direction: "recvonly" });
  channel = pc.createDataChannel("control");
  channel.onmessage = onChannelMessage;
  channel.onopen = () => {
    $("interrupt").disabled = false;
    // the first message: the page's emotion and intensity; its acknowledgement brings the session's whole state
    const first = {};
    for (const key of ["emotion", "intensity"]) if (key in schema && schema[key].honoured !== false) first[key] = widgetValue(key);
    sendControl(first);
  };

  const remote = new MediaStream();
  pc.ontrack = (event) => {
    remote.addTrack(event.track);  // audio and video in one stream: the browser keeps them in sync
    $("avatar").srcObject = remote;
  };
  pc.onconnectionstatechange = () => {
    setStatus(`connection ${pc.connectionState}`, pc.connectionState === "failed");
    if (pc.connectionState === "failed") stop();
  };

  await pc.setLocalDescription(await pc.createOffer());
  await waitForIce(pc);
  setStatus("connecting…");
  let response;
  try {
    response = await fetch("/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
    });
  } catch (err) {
    setStatus(`cannot reach the server: ${err}`, true);
    stop();
    return;
  }
  if (!response.ok) {
    const detail = await response.text();
    const retry = response.headers.get("Retry-After");
    const why = response.status === 401 ? "wrong or missing token" : detail;
    setStatus(`server refused (${response.status}): ${why}${retry ? ` — retry in ${retry} s` : ""}`, true);
    stop();
    return;
  }
  const answer = await response.json();
  describe(answer);
  await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
  $("stop").disabled = false;
  statsTimer = setInterval(pollStats, 1000);
}

// the avatar at rest stands in the video box until the stream plays (and again after Stop)
function showPreview() {
  const token = $("token").value.trim();
  $("avatar").poster = "/avatar.png" + (token ? `?token=${encodeURIComponent(token)}` : "");
}

function stop() {
  if (statsTimer) clearInterval(statsTimer);
  statsTimer = null;
  if (pc) {
    pc.getSenders().forEach((s) => s.track && s.track.stop());
    pc.close();
  }
  pc = null;
  channel = null;
  $("avatar").srcObject = null;
  $("start").disabled = false;
  $("stop").disabled = true;
  $("interrupt").disabled = true;
}

async function uploadEmotion(event) {
  event.preventDefault();
  const form = new FormData($("emotion-form"));
  if (!$("upload-neutral").files.length) form.delete("neutral");
  $("upload").disabled = true;
  $("upload-status").textContent = "extracting the expression…";
  try {
    const response = await fetch("/emotions", { method: "POST", headers: authHeaders(), body: form });
    const reply = await response.json().catch(() => ({ message: `HTTP ${response.status}` }));
    $("upload-status").textContent = response.ok ? reply.message : `refused: ${reply.message}`;
    $("upload-status").style.color = response.ok ? "" : "#e55";
    if (response.ok) await refreshHealth();
  } catch (err) {
    $("upload-status").textContent = `upload failed: ${err}`;
  } finally {
    $("upload").disabled = false;
  }
}

async function refreshHealth() {
  const info = await (await fetch("/health")).json();
  describe(info);
  if (!Object.keys(schema).length) buildControls(info);
  stored = Array.isArray(info.stored_emotions) ? info.stored_emotions : stored;
  fillEmotions(Array.isArray(info.emotions) && info.emotions.length ? info.emotions : EMOTIONS);
  applyState(state);
  return info;
}

async function init() {
  $("token").value = params.get("token") || "";
  $("token").onchange = showPreview;
  showPreview();
  $("start").onclick = () => start().catch((err) => { setStatus(`error: ${err}`, true); stop(); });
  $("stop").onclick = stop;
  $("interrupt").onclick = () => sendControl({ interrupt: true });
  $("emotion-form").onsubmit = uploadEmotion;
  try {
    await refreshHealth();
  } catch {
    setStatus("server not reachable", true);
  }
  publish();
  if (params.get("autostart") === "1") $("start").click();
}

init();
