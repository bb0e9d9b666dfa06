// The demo page: call / hang up, mic level, live transcript, and the latency
// panel fed by the server's ledgers (data channel) and this browser's own
// mouth-to-ear measurement (meter-worklet.js).  `window.sub300` exposes the
// page's state to tests and curious colleagues.
//
// At each reply onset the page sends the server an "ear_report" on the data
// channel (media/webrtc/ear_report.py): its mouth-to-ear and its receiver
// statistics from getStats() over the reply's first 200 ms (mean jitter-buffer
// delay and target, round-trip time, packets lost, concealed samples); the
// server records them in the turn's ledger beside its own estimate and sends
// back "turn_heard".  The incoming audio's jitter-buffer target is set low
// (RTCRtpReceiver.jitterBufferTarget, ?jbt=MS, default 0; ?jbt=default keeps
// the browser's own): a voice agent's reply is a stream, not a conversation
// both ways at once, and the server paces it evenly.
//
// Authentication (web/auth.py): when /webrtc/config says it is required, the
// page needs a call token in its URL, /?token=… or /#token=…: a backend holding
// an API key with the "calls" scope mints one (POST /v1/call-tokens) and opens
// or redirects its user's browser to /#token=<token> (or /?token=<token>).  The page sends it as
// "Authorization: Bearer" on /webrtc/config (short-lived TURN credentials for
// that key) and on /offer.  Without one the page says so and offers no call.
import { Latency } from "/static/latency.js";

const $ = (id) => document.getElementById(id);
// ?aec=0: raw microphone (tests with a fake mic; Chrome's echo canceller eats synthetic speech)
const RAW_MIC = new URLSearchParams(location.search).get("aec") === "0";
const GATHER_TIMEOUT_MS = 3000;
const JBT = new URLSearchParams(location.search).get("jbt") ?? "0";
// a call token (see above) from ?token= or #token= (a fragment never reaches the server's access log), or null
const TOKEN = new URLSearchParams(location.search).get("token")
  ?? new URLSearchParams(location.hash.slice(1)).get("token");
const AUTH_HEADERS = TOKEN ? { Authorization: `Bearer ${TOKEN}` } : {};
if (TOKEN) {   // out of the address bar, history and bookmarks (it still works for this page's life)
  const url = new URL(location.href);
  url.searchParams.delete("token");
  const fragment = new URLSearchParams(location.hash.slice(1));
  fragment.delete("token");
  history.replaceState(null, "", url.pathname + url.search + (fragment.toString() ? `#${fragment}` : ""));
}

const state = (window.sub300 = {
  phase: "idle", callId: null, connectedAt: null, error: null,
  finals: [], partials: [], agentText: [], turns: [], onsets: [], hangup: null,
  micPeakDb: -Infinity, stats: {}, heard: [], reports: [], jitterBufferTarget: null,
});
let config = { iceServers: [], budget_ms: 300 };
let pc = null, dc = null, ctx = null, mic = null, statsTimer = null;
let answeringTurn = null;   // the turn whose final transcript came last: the next onset answers it
let lastInbound = null;     // the previous getStats() inbound-rtp audio record (the footer's figures)
// an ear report's jitter-buffer figures cover the reply's first frames: getStats() at the onset and this
// long after it (NetEq adapts its delay; the mean since the previous poll would mostly be the silence before)
const REPORT_SPAN_MS = 200;

const latency = new Latency({
  waterfall: $("waterfall"), legend: $("legend"),
  cards: { v2vLast: $("v2v-last"), v2vPct: $("v2v-pct"), m2eLast: $("m2e-last"), m2ePct: $("m2e-pct"),
           goodput: $("goodput"), turnCount: $("turn-count") },
});

// ------------------------------------------------------------ page chrome
function setPhase(phase, label = phase) {
  state.phase = phase;
  const pill = $("status");
  pill.textContent = label.replace(/_/g, " ");
  pill.className = `pill ${phase}`;
  const button = $("call");
  const inCall = phase !== "idle" && phase !== "error";
  button.textContent = inCall ? "Hang up" : "Call";
  button.classList.toggle("hangup", inCall);
}

