"""The landing page: a live view of the last minutes at full sample resolution, drawn on <canvas>.

Self-contained (no CDN, no build step); it polls /api/v1/samples once a second and /api/v1/diagnosis
every third second, or every window/60 seconds for longer windows (the findings panel at the top).
"""
from __future__ import annotations

import html

from exporter import __version__

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>gpu-telemetry-exporter</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; background: #fafafa; }
 header { display: flex; gap: 16px; align-items: baseline; flex-wrap: wrap; }
 h1 { font-size: 18px; margin: 0; } h2 { font-size: 14px; margin: 4px 0; }
 section { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
 canvas { width: 100%; height: 170px; display: block; }
 .legend span { margin-right: 12px; } .stat { font-weight: 600; }
 .bad { color: #c62828; } button.on { font-weight: 700; }
 .notice { background: #fff8e1; border-color: #ffb300; font-weight: 600; }
 #findings ol { margin: 4px 0; padding-left: 22px; } #findings li { margin: 6px 0; }
 .sev { display: inline-block; min-width: 60px; padding: 0 6px; border-radius: 3px; color: #fff;
        font-size: 12px; text-align: center; margin-right: 6px; }
 .sev-critical { background: #b71c1c; } .sev-warning { background: #e65100; } .sev-info { background: #546e7a; }
 .sev-ok { background: #2e7d32; } .evidence { color: #333; } .remedy { color: #555; font-style: italic; }
 .note { color: #546e7a; } #simulated { background: #e3f2fd; border-color: #1565c0; }
 canvas.clocks { height: 22px; margin-top: 4px; } .clockstat { font-size: 12px; }
 .mig { margin-top: 6px; } .mig div { font-size: 12px; margin: 3px 0; }
 .bar { display: inline-block; width: 240px; height: 10px; background: #eee; vertical-align: middle;
        margin-right: 8px; } .bar i { display: block; height: 100%; background: #6a1b9a; }
</style></head>
<body>
<header>
 <h1>gpu-telemetry-exporter __VERSION__</h1>
 <a href="__TELEMETRY__">__TELEMETRY__</a> <a href="/healthz">/healthz</a>
 <a href="/api/v1/diagnosis?window=5m">/api/v1/diagnosis</a>
 <span id="windows">window:</span>
 <span id="status">loading...</span>
</header>
<section id="simulated" hidden></section>
<section id="notices" class="notice" hidden></section>
<section id="findings"><h2>Diagnosis: why the real-time factor may jitter</h2><ol></ol></section>
<p>Every sample (one per sampler tick), not one per Prometheus scrape. Dashed lines: 40 % on GPU
utilisation (starved at or below it) and 90 % on PCIe (saturated above it). Red in a GPU's clocks strip:
clocks held down by heat or power at that tick.</p>
<section id="host"><h2>Host CPU</h2><canvas id="host-canvas"></canvas></section>
<div id="gpus"></div>
<script>
"use strict";
const HISTORY_S = __HISTORY__;
const CHOICES = [60, 300, 900, 3600].filter(w => w < HISTORY_S);
if (HISTORY_S > 0) CHOICES.push(HISTORY_S);  // never more than the history kept
let windowSeconds = Math.min(60, HISTORY_S);
const COLORS = {utilization: "#1565c0", memory_used_ratio: "#6a1b9a", pcie_rx_utilization: "#ef6c00",
                pcie_tx_utilization: "#2e7d32", host: "#37474f"};
const LABELS = {utilization: "GPU utilisation", memory_used_ratio: "memory used",
                pcie_rx_utilization: "PCIe rx % of link", pcie_tx_utilization: "PCIe tx % of link"};
const GPU_LINES = [{at: 0.4, label: "40 % starved (utilisation)", color: COLORS.utilization},
                   {at: 0.9, label: "90 % saturated (PCIe)", color: COLORS.pcie_rx_utilization}];

function span(s) { return s % 60 === 0 && s >= 120 ? `${s / 60} min` : `${s} s`; }

function notice(lines) {
  const n = document.getElementById("notices");
  n.hidden = !lines.length; n.textContent = lines.join(" \u00b7 ");
}

function draw(canvas, t, series, lines) {
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const ctx = canvas.getContext("2d"); ctx.scale(dpr, dpr); ctx.clearRect(0, 0, w, h);
  const left = 35, bottom = 16, t1 = t.length ? t[t.length - 1] : 0, t0 = t1 - windowSeconds;
  const x = v => (v - t0) / windowSeconds * (w - left - 5) + left;
  const y = v => h - bottom - Math.min(v, 1.05) * (h - bottom - 10);
  ctx.strokeStyle = "#ddd"; ctx.fillStyle = "#666"; ctx.font = "10px sans-serif";
  for (const g of [0, 0.5, 1]) { ctx.beginPath(); ctx.moveTo(left, y(g)); ctx.lineTo(w, y(g)); ctx.stroke();
                                 ctx.fillText(Math.round(g * 100) + "%", 2, y(g) + 3); }
  // time axis: seconds before the newest sample
  const step = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900].find(v => windowSeconds / v <= 6) || 1800;
  const ticks = [];
  for (let k = Math.floor(windowSeconds / step); k >= 0; k--) {
    const label = k === 0 ? "now" : "\u2212" + span(k * step), px = x(t1 - k * step);
    ctx.beginPath(); ctx.moveTo(px, h - bottom); ctx.lineTo(px, h - bottom + 3); ctx.stroke();
    ctx.fillText(label, Math.min(Math.max(px - ctx.measureText(label).width / 2, left), w - 30), h - 3);
    ticks.push(label);
  }
  canvas.dataset.ticks = ticks.join(",");
  ctx.setLineDash([5, 4]);
  for (const l of lines) {
    ctx.strokeStyle = l.color; ctx.fillStyle = l.color; ctx.beginPath(); ctx.moveTo(left, y(l.at));
    ctx.lineTo(w, y(l.at)); ctx.stroke(); ctx.fillText(l.label, w - ctx.measureText(l.label).width - 6, y(l.at) - 3);
  }
  canvas.dataset.lines = lines.map(l => l.label).join(",");
  ctx.setLineDash([]);
  for (const s of series) {
    ctx.strokeStyle = s.color; ctx.lineWidth = 1.2; ctx.beginPath(); let pen = false;
    s.values.forEach((v, i) => { if (v === null) { pen = false; return; }
      if (pen) ctx.lineTo(x(t[i]), y(v)); else { ctx.moveTo(x(t[i]), y(v)); pen = true; } });
    ctx.stroke();
  }
}

// What the page says is simulated (the exporter's --fake-gpus / --fake-scenario), never passed off as measured.
function showSimulated(sim) {
  const el = document.getElementById("simulated"), parts = [];
  if (sim && sim.gpus) parts.push("Simulated GPUs (--fake-gpus, --fake-gpus-from): every GPU value below comes " +
                                  "from the exporter's simulator (made up, or replayed from a recorded nvidia-smi " +
                                  "dump), not read from a device");
  if (sim && sim.host_cpu) parts.push("the host CPU is simulated too (the scenario drives it 91\u201399 % busy; " +
                                      "not this machine's /proc/stat)");
  el.hidden = !parts.length; el.textContent = parts.join("; ");
  el.dataset.simulated = [sim && sim.gpus ? "gpus" : "", sim && sim.host_cpu ? "host_cpu" : ""].filter(Boolean).join(",");
  document.querySelector("#host h2").textContent = "Host CPU" + (sim && sim.host_cpu ? " (simulated)" : "");
  return sim && sim.gpus;
}

// The worst severity among the current findings of one GPU and some rules: the cards follow the diagnosis.
let findings = [];
function severityOf(gpu, rules) {
  const sev = findings.filter(f => f.gpu === gpu && rules.includes(f.rule)).map(f => f.severity);
  return sev.includes("critical") || sev.includes("warning") ? " bad" : sev.length ? " note" : "";
}

function drawStrip(canvas, t, flags) {
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const ctx = canvas.getContext("2d"); ctx.scale(dpr, dpr); ctx.clearRect(0, 0, w, h);
  const left = 35, t1 = t.length ? t[t.length - 1] : 0, t0 = t1 - windowSeconds;
  const x = v => (v - t0) / windowSeconds * (w - left - 5) + left;
  ctx.fillStyle = "#eee"; ctx.fillRect(left, 2, w - left - 5, h - 4);
  ctx.fillStyle = "#c62828"; let held = 0;
  flags.forEach((v, i) => { if (v !== 1) return; held++;
    const next = i + 1 < t.length ? t[i + 1] : t[i] + 0.2; ctx.fillRect(x(t[i]), 2, Math.max(1, x(next) - x(t[i])), h - 4); });
  ctx.fillStyle = "#666"; ctx.font = "10px sans-serif"; ctx.fillText("clocks", 2, h / 2 + 3);
  canvas.dataset.held = held;
}

function showMig(s, g) {
  const box = s.querySelector(".mig");
  box.replaceChildren(...(g.mig_instances || []).map(m => {
    const d = document.createElement("div"), used = m.memory_used_bytes, total = m.memory_total_bytes;
    const share = used !== null && total ? used / total : 0;
    d.dataset.uuid = m.uuid;
    d.innerHTML = `<span class="bar"><i></i></span><span></span>`;
    d.querySelector("i").style.width = (share * 100).toFixed(1) + "%";
    d.querySelector("span:last-child").textContent = `MIG instance ${m.gpu_instance_id} \u00b7 ${m.uuid}: ` +
      (used === null || !total ? "memory unknown" :
       `${(used / 2 ** 30).toFixed(1)} of ${(total / 2 ** 30).toFixed(1)} GiB (${(share * 100).toFixed(0)} %)`);
    return d;
  }));
  box.hidden = !box.children.length;
}

function gpuSection(g, simulated) {
  let s = document.querySelector(`section.gpu[data-gpu="${g.gpu}"]`);
  if (!s) {
    s = document.createElement("section"); s.className = "gpu"; s.dataset.gpu = g.gpu;
    s.innerHTML = `<h2></h2><div class="legend"></div><div class="stat"></div><canvas class="chart"></canvas>` +
                  `<canvas class="clocks"></canvas><div class="clockstat"></div><div class="mig" hidden></div>`;
    s.querySelector("h2").textContent = `GPU ${g.gpu} \u00b7 ${g.name} \u00b7 ${g.uuid}` +
                                        (simulated ? " \u00b7 simulated" : "");
    s.querySelector(".legend").innerHTML = Object.keys(LABELS).map(
      k => `<span style="color:${COLORS[k]}">\u25a0 ${LABELS[k]}</span>`).join("");
    document.getElementById("gpus").appendChild(s);
  }
  return s;
}

function showFindings(doc) {
  findings = doc.findings;
  const ol = document.querySelector("#findings ol");
  ol.replaceChildren(...doc.findings.map(f => {
    const li = document.createElement("li"); li.dataset.rule = f.rule;
    li.innerHTML = `<span class="sev sev-${f.severity}"></span><b></b><div class="evidence"></div>` +
                   `<div class="remedy"></div>`;
    li.querySelector(".sev").textContent = f.severity;
    li.querySelector("b").textContent = f.title;
    li.querySelector(".evidence").textContent = f.evidence;
    li.querySelector(".remedy").textContent = f.remedy;
    return li;
  }));
  document.getElementById("findings").dataset.first = doc.findings.length ? doc.findings[0].rule : "";
}

async function getJson(path) {
  const r = await fetch(path);
  if (!r.ok) throw new Error(`${path.split("?")[0]}: HTTP ${r.status}`);
  return r.json();
}

let ticks = 0;
async function refresh() {
  if (HISTORY_S <= 0) {
    notice(["History is off (--history.window=0): no live samples or diagnosis here; " +
            "/metrics still serves every metric"]);
    document.getElementById("status").textContent = "history off";
    document.getElementById("findings").hidden = true;
    return;
  }
  try {
    const d = await getJson(`/api/v1/samples?window=${windowSeconds}s`);
    // every 3 s; longer windows less often (a 1 h diagnosis of 64 GPUs costs seconds of CPU)
    if (ticks++ % Math.max(3, Math.round(windowSeconds / 60)) === 0)
      showFindings(await getJson(`/api/v1/diagnosis?window=${windowSeconds}s`));
    const found = [], simulated = showSimulated(d.simulated);
    if (!d.gpus.length) {  // NVML's reason once, without its own "no GPU found" or "host metrics only"
      const nogpu = document.querySelector('#findings li[data-rule="no_gpu"] .evidence');
      const why = (nogpu ? nogpu.textContent.replace(/^[^:]*: ?/, "") : "")
        .replace(/;? ?serving host metrics only$/, "").replace(/,? ?(but )?no (NVIDIA )?GPU found:? ?/i, "").trim();
      found.push("No GPU found" + (why ? ` (${why})` : "") + " \u2014 host CPU only");
    }
    notice(found);
    draw(document.getElementById("host-canvas"), d.t, [{values: d.host_cpu_utilization, color: COLORS.host}], []);
    // what the samples cover: less than the window while the history fills
    const covered = d.t.length ? Math.min(windowSeconds, Math.round(d.t[d.t.length - 1] - d.t[0] + d.interval_seconds)) : 0;
    for (const g of d.gpus) {
      const s = gpuSection(g, simulated);
      const f = g.below_40_fraction;
      const stat = s.querySelector(".stat");
      stat.textContent = g.mig ? "utilisation not supported under MIG (memory and PCIe still shown; " +
                                 "memory per instance below)" :
        f === null ? "no samples in this window" :
        `at or below 40 % utilisation: ${(f * 100).toFixed(1)} % of the last ${span(covered)}`;
      // red only where the diagnosis names a cause, as its headline does
      stat.className = "stat" + severityOf(g.gpu, ["cpu_starvation", "cpu_quota_throttled", "gpu_underused"]);
      const held = g.clocks_held_down_fraction, clockstat = s.querySelector(".clockstat");
      clockstat.textContent = held === null ? "clocks: no clock event reasons in this window" :
        `clocks held down (heat or power): ${(held * 100).toFixed(1)} % of the last ${span(covered)}`;
      clockstat.className = "clockstat" + severityOf(g.gpu, ["clocks_throttled"]);
      drawStrip(s.querySelector("canvas.clocks"), d.t, g.clocks_held_down || []);
      showMig(s, g);
      draw(s.querySelector("canvas.chart"), d.t, Object.keys(LABELS).map(k => ({values: g[k], color: COLORS[k]})),
           g.mig ? GPU_LINES.slice(1) : GPU_LINES);  // no utilisation under MIG: no 40 % line
    }
    const st = document.getElementById("status");
    st.textContent = `${d.t.length} samples every ${d.interval_seconds * 1000} ms`;
    st.dataset.samples = d.t.length; st.dataset.gpus = d.gpus.length;
  } catch (e) {
    document.getElementById("status").textContent = "error: " + e.message;
  }
}

const bar = document.getElementById("windows");
for (const w of CHOICES) {
  const b = document.createElement("button"); b.dataset.w = w; b.textContent = span(w);
  b.classList.toggle("on", w === windowSeconds);
  b.onclick = () => { windowSeconds = w; ticks = 0;
    bar.querySelectorAll("button").forEach(x => x.classList.toggle("on", x === b)); refresh(); };
  bar.appendChild(b);
}
refresh(); setInterval(refresh, 1000);
</script>
</body></html>
"""


def live_page(telemetry_path: str, history_s: float = 0.0) -> bytes:
    """history_s: --history.window (0: off); the window buttons never ask for more."""
    return (_PAGE.replace("__VERSION__", __version__).replace("__HISTORY__", f"{history_s:g}")
            .replace("__TELEMETRY__", html.escape(telemetry_path))).encode()
