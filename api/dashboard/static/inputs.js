// Models and datasets: list, upload (with a progress bar), delete, and what the service detected.

import { api, listAll, upload } from "./api.js";
import { problemBox } from "./common.js";
import { bytes, clear, fmt, h, kv, table } from "./dom.js";

const KINDS = {
  models: {
    title: "Models",
    path: "/v1/models",
    columns: [
      ["format", (r) => r.format],
      ["architecture", (r) => r.arch ?? r.hf_type ?? r.hf_architecture ?? "–"],
      ["parameters", (r) => r.num_parameters, "num"],
      ["size", (r) => bytes(r.size), "num"],
    ],
    shown: ["id", "name", "format", "arch", "num_parameters", "size", "created_at"],
    extraFields: [
      ["arch", "architecture of the zoo (safetensors only), e.g. mlp"],
      ["arch_kwargs", 'its arguments as JSON, e.g. {"in_features": 64, "hidden": [64], "num_classes": 10}'],
    ],
    accept: ".safetensors,.onnx,.zip",
  },
  datasets: {
    title: "Datasets",
    path: "/v1/datasets",
    columns: [
      ["format", (r) => r.format],
      ["examples", (r) => r.num_examples, "num"],
      ["input shape", (r) => (r.input_shape ? `[${r.input_shape.join(", ")}]` : "–")],
      ["classes", (r) => r.num_classes, "num"],
      ["size", (r) => bytes(r.size), "num"],
    ],
    shown: ["id", "name", "format", "num_examples", "input_shape", "num_classes", "size", "created_at"],
    extraFields: [],
    accept: ".npz,.safetensors,.parquet",
  },
};

export async function inputsView(root, kind) {
  const k = KINDS[kind];
  const list = h("div", { id: `${kind}-list` }, h("p", { className: "muted" }, "loading…"));
  const status = h("div", { className: "upload-status" });
  const bar = h("progress", { max: 1, value: 0, id: "upload-progress", hidden: true });
  const file = h("input", { type: "file", name: "file", required: true, accept: k.accept, id: `${kind}-file` });
  const name = h("input", { type: "text", name: "name", placeholder: "default: the file's name", id: `${kind}-name` });
  const extras = k.extraFields.map(([n, help]) => [n, h("input", { type: "text", name: n, id: `${kind}-${n}`, placeholder: help, size: 60 })]);
  const form = h("form", { className: "stack", id: `${kind}-upload` },
    h("label", {}, "file ", file),
    h("label", {}, "name ", name),
    extras.map(([n, input]) => h("label", {}, `${n} `, input)),
    h("button", { type: "submit" }, "Upload"), " ", bar, status);

  async function refresh() {
    try {
      const rows = await listAll(k.path);
      clear(list).append(rows.length ? render(rows) : h("p", { className: "muted" }, `No ${kind} yet.`));
    } catch (e) {
      clear(list).append(problemBox(e));
    }
  }

  function render(rows) {
    return table([
      ["name", (r) => h("span", { className: "name" }, r.name)],
      ...k.columns,
      ["detected", (r) => h("details", {}, h("summary", {}, "details"), kv(r, k.shown.filter((x) => x !== "id")))],
      ["id", (r) => h("code", {}, r.id)],
      ["", (r) => h("button", { type: "button", className: "danger", "data-delete": r.id, onclick: () => remove(r) }, "Delete")],
    ], rows, { id: `${kind}-table` });
  }

  async function remove(row) {
    if (!window.confirm(`Delete ${row.name}?`)) return;
    try {
      await api(`${k.path}/${encodeURIComponent(row.id)}`, { method: "DELETE" });
      await refresh();
    } catch (e) {
      clear(status).append(problemBox(e));
    }
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const data = new FormData();
    data.append("file", file.files[0]);
    if (name.value.trim()) data.append("name", name.value.trim());
    for (const [n, input] of extras) if (input.value.trim()) data.append(n, input.value.trim());
    bar.hidden = false;
    bar.value = 0;
    clear(status).append("uploading…");
    try {
      const row = await upload(k.path, data, (f) => { bar.value = f; });
      bar.value = 1;
      clear(status).append(h("span", { className: "uploaded" }, `Uploaded ${row.name} (${row.id}).`));
      form.reset();
      await refresh();
    } catch (e) {
      bar.hidden = true;
      clear(status).append(problemBox(e));
    }
  });

  clear(root).append(h("h1", {}, k.title), h("section", { className: "card" }, h("h2", {}, "Upload"), form), list);
  await refresh();
}

