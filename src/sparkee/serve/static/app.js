// The page: POST /v1/chat/completions with stream=true, read the server-sent events, show the
// transcript as it comes, play each audio chunk as it arrives (Web Audio) and keep them all as
// one WAV in the <audio> element. Nothing is loaded from elsewhere.
"use strict";
const $ = (id) => document.getElementById(id);
let config = null;
let audioCtx = null;
let playAt = 0;

function fmt(x, unit) {
  return x === null || x === undefined ? "–" : unit === "s" ? (x * 1000).toFixed(0) + " ms" : String(x);
}

async function loadConfig() {
  const r = await fetch("/v1/sparkee/config");
  config = await r.json();
  $("model").textContent = `${config.model}, ${config.num_layers} layers` + (config.audio ? "" : ", no vocoder");
  for (const p of config.suggested_policies) {
    const o = document.createElement("option");
    o.textContent = p.label;
    o.value = JSON.stringify({ speech_policy: p.speech_policy, verify: p.verify });
    $("policy").appendChild(o);
  }
}

function b64bytes(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function pcmOf(wav) {  // the data chunk of a 16-bit mono WAV
  const v = new DataView(wav.buffer);
  let p = 12;
  while (p + 8 <= wav.length) {
    const id = String.fromCharCode(wav[p], wav[p + 1], wav[p + 2], wav[p + 3]);
    const n = v.getUint32(p + 4, true);
    if (id === "data") return wav.slice(p + 8, p + 8 + n);
    p += 8 + n;
  }
  return new Uint8Array(0);
}

function wavOf(pcm, rate) {
  const out = new Uint8Array(44 + pcm.length);
  const v = new DataView(out.buffer);
  const w = (o, s) => { for (let i = 0; i < 4; i++) out[o + i] = s.charCodeAt(i); };
  w(0, "RIFF"); v.setUint32(4, 36 + pcm.length, true); w(8, "WAVE"); w(12, "fmt ");
  v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true);
  v.setUint16(34, 16, true); w(36, "data"); v.setUint32(40, pcm.length, true);
  out.set(pcm, 44);
  return out;
}

function playChunk(pcm) {  // schedule a chunk right after the previous one
  try {
    audioCtx = audioCtx || new AudioContext({ sampleRate: 16000 });
    const n = pcm.length >> 1;
    const buf = audioCtx.createBuffer(1, n, 16000);
    const ch = buf.getChannelData(0);
    const v = new DataView(pcm.buffer, pcm.byteOffset, pcm.length);
    for (let i = 0; i < n; i++) ch[i] = v.getInt16(2 * i, true) / 32768;
    const src = audioCtx.createBufferSource();
    src.buffer = buf;
    src.connect(audioCtx.destination);
    playAt = Math.max(playAt, audioCtx.currentTime + 0.05);
    src.start(playAt);
    playAt += buf.duration;
  } catch (e) {
    console.log("live playback unavailable:", e);
  }
}

async function ask(ev) {
  ev.preventDefault();
  $("go").disabled = true;
  $("answer").textContent = "";
  $("answer").className = "";
  for (const id of ["ttft", "ttfa", "total", "tokens", "exit", "acc", "speedup"]) $(id).textContent = "–";
  document.body.dataset.state = "asking";
  const t0 = performance.now();
  let first = null, firstAudio = null;
  const pcms = [];
  const body = {
    messages: [{ role: "user", content: $("question").value }],
    stream: true,
    stream_options: { include_usage: true },
    sparkee: JSON.parse($("policy").value || "{}"),
  };
  if (config.audio) {
    body.modalities = ["text", "audio"];
    body.audio = { voice: "default", format: "wav" };
  }
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!r.ok) throw new Error((await r.json()).error.message);
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        if (msg.usage) $("tokens").textContent = msg.usage.completion_tokens;
        const c = msg.choices && msg.choices[0];
        if (!c) continue;
        const d = c.delta || {};
        const text = d.content || (d.audio && d.audio.transcript);
        if (text) {
          if (first === null) { first = performance.now() - t0; $("ttft").textContent = first.toFixed(0) + " ms"; }
          $("answer").textContent += text;
        }
        if (d.audio && d.audio.data) {
          const pcm = pcmOf(b64bytes(d.audio.data));
          if (firstAudio === null) { firstAudio = performance.now() - t0; $("ttfa").textContent = firstAudio.toFixed(0) + " ms"; }
          pcms.push(pcm);
          playChunk(pcm);
        }
        if (msg.sparkee) {
          const s = msg.sparkee;
          $("exit").textContent = s.avg_exit_layer_speech === null ? "–" : s.avg_exit_layer_speech.toFixed(2) + " / " + s.num_layers;
          $("acc").textContent = s.speech_acceptance === null ? "–" : (100 * s.speech_acceptance).toFixed(1) + " %";
          $("speedup").textContent = s.predicted_speedup === null ? "–" : s.predicted_speedup.toFixed(2) + "×";
        }
      }
    }
    $("total").textContent = (performance.now() - t0).toFixed(0) + " ms";
    if (pcms.length) {
      const all = new Uint8Array(pcms.reduce((n, p) => n + p.length, 0));
      let o = 0;
      for (const p of pcms) { all.set(p, o); o += p.length; }
      $("audio").src = URL.createObjectURL(new Blob([wavOf(all, 16000)], { type: "audio/wav" }));
    }
    document.body.dataset.state = "done";
  } catch (e) {
    $("answer").textContent = "error: " + e.message;
    $("answer").className = "err";
    document.body.dataset.state = "error";
  } finally {
    $("go").disabled = false;
  }
}

$("ask").addEventListener("submit", ask);
loadConfig();
