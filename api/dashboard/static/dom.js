// Building DOM nodes. Every string becomes a text node (textContent): data from the API or the user is never
// parsed as HTML, so a model named "<script>..." is shown as those characters.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "className") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") {
    if (!Number.isFinite(value)) return String(value);
    if (Number.isInteger(value)) return value.toLocaleString("en");
    const a = Math.abs(value);
    return a !== 0 && (a < 1e-3 || a >= 1e6) ? value.toExponential(3) : value.toPrecision(digits).replace(/\.?0+$/, "");
  }
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

export function bytes(n) {
  if (typeof n !== "number") return fmt(n);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function pct(x) {
  return typeof x === "number" ? `${(100 * x).toFixed(1)} %` : "–";
}

// A definition list of an object's fields (nested values as JSON), skipping `skip`.
export function kv(obj, skip = []) {
  const dl = h("dl", { className: "kv" });
  for (const [k, v] of Object.entries(obj || {})) {
    if (skip.includes(k) || v === undefined) continue;
    dl.append(h("dt", {}, k), h("dd", {}, fmt(v)));
  }
  return dl;
}

// A table from rows of objects: `columns` are [header, row => value or Node, className?].
export function table(columns, rows, attrs = {}) {
  const head = h("tr", {}, columns.map(([title, , cls]) => h("th", { className: cls }, title)));
  const body = rows.map((row) =>
    h("tr", {}, columns.map(([, get, cls]) => {
      const v = get(row);
      return h("td", { className: cls }, v instanceof Node ? v : fmt(v));
    })),
  );
  return h("table", attrs, h("thead", {}, head), h("tbody", {}, body));
}

export function stateBadge(state) {
  return h("span", { className: `state state-${state}`, dataset: { state } }, state);
}
