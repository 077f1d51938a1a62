// A form generated from a JSON Schema (the job spec's: /ui/spec-schema.json): one input per field, defaults filled
// in, help text from the field descriptions, nested objects as fieldsets. values() gives the fields the user set
// (differing from the default, or required); showErrors() puts a problem's `errors` (loc) at their fields.

import { h } from "./dom.js";

function resolve(schema, root) {
  let s = schema || {};
  while (s.$ref) s = { ...root.$defs[s.$ref.split("/").pop()], ...Object.fromEntries(Object.entries(s).filter(([k]) => k !== "$ref")) };
  if (s.allOf && s.allOf.length === 1) s = { ...resolve(s.allOf[0], root), ...s, allOf: undefined };
  return s;
}

// What a field is: {kind: select|checkbox|number|text|list|object, options, nullable, itemType}
function kindOf(schema, root) {
  const s = resolve(schema, root);
  if (s.type === "object" && s.properties) return { kind: "object", schema: s };
  if (s.enum) return { kind: "select", options: s.enum, nullable: false };
  if (s.type === "boolean") return { kind: "checkbox" };
  if (s.type === "integer" || s.type === "number") return { kind: "number", integer: s.type === "integer" };
  if (s.type === "array") return { kind: "list", itemType: resolve(s.items, root).type };
  if (s.anyOf) {
    const parts = s.anyOf.map((p) => resolve(p, root));
    const nullable = parts.some((p) => p.type === "null");
    const rest = parts.filter((p) => p.type !== "null");
    if (rest.length === 1) {
      const k = kindOf(rest[0], root);
      return { ...k, nullable };
    }
    return { kind: "text", nullable, choices: rest.filter((p) => p.const !== undefined).map((p) => p.const) };
  }
  return { kind: "text" };
}

function shown(value) {
  if (value === null || value === undefined) return "";
  if (Array.isArray(value)) return value.join(", ");
  return String(value);
}

function parseScalar(text, integer) {
  const t = text.trim();
  if (t === "") return undefined;
  const n = Number(t);
  if (t !== "" && Number.isFinite(n)) return integer && Number.isInteger(n) ? n : n;
  return t; // left for the server to judge (it answers with a field error)
}

export class SchemaForm {
  constructor(schema, { prefix = [] } = {}) {
    this.root = schema;
    this.prefix = prefix;
    this.fields = new Map(); // "fisher.samples" -> {input, kind, def, required, error}
    this.element = h("div", { className: "schema-form" }, this.#object(schema, [], schema.required || []));
  }

  #object(schema, path, required) {
    const nodes = [];
    for (const [name, raw] of Object.entries(schema.properties || {})) {
      const s = resolve(raw, this.root);
      const k = kindOf(raw, this.root);
      const p = [...path, name];
      if (s.const !== undefined) continue; // e.g. version: nothing to choose
      if (k.kind === "object") {
        const inner = this.#object(k.schema, p, k.schema.required || []);
        const desc = raw.description || k.schema.description;
        nodes.push(h("fieldset", { "data-path": p.join(".") }, h("legend", {}, name), desc && h("p", { className: "help muted" }, desc), inner));
        continue;
      }
      nodes.push(this.#field(name, p, raw, s, k, required.includes(name)));
    }
    return nodes;
  }

  #field(name, path, raw, s, k, required) {
    const key = path.join(".");
    const id = `f-${key.replace(/\W/g, "-")}`;
    const def = raw.default !== undefined ? raw.default : s.default;
    let input;
    if (k.kind === "select") {
      const opts = k.nullable ? [h("option", { value: "" }, "(default)")] : [];
      for (const o of k.options) opts.push(h("option", { value: String(o) }, String(o)));
      input = h("select", { id, name: key }, opts);
      input.value = shown(def);
    } else if (k.kind === "checkbox") {
      input = h("input", { id, name: key, type: "checkbox" });
      input.checked = Boolean(def);
    } else {
      const hint = k.kind === "list" ? "comma-separated" : k.choices?.length ? `a number or ${k.choices.map((c) => `'${c}'`).join(" / ")}` : k.nullable ? "empty: default" : "";
      input = h("input", { id, name: key, type: "text", placeholder: hint || null, inputmode: k.kind === "number" ? "decimal" : null });
      input.value = shown(def);
      if (required) input.required = true;
    }
    const desc = raw.description || s.description;
    const error = h("span", { className: "field-error", "data-error-for": key });
    const row = h("div", { className: "form-row", "data-path": key },
      h("label", { for: id, className: "label" }, `${name}${required ? " *" : ""}`), input,
      desc && h("span", { className: "help" }, desc), error);
    this.fields.set(key, { input, kind: k, def, required, error, row });
    return row;
  }

  // The spec object: fields set to something other than their default (and the required ones).
  values() {
    const out = {};
    for (const [key, f] of this.fields) {
      let value;
      let same;
      if (f.kind.kind === "checkbox") {
        value = f.input.checked;
        same = value === Boolean(f.def);
      } else {
        const text = f.input.value;
        same = text === shown(f.def);
        if (text.trim() === "") value = f.kind.nullable || f.def === null ? null : undefined;
        else if (f.kind.kind === "list") {
          value = text.split(",").map((x) => x.trim()).filter(Boolean).map((x) => (f.kind.itemType === "number" || f.kind.itemType === "integer" ? parseScalar(x) : x));
        } else if (f.kind.kind === "number" || f.kind.kind === "text") value = parseScalar(text, f.kind.integer);
        else value = text;
      }
      if ((same && !f.required) || value === undefined) continue;
      const parts = key.split(".");
      let node = out;
      for (const p of parts.slice(0, -1)) node = node[p] ??= {};
      node[parts.at(-1)] = value;
    }
    return out;
  }

  clearErrors() {
    for (const f of this.fields.values()) {
      f.error.textContent = "";
      f.input.classList.remove("invalid");
      f.input.removeAttribute("aria-invalid");
    }
  }

  // Shows each error at the longest prefix of its loc (after `prefix`) that names a field; returns those placed
  // nowhere.
  showErrors(errors) {
    const rest = [];
    for (const e of errors || []) {
      const loc = (e.loc || []).map(String);
      const start = this.prefix.every((p, i) => loc[i] === p) ? this.prefix.length : -1;
      let placed = false;
      if (start >= 0) {
        for (let end = loc.length; end > start && !placed; end--) {
          const f = this.fields.get(loc.slice(start, end).join("."));
          if (f) {
            f.error.textContent = f.error.textContent ? `${f.error.textContent}; ${e.msg}` : e.msg;
            f.input.classList.add("invalid");
            f.input.setAttribute("aria-invalid", "true");
            placed = true;
          }
        }
      }
      if (!placed) rest.push(e);
    }
    return rest;
  }
}