function bubble(cls, who, text) {
  const box = $("transcript");
  box.querySelector(".hint")?.remove();
  const el = document.createElement("div");
  el.className = `msg ${cls}`;
  if (who) el.innerHTML = `<span class="who">${who}</span>`;
  el.append(document.createTextNode(text));
  box.append(el);
  box.scrollTop = box.scrollHeight;
  return el;
}

function setBubbleText(el, who, text) {
  el.innerHTML = who ? `<span class="who">${who}</span>` : "";
  el.append(document.createTextNode(text));
}

const partialBubbles = new Map();   // turn → element
const agentBubbles = new Map();     // turn → element

// ------------------------------------------------------------ events from the server
function onEvent(ev) {
  switch (ev.kind) {
    case "hello":
      state.callId = ev.call_id;
      $("engines").textContent = Object.entries(ev.engines || {}).map(([k, v]) => `${k}: ${v}`).join(" · ");
      break;
    case "state":
      if (state.phase !== "idle") setPhase(ev.state);
      break;
    case "transcript": {
      let el = partialBubbles.get(ev.turn);
      if (ev.final) {
        state.finals.push({ turn: ev.turn, text: ev.text });
        answeringTurn = ev.turn;
        if (el) { setBubbleText(el, "you", ev.text); el.classList.replace("partial", "final"); }
        else el = bubble("caller final", "you", ev.text);
        el.dataset.turn = ev.turn;
        partialBubbles.delete(ev.turn);
      } else {
        state.partials.push({ turn: ev.turn, text: ev.text });
        if (el) setBubbleText(el, "you (hearing…)", ev.text);
        else partialBubbles.set(ev.turn, bubble("caller partial", "you (hearing…)", ev.text));
      }
      break;
    }
    case "agent_text": {
      state.agentText.push({ turn: ev.turn, text: ev.text });
      const el = agentBubbles.get(ev.turn);
      if (el) el.append(document.createTextNode(" " + ev.text));
      else agentBubbles.set(ev.turn, bubble("agent", "agent", ev.text));
      break;
    }
    case "turn":
      state.turns.push(ev);
      latency.addLedger(ev.turn, ev.ledger);
      break;
    case "turn_heard":
      state.heard.push(ev);
      latency.addLedger(ev.turn, ev.ledger);
      break;
    case "turn_discarded":
      partialBubbles.get(ev.turn)?.remove();
      partialBubbles.delete(ev.turn);
      break;
    case "tool_called":
      bubble("system", "", `tool ${ev.name}(${ev.arguments}): ${ev.outcome} in ${Math.round(ev.duration_ms)} ms`);
      break;
    case "turn_failed":
      bubble("system", "", `turn ${ev.turn} failed: ${ev.error}`);
      break;
    case "barge_in":
      // the agent paused for the caller's voice; it then stopped for good or went on
      if (ev.outcome === "interrupted") bubble("system", "", `interrupted: the agent fell silent in ${ev.reaction_ms} ms`);
      else if (ev.outcome === "resumed") bubble("system", "", "not an interruption: the agent went on");
      break;
    case "hangup":
      state.hangup = ev.reason;
      bubble("system", "", `the agent hung up (${ev.reason})`);
      break;
  }
}

function onMeter({ data }) {
  if (data.type === "level") {
    state.micPeakDb = Math.max(state.micPeakDb, data.mic);
    const width = Math.max(0, Math.min(100, ((data.mic + 60) / 60) * 100));
    $("mic-level").style.width = `${width}%`;
  } else if (data.type === "onset") {
    const m2e = (data.at - data.speechEnd) * 1000;
    const onset = { at: data.at, speechEnd: data.speechEnd, m2e, turn: answeringTurn };
    state.onsets.push(onset);
    if (onset.turn != null) {
      latency.addMouthToEar(onset.turn, m2e);
      sendEarReport(onset.turn, m2e);
    }
  }
}

