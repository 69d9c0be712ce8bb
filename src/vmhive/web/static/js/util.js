// Small helpers: escaping HTML templates, formatting, notifications.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

/** Text made safe to put into HTML, in element content and in quoted attributes. */
export function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

/** HTML that is already safe (the result of `html`), passed through as is. */
export class Safe {
  constructor(text) {
    this.text = text;
  }
  toString() {
    return this.text;
  }
}

function fill(value) {
  if (value instanceof Safe) return value.text;
  if (Array.isArray(value)) return value.map(fill).join("");
  if (value === null || value === undefined || value === false) return "";
  return esc(value);
}

/** A tagged template: every interpolated value is escaped unless it is `Safe`. */
export function html(strings, ...values) {
  let out = strings[0];
  for (let i = 0; i < values.length; i++) out += fill(values[i]) + strings[i + 1];
  return new Safe(out);
}

/** Replace an element's content with a `html` template. */
export function setHtml(element, template) {
  element.innerHTML = String(template);
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

export function bytes(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(i === 0 || v >= 100 ? 0 : 1)} ${units[i]}`;
}

export function mib(n) {
  return n >= 1024 && n % 1024 === 0 ? `${n / 1024} GiB` : `${n} MiB`;
}

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

export function percent(n) {
  return n === null || n === undefined ? "–" : `${Number(n).toFixed(1)} %`;
}

/** A VM's name in a URL hash. */
export function vmHref(name, tab) {
  return `#/vms/${encodeURIComponent(name)}${tab ? `/${tab}` : ""}`;
}

export const STATE_CLASS = {
  running: "ok",
  succeeded: "ok",
  stopped: "off",
  paused: "warn",
  queued: "warn",
  starting: "busy",
  stopping: "busy",
  creating: "busy",
  deleting: "busy",
  running_job: "busy",
  crashed: "bad",
  failed: "bad",
  cancelled: "off",
};

export function badge(state) {
  return html`<span class="badge ${STATE_CLASS[state] || "off"}" data-testid="state">${state}</span>`;
}

// -- notifications ----------------------------------------------------------------

/** A message in the corner; errors stay until dismissed, the rest fade after a while. */
export function notify(message, kind = "info", { sticky = kind === "error" } = {}) {
  const area = document.getElementById("toasts");
  const item = document.createElement("div");
  item.className = `toast ${kind}`;
  item.setAttribute("role", kind === "error" ? "alert" : "status");
  item.dataset.testid = `toast-${kind}`;
  setHtml(
    item,
    html`<span class="toast-text"></span><button type="button" class="link" aria-label="Dismiss">×</button>`,
  );
  item.querySelector(".toast-text").textContent = message;
  item.querySelector("button").addEventListener("click", () => item.remove());
  area.append(item);
  if (!sticky) setTimeout(() => item.remove(), 6000);
  return item;
}

export function showError(error) {
  notify(error && error.message ? error.message : String(error), "error");
}

/** Values of a form's named fields, trimmed strings (checkboxes: booleans). */
export function formValues(form) {
  const values = {};
  for (const el of form.elements) {
    if (!el.name) continue;
    if (el.type === "checkbox") values[el.name] = el.checked;
    else if (el.type === "radio") {
      if (el.checked) values[el.name] = el.value;
    } else if (el.type !== "file") values[el.name] = el.value.trim();
  }
  return values;
}

/** Run an async action from a button or form, disabling it meanwhile and showing errors. */
export async function busy(control, action) {
  if (control) control.disabled = true;
  try {
    return await action();
  } catch (error) {
    showError(error);
    return undefined;
  } finally {
    if (control) control.disabled = false;
  }
}

/** Confirm a destructive action (a native dialog: accessible and small). */
export function confirmAction(text) {
  return window.confirm(text);
}

/** Add a stylesheet once (for the vendor modules loaded on demand). */
export function loadCss(href) {
  if (document.querySelector(`link[href="${href}"]`)) return;
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = href;
  document.head.append(link);
}
