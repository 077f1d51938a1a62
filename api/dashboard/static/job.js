// One job: follows its event stream (progress, phase, state), draws the sparsity/metric curve as it grows, and
// once finished its report: the λ sweep, predicted vs actual loss change per pruning step (the paper's Fig. 2),
// per-layer sparsity, the memory plan against what was measured, latency and size where the report has them;
// artifact downloads, cancel and retry. Report fields are rendered when present: an older or newer report
// shows what it has.

import { ApiError, api, download, fetchArtifact, followEvents } from "./api.js";
import { current, onLeave, problemBox } from "./common.js";
import { bytes, clear, fmt, h, kv, pct, stateBadge, table } from "./dom.js";
import { barChart, legend, lineChart } from "./plots.js";

const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const KNOWN = new Set(["version", "spec", "method", "lambda", "block_size", "memory_plan", "lambda_sweep", "recompute_sweep", "sparsity",
  "parameters", "macs", "layers", "metrics", "quadratic_model", "curve", "seconds", "device", "onnx_error",
  "peak_memory", "phases", "latency", "size", "sizes", "speed"]);

export async function jobView(root, jobId) {
  const path = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const mine = current();
  const head = h("div", { id: "job-head" });
  const actions = h("div", { id: "job-actions" });
  const curve = h("div", { id: "curve" });
  const log = h("ol", { className: "events", id: "events" });
  const report = h("div", { id: "report" });
  const artifacts = h("div", { id: "artifacts" });
  clear(root).append(h("h1", {}, "Job ", h("code", {}, jobId)), head, actions,
    h("div", { className: "row" },
      h("section", { className: "card grow" }, h("h2", {}, "Sparsity and metric"), curve),
      h("section", { className: "card grow" }, h("h2", {}, "Events"), log)),
    h("section", { className: "card" }, h("h2", {}, "Artifacts"), artifacts), report);

  let job;
  try {
    job = await api(path);
  } catch (e) {
    clear(head).append(problemBox(e));
    return;
  }
  const controller = new AbortController();
  onLeave(() => controller.abort());
  const names = {};
  for (const [kind, id] of [["models", job.model_id], ["datasets", job.dataset_id]]) {
    if (!id) continue;
    try {
      names[id] = (await api(`/v1/${kind}/${encodeURIComponent(id)}`)).name;
    } catch { /* deleted since: the id is shown */ }
  }
  const named = (id) => (id && names[id] !== undefined ? `${names[id]} (${id})` : id ?? "deleted");
  let lastSeq = 0;
  let finishedShown = false;

  function showHead() {
    const p = job.spec || {};
    clear(head).append(h("section", { className: "card" },
      h("p", {}, stateBadge(job.state), " ", h("progress", { id: "job-progress", max: 1, value: job.progress ?? 0 }),
        ` ${pct(job.progress)} `, h("span", { id: "phase", className: "muted" },
          job.phase ?? (job.state === "queued" && job.queue_position ? `#${job.queue_position} in queue` : ""))),
      kv({ method: p.method ?? "woodfisher", target: pct(p.sparsity), mode: p.mode ?? "one_shot", model: named(job.model_id),
        dataset: named(job.dataset_id), attempts: job.attempts, "queued (s)": job.queued_seconds,
        "running (s)": job.running_seconds, created: job.created_at, finished: job.finished_at }),
      job.error ? problemBox(new ApiError(job.error, job.error.status)) : null));
    const cancel = h("button", { type: "button", className: "danger", id: "cancel-job" }, "Cancel");
    const retry = h("button", { type: "button", className: "secondary", id: "retry-job" }, "Retry");
    cancel.hidden = !["queued", "running"].includes(job.state);
    retry.hidden = !["failed", "canceled"].includes(job.state);
    const status = h("span", {});
    cancel.addEventListener("click", () => act("cancel", status));
    retry.addEventListener("click", () => act("retry", status));
    clear(actions).append(h("p", {}, cancel, " ", retry, " ", status));
  }

  async function act(what, status) {
    try {
      job = await api(`${path}/${what}`, { method: "POST" });
      showHead();
      if (what === "retry") { finishedShown = false; clear(report); clear(artifacts); follow(); }
    } catch (e) {
      clear(status).append(problemBox(e));
    }
  }

  let curvePending = false;
  async function drawCurve() {
    if (curvePending) return;
    curvePending = true;
    try {
      const metrics = (await api(`${path}/metrics`)).data;
      const metric = job.spec?.metric ?? "accuracy";
      const pts = metrics.filter((m) => m.sparsity != null && m.metric != null);
      const series = [
        { name: `${metric} (validation)`, points: pts.map((m) => [m.sparsity, m.metric]) },
      ];
      clear(curve).append(lineChart(series, { title: `${metric} vs sparsity`, xLabel: "sparsity", yLabel: metric, id: "curve-plot" }),
        table([["step", (m) => m.step, "num"], ["kind", (m) => m.kind], ["epoch", (m) => m.epoch, "num"],
          ["sparsity", (m) => pct(m.sparsity), "num"], ["loss", (m) => m.loss, "num"], [metric, (m) => m.metric, "num"]],
          metrics, { id: "curve-table" }));
    } catch (e) {
      clear(curve).append(problemBox(e));
    } finally {
      curvePending = false;
    }
  }

  function logEvent(kind, payload) {
    const data = payload?.data ?? payload;
    const text = kind === "progress" && data?.message ? `${pct(data.fraction ?? data.progress)} ${data.message}` : fmt(data);
    log.append(h("li", { "data-kind": kind, "data-seq": payload?.seq }, `${kind}: ${text}`));
    while (log.children.length > 200) log.firstChild.remove();
    log.scrollTop = log.scrollHeight;
  }

  let refreshing = false;
  async function onEvent(kind, payload) {
    if (payload && typeof payload.seq === "number") lastSeq = payload.seq;
    logEvent(kind, payload);
    if (refreshing) return;
    refreshing = true;
    try {
      job = await api(path);
      showHead();
      if (["pruned", "metric", "checkpoint", "state", "end"].includes(kind) || TERMINAL.has(job.state)) await drawCurve();
      if (TERMINAL.has(job.state)) await finished();
    } catch (e) {
      console.warn(e);
    } finally {
      refreshing = false;
    }
  }

  let following = false;
  async function follow() {
    if (following) return; // one stream at a time (a retry while the last one is still open)
    following = true;
    try {
      await stream();
    } finally {
      following = false;
    }
  }

  async function stream() {
    while (mine === current() && !controller.signal.aborted) {
      try {
        const { ended } = await followEvents(jobId, lastSeq, onEvent, controller.signal);
        if (ended) {
          job = await api(path);
          showHead();
          await drawCurve();
          if (TERMINAL.has(job.state)) {
            await finished();
            return;
          } // retried meanwhile: follow it on
        }
      } catch (e) {
        if (controller.signal.aborted) return;
        if (e instanceof ApiError && e.status >= 400 && e.status < 500) { clear(actions).append(problemBox(e)); return; }
      }
      await new Promise((r) => setTimeout(r, 1000)); // the server ended the stream without `end`: reconnect
    }
  }

  async function finished() {
    if (finishedShown || !TERMINAL.has(job.state)) return;
    finishedShown = true;
    let list = [];
    try {
      list = (await api(`${path}/artifacts`)).data;
    } catch (e) {
      clear(artifacts).append(problemBox(e));
    }
    clear(artifacts).append(list.length
      ? table([
        ["name", (a) => a.name], ["kind", (a) => a.kind], ["size", (a) => bytes(a.size), "num"],
        ["sha256", (a) => h("code", {}, `${a.sha256.slice(0, 16)}…`)],
        ["", (a) => h("button", { type: "button", className: "secondary", "data-download": a.name,
          onclick: () => download(jobId, a.name).catch((e) => artifacts.append(problemBox(e))) }, "Download")],
      ], list, { id: "artifacts-table" })
      : h("p", { className: "muted" }, "No artifacts."));
    const images = list.filter((a) => a.media_type === "image/png" || a.name.endsWith(".png"));
    for (const a of images) {
      try {
        const url = URL.createObjectURL(await fetchArtifact(jobId, a.name));
        artifacts.append(h("figure", {}, h("img", { src: url, alt: a.name, width: 480 }), h("figcaption", { className: "muted" }, a.name)));
      } catch { /* the table still offers it */ }
    }
    if (list.some((a) => a.name === "report.json")) {
      try {
        const text = await (await fetchArtifact(jobId, "report.json")).text();
        renderReport(report, JSON.parse(text));
      } catch (e) {
        report.append(problemBox(e));
      }
    }
  }

  showHead();
  await drawCurve();
  if (TERMINAL.has(job.state)) await finished();
  follow();
}

