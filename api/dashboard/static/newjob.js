// New job: model and dataset, then the spec form generated from its JSON Schema; "Check" shows the memory plan
// (POST /v1/jobs/plan: the same checks as creating the job), "Submit" creates it. Field errors go to their fields.

import { ApiError, api, listAll } from "./api.js";
import { problemBox } from "./common.js";
import { bytes, clear, fmt, h, kv } from "./dom.js";
import { SchemaForm } from "./form.js";

export async function newJobView(root) {
  clear(root).append(h("h1", {}, "New job"), h("p", { className: "muted" }, "loading…"));
  const [schema, models, datasets] = await Promise.all([
    fetch("/ui/spec-schema.json").then((r) => r.json()),
    listAll("/v1/models"),
    listAll("/v1/datasets"),
  ]);
  const pick = (id, rows, label) => {
    const select = h("select", { id, name: id, required: true },
      rows.length ? rows.map((r) => h("option", { value: r.id }, `${r.name} (${r.id})`)) : h("option", { value: "" }, `no ${label} uploaded`));
    return select;
  };
  const model = pick("model_id", models, "models");
  const dataset = pick("dataset_id", datasets, "datasets");
  const errorOf = (key) => h("span", { className: "field-error", "data-error-for": key });
  const modelError = errorOf("model_id");
  const datasetError = errorOf("dataset_id");
  const form = new SchemaForm(schema, { prefix: ["body", "spec"] });
  const plan = h("div", { id: "plan" });
  const status = h("div", { id: "submit-status" });
  const check = h("button", { type: "button", className: "secondary", id: "check-plan" }, "Check and show the memory plan");
  const submit = h("button", { type: "submit", id: "submit-job" }, "Submit");
  const el = h("form", { id: "job-form", className: "stack", novalidate: true },
    h("section", { className: "card" },
      h("div", { className: "form-row" }, h("label", { for: "model_id", className: "label" }, "model"), model, modelError),
      h("div", { className: "form-row" }, h("label", { for: "dataset_id", className: "label" }, "dataset"), dataset, datasetError)),
    h("section", { className: "card" }, h("h2", {}, "Spec"), form.element),
    h("section", { className: "card" }, h("h2", {}, "Memory plan"), plan, check),
    status, submit);

  const body = () => ({ model_id: model.value, dataset_id: dataset.value, spec: form.values() });

  function showProblem(e) {
    form.clearErrors();
    modelError.textContent = datasetError.textContent = "";
    const errors = e instanceof ApiError ? e.problem.errors || [] : [];
    const rest = form.showErrors(errors).filter((err) => {
      const loc = (err.loc || []).map(String);
      const target = loc.includes("model_id") ? modelError : loc.includes("dataset_id") ? datasetError : null;
      if (target) target.textContent = err.msg;
      return !target;
    });
    clear(status).append(problemBox(e));
    return rest;
  }

  async function showPlan() {
    clear(plan).append(h("span", { className: "muted" }, "checking…"));
    try {
      const p = await api("/v1/jobs/plan", { method: "POST", json: body() });
      form.clearErrors();
      clear(status);
      const mp = p.memory_plan;
      clear(plan).append(mp
        ? h("div", { className: "plan-ok" },
            kv({
              "block size": mp.block_size ?? "layer",
              gradients: bytes(mp.gradient_bytes),
              "inverse blocks": bytes(mp.inverse_bytes),
              "working memory": bytes(mp.working_bytes),
              "pruning step peak": bytes(mp.total_bytes),
              budget: p.budget_mb != null ? `${fmt(p.budget_mb)} MiB (${p.budget_source})` : "none",
            }))
        : h("p", { className: "plan-ok muted" }, "Checks passed; no memory plan for this method or model (planned by the run)."));
    } catch (e) {
      clear(plan).append(h("span", { className: "error" }, "The job would be refused:"));
      showProblem(e);
    }
  }

  check.addEventListener("click", showPlan);
  el.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", json: body() });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (e) {
      showProblem(e);
    } finally {
      submit.disabled = false;
    }
  });
  clear(root).append(h("h1", {}, "New job"), el);
}
