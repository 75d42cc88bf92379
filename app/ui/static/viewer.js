// The viewer's only script: local times, a pair set's live progress (server-sent events), a training's
// curves (polled JSON drawn as SVG). Plain DOM, no library.
"use strict";

function localTimes() {
  for (const el of document.querySelectorAll("time[data-unix]")) {
    el.textContent = new Date(Number(el.dataset.unix) * 1000).toLocaleString();
  }
}

function setStatus(container, status) {
  if (!container) return;
  container.innerHTML = "";
  const span = document.createElement("span");
  span.className = "status status-" + status;
  span.textContent = status;
  container.appendChild(span);
}

// A pair set's progress, stage and status from its event stream; the page reloads once it has finished,
// so the counts, tables and histograms of the finished set appear.
function livePairSet() {
  const live = document.getElementById("live");
  if (!live || live.dataset.terminal === "true") return;
  const source = new EventSource(live.dataset.events);
  const list = document.getElementById("ps-events");
  source.onmessage = () => {};
  const handle = (e) => {
    const event = JSON.parse(e.data);
    const d = event.data || {};
    const item = document.createElement("li");
    item.textContent = event.type + " " + JSON.stringify(d);
    list.appendChild(item);
    list.scrollTop = list.scrollHeight;
    if (d.stage) document.getElementById("ps-stage").textContent = d.stage;
    if (event.type === "progress") {
      document.getElementById("ps-done").textContent = d.done;
      document.getElementById("ps-total").textContent = d.total;
      const bar = document.getElementById("ps-progress");
      bar.max = d.total || 1; bar.value = d.done;
    }
    if (d.status) {
      setStatus(document.getElementById("ps-status"), d.status);
      if (["succeeded", "failed", "cancelled"].includes(d.status)) {
        source.close();
        setTimeout(() => location.reload(), 500);
      }
    }
  };
  for (const type of ["created", "status", "stage", "progress", "warning", "cancel_requested", "training_created"]) {
    source.addEventListener(type, handle);
  }
}

function drawCurve(svg, points) {
  const W = 320, H = 160, L = 42, R = 8, T = 8, B = 20;
  svg.innerHTML = "";
  svg.dataset.points = String(points.length);
  const ns = "http://www.w3.org/2000/svg";
  const add = (name, attrs, text) => {
    const el = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.appendChild(el);
    return el;
  };
  add("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" });
  add("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" });
  if (!points.length) { add("text", { x: L + 8, y: H / 2 }, "no steps yet"); return; }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  add("polyline", { class: "line", points: points.map((p) => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ") });
  for (const p of points) add("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2, fill: "#2d5bd7" });
  add("text", { x: 2, y: T + 8 }, y1.toPrecision(3));
  add("text", { x: 2, y: H - B }, y0.toPrecision(3));
  add("text", { x: L, y: H - 4 }, "step " + x0);
  add("text", { x: W - R - 40, y: H - 4 }, "step " + x1);
}

// A training's curves, redrawn every 1.5 s while it runs.
function liveTraining() {
  const box = document.getElementById("curves");
  if (!box) return;
  const refresh = async () => {
    const response = await fetch(box.dataset.metrics, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) return false;
    const data = await response.json();
    for (const svg of box.querySelectorAll("svg[data-curve]")) drawCurve(svg, data.curves[svg.dataset.curve] || []);
    for (const span of box.querySelectorAll(".latest[data-curve]")) {
      const v = data.metrics[span.dataset.curve];
      span.textContent = v === undefined ? "" : "· latest " + Number(v).toPrecision(4);
    }
    document.getElementById("tr-step").textContent = data.progress.step;
    document.getElementById("tr-total").textContent = data.progress.total_steps;
    setStatus(document.getElementById("tr-status"), data.status);
    return ["succeeded", "failed", "cancelled"].includes(data.status);
  };
  const loop = async () => {
    let done = false;
    try { done = await refresh(); } catch (e) { done = false; }
    if (!done) setTimeout(loop, 1500);
    else if (box.dataset.terminal !== "true") setTimeout(() => location.reload(), 500);
  };
  loop();
}

document.addEventListener("DOMContentLoaded", () => { localTimes(); livePairSet(); liveTraining(); });
