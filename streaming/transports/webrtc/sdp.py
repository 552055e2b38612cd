"""SDP offers checked before a session slot is taken, and trickle-ICE fragments (RFC 8840) for WHIP/WHEP PATCH.

Who sends what (the role decides which offers are valid):

- ``page``: the browser page and ``engine client`` over ``/offer``: they receive the avatar's video (and audio) and
  may send a microphone; the offer needs a video m-line.
- ``whip`` (RFC 9725): a publisher (OBS, GStreamer, ``whip-client``) sends its microphone (and maybe a camera);
  the offer needs an audio m-line the client sends; the server answers every m-line ``recvonly``.
- ``whep`` (draft-ietf-wish-whep): a player receives the avatar; the offer needs a video m-line the client
  receives; the server answers ``sendonly``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aiortc import RTCIceCandidate, RTCRtpSender
from aiortc.sdp import SessionDescription, candidate_from_sdp

Role = Literal["page", "whip", "whep"]
SENDS = ("sendonly", "sendrecv")  # directions in which the client sends
RECEIVES = ("recvonly", "sendrecv")  # directions in which the client receives


class OfferError(ValueError):
    """The client's SDP offer cannot be answered (malformed, or lacking what its role needs)."""


@dataclass(frozen=True)
class MediaLine:
    kind: str  # audio | video | application
    direction: str  # the client's direction: sendrecv | sendonly | recvonly | inactive
    codecs: tuple[str, ...]  # upper-case codec names offered (VP8, H264, OPUS, ...)


@dataclass(frozen=True)
class Offer:
    sdp: str
    media: tuple[MediaLine, ...]  # the m-lines in use (rejected ones, port 0 outside a BUNDLE group, left out)
    ice_ufrag: str
    bundle: tuple[str, ...]  # mids of the first BUNDLE group (the transport every bundled m-line shares)

    def lines(self, kind: str) -> list[MediaLine]:
        return [m for m in self.media if m.kind == kind]


def _supported(kind: str) -> set[str]:
    return {c.mimeType.split("/", 1)[1].upper() for c in RTCRtpSender.getCapabilities(kind).codecs}


def parse_offer(sdp: str) -> Offer:
    """The offer's media, or OfferError naming what is malformed."""
    if not sdp.lstrip().startswith("v=0"):
        raise OfferError("the body is not an SDP offer (it must start with v=0)")
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc raises a mix of ValueError / IndexError / KeyError / AssertionError on junk
        raise OfferError(f"malformed SDP offer: {exc or type(exc).__name__}") from None
    bundle = next((tuple(map(str, g.items)) for g in description.group if g.semantic == "BUNDLE"), ())
    media: list[MediaLine] = []
    ufrag = ""
    for m in description.media:
        if m.port == 0 and str(m.rtp.muxId) not in bundle:
            continue  # a rejected m-line (bundle-only m-lines have port 0 and ride on the group's transport)
        if m.ice is None or not m.ice.usernameFragment or not m.ice.password:
            raise OfferError(f"the {m.kind} m-line has no a=ice-ufrag / a=ice-pwd")
        if m.dtls is None or not m.dtls.fingerprints:
            raise OfferError(f"the {m.kind} m-line has no a=fingerprint (DTLS is required)")
        ufrag = ufrag or m.ice.usernameFragment
        codecs = tuple(c.mimeType.split("/", 1)[1].upper() for c in m.rtp.codecs)
        media.append(MediaLine(m.kind, m.direction or "sendrecv", codecs))
    if not media:
        raise OfferError("the SDP offer has no usable m-line")
    for kind in ("audio", "video", "application"):
        if sum(m.kind == kind for m in media) > 1:
            raise OfferError(f"the SDP offer has more than one {kind} m-line; one of each kind is supported")
    return Offer(sdp, tuple(media), ufrag, bundle)


def check_offer(offer: Offer, role: Role, video_codecs: tuple[str, ...]) -> None:
    """Raise OfferError when ``offer`` does not fit ``role`` (see the module doc) or shares no codec with us."""
    audio = offer.lines("audio")
    video = offer.lines("video")
    if role == "whip":
        if not audio or audio[0].direction not in SENDS:
            got = f"its audio is {audio[0].direction}" if audio else "it has no audio m-line"
            raise OfferError(
                f"a WHIP offer publishes a voice to the avatar: it needs audio sendonly, but {got} "
                "(to watch the avatar, POST the offer to /whep)"
            )
    elif not video:
        raise OfferError("the SDP offer has no video m-line: the avatar is sent as video")
    elif role == "whep" and video[0].direction not in RECEIVES:
        raise OfferError(
            f"a WHEP offer receives the avatar: its video must be recvonly, got {video[0].direction} "
            "(to publish a voice, POST the offer to /whip)"
        )
    if audio and audio[0].direction != "inactive" and "OPUS" not in audio[0].codecs:
        raise OfferError(f"the audio m-line offers {list(audio[0].codecs)}; the server speaks Opus")
    if video and video[0].direction != "inactive":
        # video we send must be one of ours; video a publisher sends us only has to be decodable
        wanted = set(video_codecs) if video[0].direction in RECEIVES and role != "whip" else _supported("video")
        if not wanted & set(video[0].codecs):
            raise OfferError(
                f"the video m-line offers {sorted(set(video[0].codecs) - {'RTX'})}; the server supports "
                f"{sorted(wanted - {'RTX'})}"
            )


@dataclass(frozen=True)
class TrickleFragment:
    """An ``application/trickle-ice-sdpfrag`` body: ICE credentials, candidates with their m-line, the end flag."""

    ufrag: str | None
    pwd: str | None
    candidates: tuple[RTCIceCandidate, ...]
    end: bool


def parse_trickle(text: str, bundle: tuple[str, ...]) -> TrickleFragment:
    """RFC 8840 fragment -> candidates tagged with the mid of the transport they belong to (the BUNDLE tag)."""
    ufrag = pwd = None
    mid: str | None = None
    index = -1
    candidates: list[RTCIceCandidate] = []
    end = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("m="):
            index += 1
            mid = None
        elif line.startswith("a=mid:"):
            mid = line[6:].strip()
        elif line.startswith("a=ice-ufrag:"):
            ufrag = line[12:].strip()
        elif line.startswith("a=ice-pwd:"):
            pwd = line[10:].strip()
        elif line.startswith("a=end-of-candidates"):
            end = True
        elif line.startswith("a=candidate:"):
            try:
                candidate = candidate_from_sdp(line[12:])
            except Exception:  # aiortc asserts on short lines and raises ValueError on bad numbers
                raise OfferError(f"bad ICE candidate line {line[:120]!r}") from None
            # a bundled m-line's candidates belong to the group's one transport, which aiortc keys by the tag
            target = bundle[0] if bundle and (mid is None or mid in bundle) else mid
            if target is None and index < 0:
                raise OfferError("an ICE candidate before any m= line or a=mid (RFC 8840 fragments name the m-line)")
            candidate.sdpMid = target
            candidate.sdpMLineIndex = None if target is not None else max(index, 0)
            candidates.append(candidate)
        elif len(line) < 2 or line[1] != "=":
            raise OfferError(f"not an SDP fragment line: {line[:120]!r}")
    return TrickleFragment(ufrag, pwd, tuple(candidates), end)
