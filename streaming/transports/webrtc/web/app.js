// The avatar page: microphone in, talking face out, over one WebRTC connection (POST /offer).
// Plain script, no build step. Live numbers go to the panel and, as JSON, to #rtc-stats (read by tests).
"use strict";

const EMOTIONS = ["neutral", "happy", "sad", "angry", "surprised", "disgusted", "fear", "contempt"];
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

let pc = null;
let channel = null;
let statsTimer = null;
let nextId = 1;
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

function fillEmotions(list) {
  const select = $("emotion");
  select.innerHTML = "";
  for (const name of list) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    select.appendChild(option);
  }
  select.value = "neutral";
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function sendControl(message) {
  if (!channel || channel.readyState !== "open") return;
  channel.send(JSON.stringify({ id: nextId++, ...message }));
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
    setStatus("control applied");
  } else if (data.type === "error") {
    live.errors += 1;
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
    sendControl({ emotion: $("emotion").value, intensity: Number($("intensity").value) });
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

async function init() {
  fillEmotions(EMOTIONS);
  $("token").value = params.get("token") || "";
  $("token").onchange = showPreview;
  showPreview();
  $("start").onclick = () => start().catch((err) => { setStatus(`error: ${err}`, true); stop(); });
  $("stop").onclick = stop;
  $("interrupt").onclick = () => sendControl({ interrupt: true });
  $("emotion").onchange = () => sendControl({ emotion: $("emotion").value });
  $("intensity").oninput = () => { $("intensity-value").textContent = $("intensity").value; };
  $("intensity").onchange = () => sendControl({ intensity: Number($("intensity").value) });
  try {
    const info = await (await fetch("/health")).json();
    describe(info);
    if (Array.isArray(info.emotions) && info.emotions.length) fillEmotions(info.emotions);
  } catch {
    setStatus("server not reachable", true);
  }
  publish();
  if (params.get("autostart") === "1") $("start").click();
}

init();
