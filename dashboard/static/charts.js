// hl7mail dashboard: the last 24 hours of each partner, drawn as SVG by
// hand (no library, no network): messages taken per 5 minutes, the time
// from submission to the partner's receipt (median and 95th percentile),
// the queues' depth; alerts are marked on the time axis. Values are
// written as attributes and textContent only.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const W = 320, H = 90, PAD = { l: 34, r: 6, t: 8, b: 16 };

function svgEl(name, attrs, parent) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (parent) parent.appendChild(el);
  return el;
}

// chart draws series (each {name, values, cls}; values below 0 are gaps)
// over n steps from start, with the alerts as ticks.
function chart(title, unit, series, act, startMs, stepMs) {
  const n = series[0].values.length;
  let max = 0, sum = 0;
  for (const s of series) for (const v of s.values) if (v > 0) { max = Math.max(max, v); sum += v; }
  const fig = document.createElement("figure");
  fig.className = "chart";
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" }, fig);
  svg.dataset.chart = title;
  svg.dataset.sum = String(sum);
  const top = max > 0 ? max : 1;
  const x = (i) => PAD.l + (i + 0.5) * (W - PAD.l - PAD.r) / n;
  const y = (v) => H - PAD.b - v / top * (H - PAD.t - PAD.b);
  svgEl("line", { x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b, class: "axis" }, svg);
  svgEl("text", { x: PAD.l - 3, y: PAD.t + 8, class: "tick", "text-anchor": "end" }, svg).textContent = fmtNum(top);
  svgEl("text", { x: PAD.l - 3, y: H - PAD.b, class: "tick", "text-anchor": "end" }, svg).textContent = "0";
  for (const [i, label] of [[0, "-24h"], [Math.floor(n / 2), "-12h"], [n - 1, "now"]]) {
    svgEl("text", { x: x(i), y: H - 3, class: "tick", "text-anchor": "middle" }, svg).textContent = label;
  }
  for (const a of act.alerts) {
    const i = Math.floor((new Date(a.at).getTime() - startMs) / stepMs);
    if (i < 0 || i >= n) continue;
    const tick = svgEl("line", { x1: x(i), y1: PAD.t, x2: x(i), y2: H - PAD.b, class: "alert-mark" }, svg);
    svgEl("title", {}, tick).textContent = a.kind + " " + new Date(a.at).toLocaleString();
  }
  for (const s of series) {
    let d = "";
    let pen = false;
    s.values.forEach((v, i) => {
      if (v < 0) { pen = false; return; }
      d += (pen ? "L" : "M") + x(i).toFixed(1) + " " + y(v).toFixed(1);
      pen = true;
    });
    if (d) svgEl("path", { d, class: "series " + s.cls }, svg);
  }
  const cap = document.createElement("figcaption");
  cap.textContent = title + (unit ? " (" + unit + ")" : "") + ": " + series.map((s) => s.name).join(", ");
  fig.appendChild(cap);
  return fig;
}

function fmtNum(v) {
  return v >= 100 ? Math.round(v).toString() : v >= 10 ? v.toFixed(0) : v.toFixed(v >= 1 ? 1 : 2);
}

async function loadCharts() {
  const r = await fetch("api/activity", { credentials: "same-origin" });
  if (!r.ok) return;
  const v = await r.json();
  const startMs = new Date(v.start).getTime(), stepMs = v.step_secs * 1000;
  const box = document.getElementById("charts");
  box.replaceChildren();
  for (const name of Object.keys(v.partners).sort()) {
    const a = v.partners[name];
    a.alerts = a.alerts.concat(v.other_alerts);
    const row = document.createElement("div");
    row.className = "chart-row";
    row.dataset.partner = name;
    const h = document.createElement("h3");
    h.textContent = name;
    row.appendChild(h);
    row.appendChild(chart("messages", "per 5 min", [
      { name: "out", values: a.out, cls: "out" }, { name: "in", values: a.in, cls: "in" }], a, startMs, stepMs));
    row.appendChild(chart("receipt time", "s", [
      { name: "median", values: a.receipt_p50, cls: "p50" }, { name: "p95", values: a.receipt_p95, cls: "p95" }], a, startMs, stepMs));
    row.appendChild(chart("queued", "", [
      { name: "to mail", values: a.queue_out, cls: "out" }, { name: "to the router", values: a.queue_in, cls: "in" }], a, startMs, stepMs));
    box.appendChild(row);
  }
}

// requestCharts loads the charts again soon: at most every 10 seconds
// (their steps are 5 minutes; the query reads every message of the day),
// however often the page refreshes its tables (app.js asks after each).
let chartsNext = 0, chartsTimer = null;
function requestCharts() {
  if (chartsTimer) return;
  chartsTimer = setTimeout(() => {
    chartsTimer = null;
    chartsNext = Date.now() + 10000;
    loadCharts().catch(() => {});
  }, Math.max(0, chartsNext - Date.now()));
}
document.addEventListener("hl7mail:refreshed", requestCharts);
requestCharts();
setInterval(requestCharts, 60000);
