// Two small charts drawn as inline SVG: a line (devices online) and paired bars (connects
// above the axis, disconnects below it), both over the same minutes.

import { h, svg } from "./dom.js";

const WIDTH = 640;
const HEIGHT = 160;
const LEFT = 44;
const BOTTOM = 20;

/** Time of day; to the second when the chart spans less than ten minutes. */
function clock(ms, span) {
  const date = new Date(ms);
  const pad = (n) => String(n).padStart(2, "0");
  const text = `${pad(date.getHours())}:${pad(date.getMinutes())}`;
  return span < 600000 ? `${text}:${pad(date.getSeconds())}` : text;
}

function frame(label, samples, top) {
  const first = samples[0].ts;
  const last = samples[samples.length - 1].ts;
  return [
    svg("line", { x1: LEFT, y1: HEIGHT - BOTTOM, x2: WIDTH, y2: HEIGHT - BOTTOM, class: "axis" }),
    svg("line", { x1: LEFT, y1: 4, x2: LEFT, y2: HEIGHT - BOTTOM, class: "axis" }),
    text(LEFT - 6, 12, String(top), "end"),
    text(LEFT - 6, HEIGHT - BOTTOM, "0", "end"),
    text(LEFT, HEIGHT - 4, clock(first, last - first), "start"),
    text(WIDTH, HEIGHT - 4, clock(last, last - first), "end"),
    svg("title", {}, label),
  ];
}

function text(x, y, content, anchor) {
  const element = svg("text", { x, y, "text-anchor": anchor, class: "tick" });
  element.textContent = content;
  return element;
}

function niceTop(value) {
  if (value <= 5) return 5;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function empty(message) {
  return h("p", { class: "muted" }, message);
}

/** Devices online over time; ``samples`` is [{ts, online}], oldest first. */
export function onlineChart(samples) {
  if (samples.length < 2) return empty("The chart fills in as the gateway takes a sample each minute.");
  const top = niceTop(Math.max(...samples.map((s) => s.online)));
  const span = samples[samples.length - 1].ts - samples[0].ts || 1;
  const x = (s) => LEFT + ((s.ts - samples[0].ts) / span) * (WIDTH - LEFT);
  const y = (s) => HEIGHT - BOTTOM - (s.online / top) * (HEIGHT - BOTTOM - 4);
  const points = samples.map((s) => `${x(s).toFixed(1)},${y(s).toFixed(1)}`).join(" ");
  const area = `${LEFT},${HEIGHT - BOTTOM} ${points} ${WIDTH},${HEIGHT - BOTTOM}`;
  return svg(
    "svg",
    { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "chart", role: "img", "aria-label": "devices online over time" },
    ...frame("devices online", samples, top),
    svg("polygon", { points: area, class: "area" }),
    svg("polyline", { points, class: "line" }),
  );
}

/** Connects (up) and disconnects (down) per minute; ``samples`` is [{ts, connects, disconnects}]. */
export function churnChart(samples) {
  if (samples.length < 1) return empty("No minute has passed yet.");
  const top = niceTop(Math.max(1, ...samples.map((s) => Math.max(s.connects, s.disconnects))));
  const middle = (HEIGHT - BOTTOM) / 2 + 2;
  const half = middle - 4;
  const step = (WIDTH - LEFT) / samples.length;
  const width = Math.max(1, step * 0.8);
  const bars = [];
  samples.forEach((s, i) => {
    const left = LEFT + i * step;
    const up = (s.connects / top) * half;
    const down = (s.disconnects / top) * half;
    if (up) bars.push(svg("rect", { x: left, y: middle - up, width, height: up, class: "connects" }));
    if (down) bars.push(svg("rect", { x: left, y: middle, width, height: down, class: "disconnects" }));
  });
  const first = samples[0].ts;
  const last = samples[samples.length - 1].ts;
  return svg(
    "svg",
    { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "chart", role: "img", "aria-label": "connects and disconnects per minute" },
    svg("line", { x1: LEFT, y1: middle, x2: WIDTH, y2: middle, class: "axis" }),
    text(LEFT - 6, 12, `+${top}`, "end"),
    text(LEFT - 6, HEIGHT - BOTTOM, `-${top}`, "end"),
    text(LEFT, HEIGHT - 4, clock(first, last - first), "start"),
    text(WIDTH, HEIGHT - 4, clock(last, last - first), "end"),
    ...bars,
  );
}