/** Mean of a cumulative getStats() ratio over the interval since ``before``: Δsum / Δcount (in ms), or null. */
function meanSince(now, before, sum, count) {
  const dCount = now[count] - ((before && before[count]) || 0);
  const dSum = now[sum] - ((before && before[sum]) || 0);
  return dCount > 0 && dSum >= 0 ? (1000 * dSum) / dCount : null;
}

async function sendEarReport(turn, m2e) {
  const channel = dc, peer = pc;
  if (!peer || !channel || channel.readyState !== "open") return;
  const report = { type: "ear_report", turn, mouth_to_ear_ms: m2e };
  try {
    let base = null;
    (await peer.getStats()).forEach((r) => { if (r.type === "inbound-rtp" && r.kind === "audio") base = r; });
    await new Promise((resolve) => setTimeout(resolve, REPORT_SPAN_MS));
    if (pc !== peer) return;   // hung up meanwhile
    const stats = await peer.getStats();
    stats.forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "audio") {
        report.jitter_buffer_ms = meanSince(r, base, "jitterBufferDelay", "jitterBufferEmittedCount");
        report.jitter_buffer_target_ms = meanSince(r, base, "jitterBufferTargetDelay", "jitterBufferEmittedCount");
        report.packets_lost = Math.max(0, r.packetsLost || 0);
        report.concealed_samples = r.concealedSamples || 0;
      } else if (r.type === "candidate-pair" && r.nominated && r.currentRoundTripTime != null) {
        report.rtt_ms = 1000 * r.currentRoundTripTime;
      }
    });
  } catch (err) {
    console.warn("getStats for the ear report failed", err);   // the report still carries mouth-to-ear
  }
  state.reports.push(report);
  if (channel.readyState === "open") channel.send(JSON.stringify(report));
}

function setJitterBufferTarget(receiver) {
  if (JBT === "default") return;
  const target = Number(JBT);
  if ("jitterBufferTarget" in receiver) receiver.jitterBufferTarget = target;          // ms (Chrome 114+)
  else if ("playoutDelayHint" in receiver) receiver.playoutDelayHint = target / 1000;  // s (older Chrome)
  state.jitterBufferTarget = target;
}

// ------------------------------------------------------------ the call
async function call() {
  setPhase("connecting");
  state.error = null;
  latency.reset();
  try {
    const audio = RAW_MIC ? { echoCancellation: false, noiseSuppression: false, autoGainControl: false } : true;
    mic = await navigator.mediaDevices.getUserMedia({ audio });
    ctx = new AudioContext();
    await ctx.audioWorklet.addModule("/static/meter-worklet.js");
    const meter = new AudioWorkletNode(ctx, "sub300-meter", { numberOfInputs: 2, numberOfOutputs: 1 });
    meter.port.onmessage = onMeter;
    const mute = ctx.createGain();
    mute.gain.value = 0;                     // keeps the meter pulled by the graph, silently
    meter.connect(mute).connect(ctx.destination);
    ctx.createMediaStreamSource(mic).connect(meter, 0, 0);
    await ctx.resume();

    pc = new RTCPeerConnection({ iceServers: config.iceServers });
    for (const track of mic.getAudioTracks()) pc.addTrack(track, mic);
    pc.ontrack = (e) => {
      setJitterBufferTarget(e.receiver);
      const stream = e.streams[0] || new MediaStream([e.track]);
      $("remote").srcObject = stream;        // Chrome feeds WebAudio from a remote stream only while an element plays it
      ctx.createMediaStreamSource(stream).connect(meter, 0, 1);
    };
    pc.onconnectionstatechange = () => {
      const s = pc && pc.connectionState;
      if (s === "connected" && state.phase === "connecting") {
        state.connectedAt = performance.now();
        setPhase("listening");
      } else if (s === "failed" || s === "closed") {
        hangUp(s === "failed" ? "connection failed" : null);
      }
    };
    dc = pc.createDataChannel("events");
    dc.onmessage = (m) => onEvent(JSON.parse(m.data));
    dc.onclose = () => { if (state.phase !== "idle") hangUp(null); };

    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    const response = await fetch("/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...AUTH_HEADERS },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
    });
    const body = await response.json().catch(() => ({}));
    if (response.status === 401 || response.status === 403) {
      throw new Error(`not allowed to call: ${body.error || response.status} (ask for a fresh link with a call token)`);
    }
    if (!response.ok) throw new Error(body.error || `signalling failed (HTTP ${response.status})`);
    await pc.setRemoteDescription(body);
    state.callId = body.call_id;
    lastInbound = null;
    statsTimer = setInterval(pollStats, 1000);
  } catch (err) {
    hangUp(String(err.message || err));
  }
}

