// What the views share: the problem box, and the page's view element.

import { ApiError } from "./api.js";
import { h } from "./dom.js";

export const view = () => document.getElementById("view");

// An RFC 9457 problem as a box: title, detail and any field errors.
export function problemBox(err) {
  const p = err instanceof ApiError ? err.problem : { title: "Error", detail: String(err?.message || err) };
  return h("div", { className: "problem", role: "alert" },
    h("strong", {}, p.title || "Error"), p.status ? ` (${p.status})` : "", p.detail ? h("div", {}, p.detail) : null,
    Array.isArray(p.errors) && p.errors.length
      ? h("ul", {}, p.errors.map((e) => h("li", {}, `${(e.loc || []).join(".")}: ${e.msg}`)))
      : null);
}

// Calls fn every `ms` until the view changes (the router bumps the generation) or fn returns false.
let generation = 0;
export const nextGeneration = () => ++generation;
export function every(ms, fn) {
  const mine = generation;
  const tick = async () => {
    if (mine !== generation) return;
    let again = true;
    try { again = (await fn()) !== false; } catch (e) { console.warn(e); }
    if (again && mine === generation) setTimeout(tick, ms);
  };
  setTimeout(tick, ms);
}
export const current = () => generation;

// Cleanups for when the view changes (an open event stream is aborted).
const leaving = [];
export const onLeave = (fn) => leaving.push(fn);
export function leave() {
  while (leaving.length) {
    try { leaving.pop()(); } catch (e) { console.warn(e); }
  }
}