// The report's speed section as rows: runtime × batch, dense and pruned median ms, speed-up, verdict (or why not).
function speedTable(speed) {
  const rows = [];
  for (const [runtime, e] of Object.entries(speed?.runtimes ?? {})) {
    const batches = Object.keys({ ...(e?.dense ?? {}), ...(e?.pruned ?? {}) }).filter((k) => k.startsWith("batch_"));
    const note = e?.dense?.error ?? e?.pruned?.error ?? e?.why;
    for (const b of batches.length ? batches : ["—"]) {
      rows.push({ runtime, batch: b.replace("batch_", ""), dense: e?.dense?.[b]?.median_ms, pruned: e?.pruned?.[b]?.median_ms,
        speedup: e?.speedup?.[b], verdict: e?.verdict, note });
    }
  }
  const cols = [["runtime", (r) => r.runtime], ["batch", (r) => r.batch, "num"], ["dense ms (median)", (r) => r.dense, "num"],
    ["pruned ms (median)", (r) => r.pruned, "num"], ["dense / pruned", (r) => r.speedup, "num"], ["verdict", (r) => r.verdict],
    ["note", (r) => r.note]];
  return table(cols, rows, { id: "speed-table" });
}

function section(title, ...children) {
  return h("section", { className: "card" }, h("h2", {}, title), ...children);
}

