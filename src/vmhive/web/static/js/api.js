// The REST API: JSON in and out, the CSRF header on every state-changing call,
// errors turned into exceptions carrying the server's `detail`.

let csrfToken = null;
let unauthorizedHandler = null;

export function setCsrf(token) {
  csrfToken = token;
}

/** Called when a request answers 401 (the session expired or was logged out). */
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

/** The message of an error answer: FastAPI's `detail`, a string or a list of problems. */
export function errorDetail(data, status) {
  const detail = data && typeof data === "object" ? data.detail : null;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((p) => {
        const where = (p.loc || []).filter((part) => part !== "body").join(".");
        return where ? `${where}: ${p.msg}` : p.msg;
      })
      .join("; ");
  }
  return `the server answered ${status}`;
}

function headersFor(method, json) {
  const headers = { Accept: "application/json" };
  if (json) headers["Content-Type"] = "application/json";
  if (!["GET", "HEAD"].includes(method) && csrfToken) headers["X-CSRF-Token"] = csrfToken;
  return headers;
}

export async function api(method, path, body) {
  const init = { method, headers: headersFor(method, body !== undefined), credentials: "same-origin" };
  if (body !== undefined) init.body = JSON.stringify(body);
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "cannot reach the vmhive daemon");
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!response.ok) {
    if (response.status === 401 && unauthorizedHandler && !path.startsWith("/api/auth/")) {
      unauthorizedHandler();
    }
    throw new ApiError(response.status, errorDetail(data, response.status));
  }
  return data;
}

export const get = (path) => api("GET", path);
export const post = (path, body = {}) => api("POST", path, body);
export const put = (path, body) => api("PUT", path, body);
export const patch = (path, body) => api("PATCH", path, body);
export const del = (path) => api("DELETE", path);

export const enc = encodeURIComponent;

/**
 * PUT a file as the raw request body with XMLHttpRequest (fetch reports no upload
 * progress). `onProgress(fraction)`; resolves with the answer's JSON (a job).
 */
export function upload(path, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", path);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    if (csrfToken) xhr.setRequestHeader("X-CSRF-Token", csrfToken);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    });
    xhr.addEventListener("load", () => {
      let data = null;
      try {
        data = JSON.parse(xhr.responseText);
      } catch {
        data = null;
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else reject(new ApiError(xhr.status, errorDetail(data, xhr.status)));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "the upload failed")));
    xhr.addEventListener("abort", () => reject(new ApiError(0, "the upload was cancelled")));
    xhr.send(file);
  });
}
