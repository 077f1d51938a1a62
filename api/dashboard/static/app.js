// The dashboard's entry point: sign-in and the hash router (#/jobs, #/jobs/<id>, #/new, #/models, #/datasets,
// #/compare). Only ids ever appear in the URL; the key stays in sessionStorage.

import { ApiError, api, clearKey, getKey, setKey } from "./api.js";
import { leave, nextGeneration, problemBox, view } from "./common.js";
import { clear, h } from "./dom.js";
import { inputsView } from "./inputs.js";
import { jobView } from "./job.js";
import { compareView, jobsView } from "./jobs.js";
import { newJobView } from "./newjob.js";

function signIn(root) {
  document.getElementById("nav").hidden = true;
  const key = h("input", { type: "password", id: "api-key", name: "api-key", autocomplete: "off", required: true, placeholder: "arb_…" });
  const status = h("div", {});
  const form = h("form", { id: "sign-in", className: "stack signin" },
    h("h1", {}, "Sign in"),
    h("p", { className: "muted" }, "With an API key (", h("code", {}, "arborist keys create --tenant NAME"),
      "). It is kept for this browser tab's session only and sent as the Authorization header."),
    h("label", { for: "api-key" }, "API key"), key, h("p", {}, h("button", { type: "submit" }, "Sign in")), status);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    setKey(key.value.trim());
    try {
      await api("/v1/models?limit=1");
      if (!location.hash || location.hash === "#/signin") location.hash = "#/jobs";
      else route();
    } catch (e) {
      clearKey();
      clear(status).append(problemBox(e));
    }
  });
  clear(root).append(form);
  key.focus();
}

async function route() {
  leave();
  nextGeneration();
  const root = view();
  if (!getKey()) {
    signIn(root);
    return;
  }
  document.getElementById("nav").hidden = false;
  const [path, query = ""] = (location.hash.slice(1) || "/jobs").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.getAttribute("href") === `#/${parts[0]}`);
  // Each view renders into its own slot: a view still awaiting the API when the route changes renders into a slot
  // that is no longer in the page, never over the view that replaced it.
  const slot = h("div", { className: "view-slot" });
  clear(root).append(slot);
  try {
    if (parts[0] === "jobs" && parts[1]) await jobView(slot, parts[1]);
    else if (parts[0] === "new") await newJobView(slot);
    else if (parts[0] === "models" || parts[0] === "datasets") await inputsView(slot, parts[0]);
    else if (parts[0] === "compare") await compareView(slot, new URLSearchParams(query));
    else await jobsView(slot);
  } catch (e) {
    if (!slot.isConnected) return; // a later route owns the page
    if (e instanceof ApiError && e.status === 401) {
      clearKey();
      signIn(root);
      root.prepend(problemBox(e));
      return;
    }
    clear(slot).append(problemBox(e));
  }
}

document.getElementById("sign-out").addEventListener("click", () => {
  clearKey();
  location.hash = "#/signin";
  route();
});
window.addEventListener("hashchange", route);
route();