// A table of an object of objects or numbers (e.g. phases: {name: {seconds, peak_bytes}}), or a key-value list.
function anyTable(value) {
  if (Array.isArray(value) && value.length && typeof value[0] === "object") {
    const keys = [...new Set(value.flatMap((r) => Object.keys(r || {})))];
    return table(keys.map((k) => [k, (r) => r?.[k], typeof value[0][k] === "number" ? "num" : undefined]), value);
  }
  if (value && typeof value === "object") {
    const rows = Object.entries(value);
    if (rows.length && rows.every(([, v]) => v && typeof v === "object" && !Array.isArray(v))) {
      const keys = [...new Set(rows.flatMap(([, v]) => Object.keys(v)))];
      return table([["", ([k]) => k], ...keys.map((k) => [k, ([, v]) => (/bytes$/.test(k) ? bytes(v[k]) : v[k]), "num"])], rows);
    }
    return kv(Object.fromEntries(rows.map(([k, v]) => [k, /bytes$/.test(k) && typeof v === "number" ? bytes(v) : v])));
  }
  return h("p", {}, fmt(value));
}

export function renderReport(root, r) {
  clear(root);
  const metric = r.spec?.metric ?? "metric";
  const before = r.metrics?.before;
  const after = r.metrics?.after;
  if (before || after) {
    const rows = [];
    const validation = (m) => m?.validation ?? m?.val;  // reports before wave 2 named the split 'val'
    if (validation(before)) rows.push({ when: "before (validation)", ...validation(before) });
    if (validation(after)) rows.push({ when: "after (validation)", ...validation(after) });
    if (after?.train) rows.push({ when: "after (train)", ...after.train });
    root.append(section("Result", kv({ method: r.method, lambda: r.lambda, "block size": r.block_size,
      target: pct(r.sparsity?.target), "pruned layers": pct(r.sparsity?.pruned_layers), global: pct(r.sparsity?.global),
      device: r.device, "seconds": r.seconds }), anyTable(rows)));
  }
  if (Array.isArray(r.lambda_sweep) && r.lambda_sweep.length) {
    const pts = r.lambda_sweep.filter((e) => e.score != null).map((e) => [e.lambda, e.score]);
    const chosen = r.lambda_sweep.filter((e) => e.lambda === r.lambda && e.score != null).map((e) => [e.lambda, e.score]);
    const series = [{ name: `${metric} (calibration)`, points: pts }, { name: `chosen λ = ${fmt(r.lambda)}`, points: chosen, line: false }];
    root.append(section("λ sweep", lineChart(series, { title: `${metric} on the calibration split vs λ`, xLabel: "λ (log scale)", yLabel: metric, logX: true, id: "lambda-plot" }),
      legend(series), anyTable(r.lambda_sweep)));
  }
  if (Array.isArray(r.recompute_sweep) && r.recompute_sweep.length) {
    root.append(section(`R sweep (chosen R = ${fmt(r.recompute)}, on the calibration split at the chosen λ)`,
      anyTable(r.recompute_sweep)));
  }
  const steps = r.quadratic_model?.steps;
  if (Array.isArray(steps) && steps.length) {
    const pts = steps.map((s) => [s.predicted_loss_change, s.actual_loss_change]);
    root.append(section("Quadratic model: predicted vs actual loss change per pruning step",
      lineChart([{ name: "pruning steps", points: pts, line: false }], { title: "actual vs predicted ΔL (dashed: equal)", xLabel: "predicted ΔL", yLabel: "actual ΔL", diagonal: true, id: "quadratic-plot" }),
      h("p", {}, `least-squares scale actual ≈ k · predicted: k = ${fmt(r.quadratic_model.fitted_scale)}`),
      anyTable(steps)));
  }
  if (Array.isArray(r.layers) && r.layers.length) {
    root.append(section("Per-layer sparsity",
      barChart(r.layers.map((l) => ({ label: l.name, value: l.sparsity })), { title: "fraction of weights pruned", format: pct, id: "layers-plot" }),
      anyTable(r.layers.map((l) => ({ ...l, shape: Array.isArray(l.shape) ? `[${l.shape.join(", ")}]` : l.shape })))));
  }
  const memory = [];
  if (r.memory_plan) memory.push(h("h3", {}, "plan (a pruning step)"), anyTable(r.memory_plan));
  for (const k of ["peak_memory", "phases"]) if (r[k] != null) memory.push(h("h3", {}, k.replace("_", " ")), anyTable(r[k]));
  if (memory.length) root.append(section("Memory: plan and measured", ...memory));
  const sizes = [];
  for (const k of ["parameters", "macs", "size", "sizes", "latency"]) if (r[k] != null) sizes.push(h("h3", {}, k), anyTable(r[k]));
  if (r.speed?.runtimes) {
    sizes.push(h("h3", {}, `latency: ${r.speed.statistic ?? "median"}, ${r.speed.threads ?? "?"} thread(s)`), speedTable(r.speed));
  }
  if (sizes.length) root.append(section("Size and latency", ...sizes));
  if (r.onnx_error) root.append(section("ONNX export", h("p", { className: "error" }, r.onnx_error)));
  const other = Object.fromEntries(Object.entries(r).filter(([k]) => !KNOWN.has(k)));
  if (Object.keys(other).length) root.append(section("Other report fields", anyTable(other)));
  root.append(h("details", {}, h("summary", {}, "report.json"), h("pre", {}, JSON.stringify(r, null, 2))));
}
