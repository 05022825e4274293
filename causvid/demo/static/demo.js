// causvid live demo: one WebSocket per tab; frames arrive as JPEG/PNG images chunk by chunk and are played on a
// canvas at the model's frame rate after a small jitter buffer. The protocol is described in docs/demo.md.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("screen");
const ctx2d = canvas.getContext("2d");

// Everything the page knows, readable from the console (and by the browser test).
const demo = window.demo = {
  info: null, session: null, stream: null, state: "connecting",  // connecting | idle | starting | streaming
  received: 0, played: 0, shownIndex: -1, stalls: 0, ttffMs: null, firstChunkMs: null,
  genFps: null, playFps: null, chunkMs: null, cacheBytes: null, switches: [], messages: [],
};

let ws = null;
let buffer = [];          // [{index, bitmap|null}] in frame order
let chunkMeta = null;     // the chunk whose frames are arriving: {stream, next}
let clock0 = 0, played0 = 0, mode = "buffering", tStart = 0, playTimes = [], timer = null, ackTimer = null;
let jitterFrames = 2;

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = "status " + (kind || "");
  demo.messages.push({kind: kind || "info", text});
}

function fmtBytes(n) {
  if (n == null) return "-";
  return n < 1 << 20 ? (n / 1024).toFixed(1) + " KiB" : (n / (1 << 20)).toFixed(1) + " MiB";
}

function updateButtons() {
  const streaming = demo.state === "streaming" || demo.state === "starting";
  $("start").disabled = demo.state === "connecting";
  $("switch").disabled = !streaming;
  $("stop").disabled = !streaming;
  $("download").disabled = demo.played === 0;
}

function updateFigures() {
  $("ttff").textContent = demo.ttffMs == null ? "-" :
    `${demo.ttffMs.toFixed(0)} ms (first chunk ready after ${demo.firstChunkMs.toFixed(0)} ms)`;
  $("genfps").textContent = demo.genFps == null ? "-" :
    `${demo.genFps.toFixed(1)} (model rate ${demo.info.fps}, ${(demo.genFps / demo.info.fps).toFixed(1)}x real time)`;
  $("playfps").textContent = demo.playFps == null ? "-" : demo.playFps.toFixed(1);
  $("latency").textContent = demo.chunkMs == null ? "-" : `${demo.chunkMs.toFixed(0)} ms per chunk`;
  $("buffer").textContent = `${buffer.length} / ${demo.played} / ${demo.stalls}`;
  $("cache").textContent = fmtBytes(demo.cacheBytes);
  updateButtons();
}

function settingsFromForm() {
  const num = (id) => { const v = $(id).value.trim(); return v === "" ? null : Number(v); };
  return {prompt: $("prompt").value, seed: num("seed"), steps: num("steps"), window: num("window"),
          sink: num("sink"), recache: $("recache").checked};
}

function send(obj) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
}

function resetPlayback() {
  for (const item of buffer) if (item.bitmap) item.bitmap.close();
  buffer = [];
  chunkMeta = null;
  demo.received = 0; demo.played = 0; demo.shownIndex = -1; demo.stalls = 0; demo.ttffMs = null;
  demo.firstChunkMs = null; demo.genFps = null; demo.playFps = null; demo.chunkMs = null; demo.switches = [];
  mode = "buffering"; playTimes = [];
}

function start() {
  const s = settingsFromForm();
  resetPlayback();
  $("history").innerHTML = "";
  tStart = performance.now();
  demo.state = "starting";
  setStatus("starting...");
  send({type: "start", ...s});
  updateFigures();
}

function switchPrompt() {
  send({type: "prompt", prompt: $("prompt").value, recache: $("recache").checked});
}

function stop() {
  send({type: "stop"});
  demo.state = "idle";
  demo.stream = null;
  for (const item of buffer) if (item.bitmap) item.bitmap.close();
  buffer = [];  // what was not played is dropped: the download holds exactly what was played
  setStatus(`stopped after ${demo.played} frames`);
  updateFigures();
}

function download() {
  const a = document.createElement("a");
  a.href = `/api/video?session=${encodeURIComponent(demo.session)}&frames=${demo.played}`;
  a.download = "causvid-demo.mp4";
  document.body.appendChild(a);
  a.click();
  a.remove();
}

function addHistory(text) {
  const li = document.createElement("li");
  li.textContent = text;
  $("history").appendChild(li);
}

