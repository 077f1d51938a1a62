// The JSON API, with the key kept for this browser session only (sessionStorage; sent as the Authorization
// header, never in a URL). Errors are RFC 9457 problems (ApiError.problem).

const KEY = "arborist.api-key";

export const getKey = () => sessionStorage.getItem(KEY);
export const setKey = (key) => sessionStorage.setItem(KEY, key);
export const clearKey = () => sessionStorage.removeItem(KEY);

export class ApiError extends Error {
  constructor(problem, status) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.problem = problem;
    this.status = status;
  }
}

function auth(headers = {}) {
  return { ...headers, Authorization: `Bearer ${getKey()}` };
}

async function problemOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body === "object") return body;
  } catch { /* not JSON */ }
  return { title: response.statusText || "Error", status: response.status, detail: text.slice(0, 500) };
}

export async function api(path, { method = "GET", json, signal } = {}) {
  const headers = auth();
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers, body, signal, cache: "no-store" });
  if (!response.ok) throw new ApiError(await problemOf(response), response.status);
  if (response.status === 204) return null;
  return response.json();
}

// Every page of a list endpoint (`/v1/models`, ...), following next_cursor.
export async function listAll(path, max = 1000) {
  const rows = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=100${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    rows.push(...page.data);
    cursor = page.next_cursor;
  } while (cursor && rows.length < max);
  return rows;
}

// A multipart upload through XMLHttpRequest, whose upload progress events fetch() does not give.
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Authorization", `Bearer ${getKey()}`);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    });
    xhr.addEventListener("load", () => {
      let body;
      try { body = JSON.parse(xhr.responseText); } catch { body = { title: xhr.statusText, detail: xhr.responseText } }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(body, xhr.status));
    });
    xhr.addEventListener("error", () => reject(new ApiError({ title: "Network error" }, 0)));
    xhr.send(form);
  });
}

// The job's event stream (SSE) read with fetch, since EventSource cannot send the Authorization header.
// Calls onEvent(kind, payload) per event; resolves when the stream ends (`end`, or the server closed it).
export async function followEvents(jobId, after, onEvent, signal) {
  const headers = auth({ Accept: "text/event-stream" });
  const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events?after=${after}`, { headers, signal });
  if (!response.ok) throw new ApiError(await problemOf(response), response.status);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let kind = "message";
  let data = [];
  let id = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return { ended: false, lastId: after };
    buffer += value;
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).replace(/\r$/, "");
      buffer = buffer.slice(nl + 1);
      if (line === "") {
        if (data.length) {
          let payload;
          try { payload = JSON.parse(data.join("\n")); } catch { payload = data.join("\n"); }
          if (id !== null) after = id;
          onEvent(kind, payload);
          if (kind === "end") return { ended: true, lastId: after };
        }
        kind = "message"; data = []; id = null;
      } else if (line.startsWith("event:")) kind = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      else if (line.startsWith("id:")) id = Number(line.slice(3).trim());
    }
  }
}

// An artifact fetched with the key, then saved through a blob URL.
export async function fetchArtifact(jobId, name) {
  const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/artifacts/${encodeURIComponent(name)}`, {
    headers: auth(),
  });
  if (!response.ok) throw new ApiError(await problemOf(response), response.status);
  return response.blob();
}

export async function download(jobId, name) {
  const blob = await fetchArtifact(jobId, name);
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
