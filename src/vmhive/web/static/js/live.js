// Live updates: one EventSource on /api/events fanned out to the pages, and job
// tracking (a job's progress until it ends) built on it with a polling safety net.

import { get, enc } from "./api.js";
import { notify } from "./util.js";

const listeners = { vm: new Set(), job: new Set(), resync: new Set(), status: new Set() };
let source = null;
let retryTimer = null;
let connected = false;
let lostSinceOpen = false;
const RETRY_MS = 3000;

/** Subscribe to "vm", "job", "resync" (refetch: events may have been missed) or "status". */
export function on(type, handler) {
  listeners[type].add(handler);
  return () => listeners[type].delete(handler);
}

function emit(type, data) {
  for (const handler of listeners[type]) {
    try {
      handler(data);
    } catch (error) {
      console.error(error);
    }
  }
}

function setConnected(value) {
  if (connected === value) return;
  connected = value;
  emit("status", value);
}

export function isConnected() {
  return connected;
}

export function connect() {
  if (source) return;
  clearTimeout(retryTimer);
  source = new EventSource("/api/events");
  source.addEventListener("vm", (e) => emit("vm", JSON.parse(e.data)));
  source.addEventListener("job", (e) => emit("job", JSON.parse(e.data)));
  source.addEventListener("open", () => {
    setConnected(true);
    if (lostSinceOpen) {
      lostSinceOpen = false;
      emit("resync");
    }
  });
  source.addEventListener("error", () => {
    setConnected(false);
    lostSinceOpen = true;
    // The browser retries by itself unless the answer was an error status; then
    // ask an ordinary API call first, which sends an expired session to the login.
    if (source && source.readyState === EventSource.CLOSED) {
      source.close();
      source = null;
      retryTimer = setTimeout(() => get("/api/host").then(connect, (error) => error.status !== 401 && connect()), RETRY_MS);
    }
  });
}

export function disconnect() {
  clearTimeout(retryTimer);
  if (source) source.close();
  source = null;
  lostSinceOpen = false;
  setConnected(false);
}

// -- jobs ---------------------------------------------------------------------------

export const ENDED = new Set(["succeeded", "failed", "cancelled"]);
const tracked = new Map(); // job id -> {resolve, onUpdate}

on("job", (job) => {
  const entry = tracked.get(job.id);
  if (!entry) return;
  entry.onUpdate(job);
  if (ENDED.has(job.state)) finish(job);
});

function finish(job) {
  const entry = tracked.get(job.id);
  if (!entry) return;
  tracked.delete(job.id);
  clearTimeout(entry.timer);
  entry.resolve(job);
}

/**
 * Resolve with the job once it has ended; `onUpdate(job)` on every change.
 * Events carry the progress; a slow poll covers events lost while reconnecting.
 */
export function trackJob(job, onUpdate = () => {}) {
  onUpdate(job);
  if (ENDED.has(job.state)) return Promise.resolve(job);
  return new Promise((resolve) => {
    const entry = { resolve, onUpdate, timer: null };
    tracked.set(job.id, entry);
    const poll = async () => {
      if (!tracked.has(job.id)) return;
      try {
        const fresh = await get(`/api/jobs/${enc(job.id)}`);
        if (!tracked.has(job.id)) return;
        onUpdate(fresh);
        if (ENDED.has(fresh.state)) {
          finish(fresh);
          return;
        }
      } catch {
        // keep polling: the daemon may be restarting
      }
      entry.timer = setTimeout(poll, connected ? 5000 : 1500);
    };
    entry.timer = setTimeout(poll, connected ? 5000 : 1000);
  });
}

/**
 * Submit a job (a promise of the API's 202 answer), show its progress in a
 * notification, and resolve with the ended job; failures show the job's error.
 */
export async function runJob(label, submit) {
  const job = await submit;
  const toast = notify(`${label}: ${job.state}`, "info", { sticky: true });
  toast.dataset.job = job.id;
  const text = toast.querySelector(".toast-text");
  const ended = await trackJob(job, (j) => {
    text.textContent = `${label}: ${j.state}${j.state === "running" ? ` ${j.progress} %` : ""}`;
  });
  toast.remove();
  if (ended.state === "succeeded") notify(`${label}: done`, "ok");
  else notify(`${label}: ${ended.state}${ended.error ? ` — ${ended.error}` : ""}`, "error");
  return ended;
}
