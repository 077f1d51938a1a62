// The live list of jobs, and Compare: several jobs' metric-vs-sparsity curves on one plot.

import { api, listAll } from "./api.js";
import { every, problemBox } from "./common.js";
import { clear, fmt, h, pct, stateBadge, table } from "./dom.js";
import { legend, lineChart } from "./plots.js";

async function names(path) {
  try {
    return Object.fromEntries((await listAll(path)).map((r) => [r.id, r.name]));
  } catch {
    return {};
  }
}

function progressCell(job) {
  return h("span", {}, h("progress", { max: 1, value: job.progress ?? 0 }), ` ${pct(job.progress)}`);
}

export async function jobsView(root) {
  const models = await names("/v1/models");
  const list = h("div", { id: "jobs-list" }, h("p", { className: "muted" }, "loading…"));
  const chosen = new Set();
  const compare = h("button", { type: "button", className: "secondary", id: "compare-selected", onclick: () => {
    location.hash = `#/compare?ids=${[...chosen].map(encodeURIComponent).join(",")}`;
  } }, "Compare selected");
  clear(root).append(h("h1", {}, "Jobs"), h("p", {}, h("a", { href: "#/new" }, "New job"), " · ", compare), list);

  async function refresh() {
    try {
      const jobs = await listAll("/v1/jobs", 200);
      if (!jobs.length) {
        clear(list).append(h("p", { className: "muted" }, "No jobs yet. ", h("a", { href: "#/new" }, "Submit one.")));
        return;
      }
      clear(list).append(table([
        ["", (j) => {
          const box = h("input", { type: "checkbox", "data-compare": j.id, "aria-label": `compare ${j.id}` });
          box.checked = chosen.has(j.id);
          box.addEventListener("change", () => (box.checked ? chosen.add(j.id) : chosen.delete(j.id)));
          return box;
        }],
        ["job", (j) => h("a", { href: `#/jobs/${encodeURIComponent(j.id)}`, "data-job": j.id }, j.id)],
        ["state", (j) => stateBadge(j.state)],
        ["progress", progressCell],
        ["phase", (j) => j.phase ?? (j.state === "queued" && j.queue_position ? `#${j.queue_position} in queue` : "")],
        ["target", (j) => pct(j.spec?.sparsity), "num"],
        ["method", (j) => j.spec?.method ?? "woodfisher"],
        ["model", (j) => h("span", {}, models[j.model_id] ?? j.model_id ?? "–")],
        ["created", (j) => new Date(j.created_at).toLocaleString()],
      ], jobs, { id: "jobs-table" }));
    } catch (e) {
      clear(list).append(problemBox(e));
    }
  }
  await refresh();
  every(2000, refresh);
}

export async function compareView(root, params) {
  const preset = new Set((params.get("ids") || "").split(",").filter(Boolean));
  const models = await names("/v1/models");
  const jobs = (await listAll("/v1/jobs", 200)).filter((j) => j.state === "succeeded" || preset.has(j.id));
  const chart = h("div", { id: "compare-chart" });
  const boxes = jobs.map((j) => {
    const box = h("input", { type: "checkbox", value: j.id, "data-compare": j.id });
    box.checked = preset.has(j.id);
    box.addEventListener("change", draw);
    const label = `${j.spec?.method ?? "?"} → ${pct(j.spec?.sparsity)} · ${models[j.model_id] ?? j.model_id ?? ""} · ${j.id}`;
    return h("label", { className: "form-row" }, box, " ", label);
  });
  clear(root).append(h("h1", {}, "Compare"),
    h("p", { className: "muted" }, "Succeeded jobs' validation metric against sparsity, one curve per job."),
    h("section", { className: "card" }, boxes.length ? boxes : h("p", {}, "No succeeded jobs yet.")), chart);

  const cache = new Map();
  async function draw() {
    const ids = boxes.map((b) => b.querySelector("input")).filter((b) => b.checked).map((b) => b.value);
    const series = [];
    try {
      for (const id of ids) {
        if (!cache.has(id)) cache.set(id, (await api(`/v1/jobs/${encodeURIComponent(id)}/metrics`)).data);
        const job = jobs.find((j) => j.id === id);
        series.push({
          name: `${job?.spec?.method ?? id} ${pct(job?.spec?.sparsity)} (${id})`,
          points: cache.get(id).filter((m) => m.sparsity != null && m.metric != null).map((m) => [m.sparsity, m.metric]),
        });
      }
    } catch (e) {
      clear(chart).append(problemBox(e));
      return;
    }
    const metric = jobs.find((j) => ids.includes(j.id))?.spec?.metric ?? "metric";
    clear(chart).append(lineChart(series, { title: `${metric} vs sparsity`, xLabel: "sparsity", yLabel: metric, id: "compare-plot", width: 720, height: 380 }), legend(series));
  }
  await draw();
}