function gathered(peer) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (peer.iceGatheringState === "complete") resolve(); };
    peer.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, GATHER_TIMEOUT_MS);   // a slow STUN server must not hold the call
  });
}

function hangUp(error) {
  if (dc && dc.readyState === "open") {
    try { dc.send(JSON.stringify({ type: "hangup" })); } catch (_) { /* closing anyway */ }
  }
  clearInterval(statsTimer);
  const peer = pc;
  pc = null; dc = null;
  if (peer) { pollStats(peer).finally(() => peer.close()); }
  mic?.getTracks().forEach((t) => t.stop());
  mic = null;
  ctx?.close();
  ctx = null;
  if (error) {
    state.error = error;
    bubble("system", "", `call ended: ${error}`);
    setPhase("error", "error");
  } else {
    setPhase("idle");
  }
}

async function pollStats(peer = pc) {
  if (!peer) return;
  const report = await peer.getStats();
  const s = {};
  report.forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "audio") {
      s.inboundEnergy = r.totalAudioEnergy;
      s.packetsReceived = r.packetsReceived;
      s.jitterBufferMs = meanSince(r, lastInbound, "jitterBufferDelay", "jitterBufferEmittedCount");
      lastInbound = r;
    } else if (r.type === "media-source" && r.kind === "audio") {
      s.micEnergy = r.totalAudioEnergy;
    } else if (r.type === "candidate-pair" && r.nominated && r.currentRoundTripTime != null) {
      s.rttMs = 1000 * r.currentRoundTripTime;
    }
  });
  state.stats = s;
  const parts = [];
  if (s.rttMs != null) parts.push(`rtt ${s.rttMs.toFixed(0)} ms`);
  if (s.jitterBufferMs != null) parts.push(`jitter buffer ${s.jitterBufferMs.toFixed(0)} ms`);
  if (s.packetsReceived != null) parts.push(`${s.packetsReceived} packets in`);
  $("netstats").textContent = parts.join(" · ");
}

// ------------------------------------------------------------ start-up
async function init() {
  try {
    config = await (await fetch("/webrtc/config", { headers: AUTH_HEADERS })).json();
  } catch (_) { /* defaults: host candidates only */ }
  state.auth = config.auth || { required: false, authenticated: false };
  latency.setBudget(config.budget_ms);
  document.querySelectorAll(".budget-ms").forEach((el) => (el.textContent = config.budget_ms));
  $("engines").textContent = Object.entries(config.engines || {}).map(([k, v]) => `${k}: ${v}`).join(" · ");
  const button = $("call");
  button.onclick = () => (state.phase === "idle" || state.phase === "error" ? call() : hangUp(null));
  if (state.auth.required && !state.auth.authenticated) {
    // no usable token: say so, and offer no call that could only fail
    const box = $("transcript");
    box.innerHTML = "";
    const p = document.createElement("p");
    p.className = "hint auth-needed";
    p.id = "auth-needed";
    p.textContent = TOKEN
      ? "This link's call token was not accepted (expired or revoked). Ask the site that sent you here for a new link."
      : "This server requires a call token. Open this page through your application, which mints one " +
        "(POST /v1/call-tokens with its API key) and sends you to /?token=…";
    box.append(p);
    setPhase("error", "token needed");
    state.ready = true;
    return;
  }
  button.disabled = false;
  window.addEventListener("pagehide", () => pc && hangUp(null));
  state.ready = true;
}

init();
