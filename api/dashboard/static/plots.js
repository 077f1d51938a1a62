// Small SVG charts drawn here (no chart library to ship): lines and points with axes, and horizontal bars.
// Labels are text nodes; colours are presentation attributes (allowed by the page's Content-Security-Policy).

const NS = "http://www.w3.org/2000/svg";
export const COLORS = ["#2f6f4f", "#c0562b", "#2d5fa8", "#8a4fb0", "#b08a1f", "#3b8c96", "#a33b62", "#555"];

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function ticks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const step = 10 ** Math.floor(Math.log10((hi - lo) / n));
  const nice = [1, 2, 5, 10].map((m) => m * step).find((st) => (hi - lo) / st <= n) || step * 10;
  const out = [];
  for (let t = Math.ceil(lo / nice) * nice; t <= hi + nice * 1e-9; t += nice) out.push(+t.toPrecision(12));
  return out;
}

function label(v) {
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(0) : String(+v.toPrecision(4));
}

function extent(values, pad) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (!Number.isFinite(lo)) return [0, 1];
  if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 0.5; hi += Math.abs(hi) * 0.1 || 0.5; }
  const p = (hi - lo) * pad;
  return [lo - p, hi + p];
}

// series: [{name, points: [[x, y], ...], line: true, dots: true}]; options: title, xLabel, yLabel, logX,
// diagonal (draw y = x), width, height, id.
export function lineChart(series, opts = {}) {
  const W = opts.width || 560;
  const H = opts.height || 300;
  const m = { l: 62, r: 16, t: 28, b: 42 };
  const tx = (x) => (opts.logX ? Math.log10(x) : x);
  const pts = series.flatMap((se) => se.points).filter(([x, y]) => Number.isFinite(tx(x)) && Number.isFinite(y));
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" });
  if (opts.id) svg.setAttribute("id", opts.id);
  svg.append(s("text", { x: m.l, y: 16, class: "title" }, opts.title || ""));
  if (!pts.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, opts.empty || "no data yet"));
    return svg;
  }
  let [x0, x1] = extent(pts.map(([x]) => tx(x)), 0.03);
  let [y0, y1] = extent(pts.map(([, y]) => y), 0.08);
  if (opts.diagonal) { x0 = y0 = Math.min(x0, y0); x1 = y1 = Math.max(x1, y1); }
  const X = (x) => m.l + ((tx(x) - x0) / (x1 - x0)) * (W - m.l - m.r);
  const Y = (y) => H - m.b - ((y - y0) / (y1 - y0)) * (H - m.t - m.b);
  const axes = s("g", { stroke: "#c8ced6" });
  axes.append(s("line", { x1: m.l, y1: H - m.b, x2: W - m.r, y2: H - m.b }));
  axes.append(s("line", { x1: m.l, y1: m.t, x2: m.l, y2: H - m.b }));
  svg.append(axes);
  for (const t of ticks(x0, x1)) {
    const x = m.l + ((t - x0) / (x1 - x0)) * (W - m.l - m.r);
    svg.append(s("text", { x, y: H - m.b + 14, "text-anchor": "middle" }, opts.logX ? `1e${t}` : label(t)));
  }
  for (const t of ticks(y0, y1)) {
    const y = Y(t);
    svg.append(s("line", { x1: m.l, y1: y, x2: W - m.r, y2: y, stroke: "#eef1f4" }));
    svg.append(s("text", { x: m.l - 6, y: y + 4, "text-anchor": "end" }, label(t)));
  }
  svg.append(s("text", { x: (m.l + W - m.r) / 2, y: H - 6, "text-anchor": "middle" }, opts.xLabel || ""));
  svg.append(s("text", { x: 12, y: (m.t + H - m.b) / 2, "text-anchor": "middle",
    transform: `rotate(-90 12 ${(m.t + H - m.b) / 2})` }, opts.yLabel || ""));
  if (opts.diagonal) {
    svg.append(s("line", { x1: X(x0), y1: Y(x0), x2: X(x1), y2: Y(x1), stroke: "#999", "stroke-dasharray": "4 4" }));
  }
  series.forEach((se, i) => {
    const color = se.color || COLORS[i % COLORS.length];
    const good = se.points.filter(([x, y]) => Number.isFinite(tx(x)) && Number.isFinite(y));
    const g = s("g", { class: "series", "data-name": se.name || "" });
    if (se.line !== false && good.length > 1) {
      const d = good.map(([x, y], j) => `${j ? "L" : "M"}${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join("");
      g.append(s("path", { d, fill: "none", stroke: color, "stroke-width": 2 }));
    }
    if (se.dots !== false) {
      for (const [x, y] of good) {
        const c = s("circle", { cx: X(x).toFixed(1), cy: Y(y).toFixed(1), r: 3.5, fill: color });
        c.append(s("title", {}, `${se.name ? `${se.name}: ` : ""}${label(x)}, ${label(y)}`));
        g.append(c);
      }
    }
    svg.append(g);
  });
  return svg;
}

export function legend(series) {
  const div = document.createElement("div");
  div.className = "legend";
  series.forEach((se, i) => {
    const item = document.createElement("span");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = se.color || COLORS[i % COLORS.length];
    item.append(sw, document.createTextNode(se.name));
    div.append(item);
  });
  return div;
}

// Horizontal bars of values in [0, max] (default 1), one per label.
export function barChart(items, opts = {}) {
  const max = opts.max ?? 1;
  const W = opts.width || 560;
  const row = 20;
  const lw = opts.labelWidth || 170;
  const H = 30 + row * items.length + 10;
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" });
  if (opts.id) svg.setAttribute("id", opts.id);
  svg.append(s("text", { x: 8, y: 16, class: "title" }, opts.title || ""));
  items.forEach(({ label: name, value }, i) => {
    const y = 28 + i * row;
    const w = Math.max(0, Math.min(1, (value ?? 0) / max)) * (W - lw - 70);
    svg.append(s("text", { x: lw - 6, y: y + 13, "text-anchor": "end" }, name.length > 28 ? `…${name.slice(-27)}` : name));
    svg.append(s("rect", { x: lw, y: y + 2, width: W - lw - 70, height: row - 6, fill: "#eef1f4" }));
    const bar = s("rect", { x: lw, y: y + 2, width: w.toFixed(1), height: row - 6, fill: COLORS[0], class: "bar" });
    bar.append(s("title", {}, `${name}: ${opts.format ? opts.format(value) : value}`));
    svg.append(bar);
    svg.append(s("text", { x: lw + (W - lw - 70) + 6, y: y + 13 }, opts.format ? opts.format(value) : label(value)));
  });
  return svg;
}