function onMessage(msg) {
  switch (msg.type) {
    case "hello": {
      demo.info = msg;
      demo.session = msg.session;
      demo.state = "idle";
      canvas.width = msg.width; canvas.height = msg.height;
      jitterFrames = Math.max(2, Math.ceil(0.25 * msg.fps));
      const d = msg.defaults, L = msg.limits;
      $("steps").value = d.steps; $("steps").max = msg.max_steps;
      $("window").value = d.window; $("window").max = L.max_window;
      $("sink").value = d.sink; $("sink").max = L.max_sink;
      $("model").textContent = `${msg.model} · ${msg.width}x${msg.height} @ ${msg.fps} fps · ` +
        `${msg.chunk_frames} frames per chunk · up to ${L.max_streams} streams`;
      setStatus("ready: type a prompt and press start");
      break;
    }
    case "started":
      demo.stream = msg.stream;
      demo.state = "streaming";
      addHistory(`frame 0: ${msg.settings.prompt}`);
      setStatus(`streaming (seed ${msg.settings.seed}, steps ${msg.steps.join(", ")}, window ${msg.settings.window}, ` +
                `sink ${msg.settings.sink})`);
      break;
    case "chunk":
      if (msg.stream !== demo.stream) { chunkMeta = {stream: msg.stream, next: 0, skip: true}; break; }
      chunkMeta = {stream: msg.stream, next: msg.first_frame, skip: false};
      demo.firstChunkMs = msg.first_chunk_ms; demo.genFps = msg.gen_fps; demo.chunkMs = msg.compute_ms;
      demo.cacheBytes = msg.kv_cache_bytes;
      for (const w of msg.switches) {
        demo.switches.push(w);
        addHistory(`frame ${w.frame} (chunk ${w.chunk}): ${w.prompt}${w.recache ? " [re-cached]" : ""}`);
        setStatus(`from frame ${w.frame} on: "${w.prompt.slice(0, 80)}"${w.recache ? " (cache re-computed)" : ""}`);
      }
      break;
    case "queued":
      setStatus(`prompt switch queued: the next chunk follows "${msg.prompt.slice(0, 80)}"` +
                (msg.recache ? " (re-cache)" : ""));
      break;
    case "stopped":
      if (msg.stream === demo.stream) {
        demo.state = "idle";
        demo.stream = null;
        if (msg.reason !== "stopped") setStatus(`the stream ended (${msg.reason}) after ${msg.frames} frames`);
      }
      break;
    case "busy":
      demo.state = "idle";
      setStatus(msg.message, "busy");
      break;
    case "error":
      if (demo.state === "starting") demo.state = "idle";
      setStatus(msg.message, "error");
      break;
  }
  updateFigures();
}

function onFrame(blob) {
  if (!chunkMeta || chunkMeta.skip) return;  // frames of a stream this tab no longer plays
  const item = {index: chunkMeta.next++, bitmap: null};
  demo.received++;
  buffer.push(item);
  createImageBitmap(blob, {colorSpaceConversion: "none", premultiplyAlpha: "none"}).then((b) => {
    if (buffer.includes(item)) item.bitmap = b; else b.close();
  });
}

// Playback: a clock at the model's frame rate. (Re)starts once `jitterFrames` frames are decoded; a frame not there
// when due is a stall: the clock stops until the buffer holds `jitterFrames` frames again. Timers, not
// requestAnimationFrame, so that a tab in the background keeps its clock.
function tick() {
  const now = performance.now();
  const fps = demo.info ? demo.info.fps : 8;
  let ready = 0;
  while (ready < buffer.length && buffer[ready].bitmap) ready++;
  if (mode === "buffering") {
    if (ready >= jitterFrames || (ready > 0 && demo.state !== "streaming")) {
      mode = "playing"; clock0 = now; played0 = demo.played;
    } else return;
  }
  const due = played0 + 1 + Math.floor((now - clock0) * fps / 1000);
  let last = null;
  while (demo.played < due && buffer.length && buffer[0].bitmap) {
    if (last) last.bitmap.close();
    last = buffer.shift();
    demo.played++;
    playTimes.push(now);
  }
  if (last) {
    ctx2d.drawImage(last.bitmap, 0, 0);
    last.bitmap.close();
    demo.shownIndex = last.index;
    if (demo.ttffMs == null) demo.ttffMs = now - tStart;
  }
  if (demo.played < due && !(buffer.length && buffer[0].bitmap)) {
    mode = "buffering";
    if (demo.state === "streaming" && demo.played > 0) demo.stalls++;
  }
  while (playTimes.length && playTimes[0] < now - 2000) playTimes.shift();
  if (playTimes.length > 1) demo.playFps = (playTimes.length - 1) * 1000 / Math.max(1, now - playTimes[0]);
  if (last) updateFigures();
}

function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${proto}://${location.host}/ws`);
  ws.binaryType = "blob";
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") onMessage(JSON.parse(ev.data)); else onFrame(ev.data);
  };
  ws.onclose = () => {
    demo.state = "connecting";
    setStatus("disconnected from the server: reload the page", "error");
    updateButtons();
  };
}

$("start").onclick = start;
$("switch").onclick = switchPrompt;
$("stop").onclick = stop;
$("download").onclick = download;
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    if (demo.state === "streaming") switchPrompt(); else start();
  }
});
timer = setInterval(tick, 10);
ackTimer = setInterval(() => { if (demo.stream != null) send({type: "played", frames: demo.played}); }, 200);
connect();
