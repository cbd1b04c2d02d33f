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
</style></head>
<body>
<header>
 <h1>gpu-telemetry-exporter __VERSION__</h1>
 <a href="__TELEMETRY__">__TELEMETRY__</a> <a href="/healthz">/healthz</a>
 <a href="/api/v1/diagnosis?window=5m">/api/v1/diagnosis</a>
 <span id="windows">window:</span>
 <span id="status">loading...</span>
</header>
<section id="notices" class="notice" hidden></section>
<section id="findings"><h2>Diagnosis: why the real-time factor may jitter</h2><ol></ol></section>
<p>Every sample (one per sampler tick), not one per Prometheus scrape. Dashed lines: 40 % on GPU
utilisation (starved at or below it) and 90 % on PCIe (saturated above it).</p>
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

function gpuSection(g) {
  let s = document.querySelector(`section.gpu[data-gpu="${g.gpu}"]`);
  if (!s) {
    s = document.createElement("section"); s.className = "gpu"; s.dataset.gpu = g.gpu;
    s.innerHTML = `<h2></h2><div class="legend"></div><div class="stat"></div><canvas></canvas>`;
    s.querySelector("h2").textContent = `GPU ${g.gpu} \u00b7 ${g.name} \u00b7 ${g.uuid}`;
    s.querySelector(".legend").innerHTML = Object.keys(LABELS).map(
      k => `<span style="color:${COLORS[k]}">\u25a0 ${LABELS[k]}</span>`).join("");
    document.getElementById("gpus").appendChild(s);
  }
  return s;
}

function showFindings(doc) {
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
    const found = [];
    if (!d.gpus.length) {
      const nogpu = document.querySelector('#findings li[data-rule="no_gpu"] .evidence');
      found.push("No GPU found" + (nogpu ? ": " + nogpu.textContent.replace(/^[^:]*: ?/, "") : "") +
                 " \u2014 host CPU only");
    }
    notice(found);
    draw(document.getElementById("host-canvas"), d.t, [{values: d.host_cpu_utilization, color: COLORS.host}], []);
    // what the samples cover: less than the window while the history fills
    const covered = d.t.length ? Math.min(windowSeconds, Math.round(d.t[d.t.length - 1] - d.t[0] + d.interval_seconds)) : 0;
    for (const g of d.gpus) {
      const s = gpuSection(g);
      const f = g.below_40_fraction;
      const stat = s.querySelector(".stat");
      stat.textContent = g.mig ? "utilisation not supported under MIG (memory and PCIe still shown)" :
        f === null ? "no samples in this window" :
        `at or below 40 % utilisation: ${(f * 100).toFixed(1)} % of the last ${span(covered)}`;
      stat.className = "stat" + (f !== null && f > 0.5 ? " bad" : "");
      draw(s.querySelector("canvas"), d.t, Object.keys(LABELS).map(k => ({values: g[k], color: COLORS[k]})),
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
