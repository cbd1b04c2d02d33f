"""The landing page: a live view of the last minutes at full sample resolution, drawn on <canvas>.

Self-contained (no CDN, no build step); it polls /api/v1/samples once a second.
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
 canvas { width: 100%; height: 160px; display: block; }
 .legend span { margin-right: 12px; } .stat { font-weight: 600; }
 .bad { color: #c62828; } button.on { font-weight: 700; }
</style></head>
<body>
<header>
 <h1>gpu-telemetry-exporter __VERSION__</h1>
 <a href="__TELEMETRY__">__TELEMETRY__</a> <a href="/healthz">/healthz</a>
 <span>window: <button data-w="60">1 min</button> <button data-w="300">5 min</button></span>
 <span id="status">loading...</span>
</header>
<p>Every sample (one per sampler tick), not one per Prometheus scrape. Dashed lines: 40 % (GPU starved
below it) and 90 % (PCIe saturated above it).</p>
<section id="host"><h2>Host CPU</h2><canvas id="host-canvas"></canvas></section>
<div id="gpus"></div>
<script>
"use strict";
let windowSeconds = 60;
const COLORS = {utilization: "#1565c0", memory_used_ratio: "#6a1b9a", pcie_rx_utilization: "#ef6c00",
                pcie_tx_utilization: "#2e7d32", host: "#37474f"};
const LABELS = {utilization: "GPU utilisation", memory_used_ratio: "memory used",
                pcie_rx_utilization: "PCIe rx % of link", pcie_tx_utilization: "PCIe tx % of link"};

function draw(canvas, t, series) {
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const ctx = canvas.getContext("2d"); ctx.scale(dpr, dpr); ctx.clearRect(0, 0, w, h);
  const t1 = t.length ? t[t.length - 1] : 0, t0 = t1 - windowSeconds;
  const x = v => (v - t0) / windowSeconds * (w - 40) + 35, y = v => h - 5 - Math.min(v, 1.05) * (h - 15);
  ctx.strokeStyle = "#ccc"; ctx.fillStyle = "#666"; ctx.font = "10px sans-serif";
  for (const g of [0, 0.5, 1]) { ctx.beginPath(); ctx.moveTo(35, y(g)); ctx.lineTo(w, y(g)); ctx.stroke();
                                 ctx.fillText(Math.round(g * 100) + "%", 2, y(g) + 3); }
  ctx.setLineDash([5, 4]); ctx.strokeStyle = "#c62828";
  for (const g of [0.4, 0.9]) { ctx.beginPath(); ctx.moveTo(35, y(g)); ctx.lineTo(w, y(g)); ctx.stroke(); }
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
    s.querySelector("h2").textContent = `GPU ${g.gpu} \\u00b7 ${g.name} \\u00b7 ${g.uuid}`;
    s.querySelector(".legend").innerHTML = Object.keys(LABELS).map(
      k => `<span style="color:${COLORS[k]}">\\u25a0 ${LABELS[k]}</span>`).join("");
    document.getElementById("gpus").appendChild(s);
  }
  return s;
}

async function refresh() {
  try {
    const r = await fetch(`/api/v1/samples?window=${windowSeconds}s`);
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const d = await r.json();
    draw(document.getElementById("host-canvas"), d.t,
         [{values: d.host_cpu_utilization, color: COLORS.host}]);
    for (const g of d.gpus) {
      const s = gpuSection(g);
      const f = g.below_40_fraction;
      const stat = s.querySelector(".stat");
      stat.textContent = f === null ? "no samples" :
        `at or below 40 % utilisation: ${(f * 100).toFixed(1)} % of the last ${windowSeconds} s`;
      stat.className = "stat" + (f !== null && f > 0.5 ? " bad" : "");
      draw(s.querySelector("canvas"), d.t, Object.keys(LABELS).map(k => ({values: g[k], color: COLORS[k]})));
    }
    const st = document.getElementById("status");
    st.textContent = `${d.t.length} samples every ${d.interval_seconds * 1000} ms`;
    st.dataset.samples = d.t.length; st.dataset.gpus = d.gpus.length;
  } catch (e) {
    document.getElementById("status").textContent = "error: " + e.message;
  }
}
for (const b of document.querySelectorAll("button[data-w]")) {
  b.onclick = () => { windowSeconds = +b.dataset.w;
    document.querySelectorAll("button[data-w]").forEach(x => x.classList.toggle("on", x === b)); refresh(); };
}
document.querySelector('button[data-w="60"]').classList.add("on");
refresh(); setInterval(refresh, 1000);
</script>
</body></html>
"""


def live_page(telemetry_path: str, history_s: float = 0.0) -> bytes:
    return (_PAGE.replace("__VERSION__", __version__)
            .replace("__TELEMETRY__", html.escape(telemetry_path))).encode()
