// The dashboard: host use now and over time, VM counts by state.

import { get } from "../api.js";
import * as live from "../live.js";
import { $, badge, bytes, html, percent, setHtml } from "../util.js";

function meter(used, total) {
  const share = total ? Math.min(100, (100 * used) / total) : 0;
  return html`<div class="meter" role="meter" aria-valuemin="0" aria-valuemax="100" aria-valuenow="${share.toFixed(0)}"><span style="width:${share.toFixed(1)}%"></span></div>`;
}

function usageCards(current) {
  if (!current) return html`<p class="muted">No host metrics yet.</p>`;
  return html`
    <div class="card stat" data-testid="host-cpu"><div class="label">CPU</div>
      <div class="value">${percent(current.cpu_percent)}</div>
      <div class="muted">${current.cpus} CPUs</div>${meter(current.cpu_percent, 100)}</div>
    <div class="card stat" data-testid="host-memory"><div class="label">Memory</div>
      <div class="value">${bytes(current.memory_used_bytes)}</div>
      <div class="muted">of ${bytes(current.memory_total_bytes)}</div>${meter(current.memory_used_bytes, current.memory_total_bytes)}</div>
    <div class="card stat" data-testid="host-storage"><div class="label">Storage</div>
      <div class="value">${bytes(current.storage_used_bytes)}</div>
      <div class="muted">of ${bytes(current.storage_total_bytes)}</div>${meter(current.storage_used_bytes, current.storage_total_bytes)}</div>`;
}

function countCards(counts) {
  const states = Object.keys(counts).sort();
  const total = states.reduce((n, s) => n + counts[s], 0);
  return html`<div class="card stat" data-testid="vm-counts"><div class="label">Virtual machines</div>
    <div class="value"><a href="#/vms">${total}</a></div>
    <div class="actions">${states.map((s) => html`<span data-state="${s}">${badge(s)} ${counts[s]}</span>`)}</div></div>`;
}

export async function render(main) {
  setHtml(
    main,
    html`<h1>Dashboard</h1>
    <p class="muted" id="host-line"></p>
    <div class="cards" id="host-cards"></div>
    <div class="toolbar"><h2>Host use</h2><span class="spacer"></span><div id="range"></div></div>
    <div id="host-charts"></div>`,
  );
  const [{ chartGrid, HOST_CHARTS, rangePicker }, host] = await Promise.all([
    import("../charts.js"),
    get("/api/host"),
  ]);
  $("#host-line").textContent =
    `${host.hostname} · ${host.cpus} CPUs · ${host.accel} · QEMU ${host.qemu_version}`;
  const charts = chartGrid($("#host-charts"), HOST_CHARTS);
  let range = "hour";
  let counts = host.vms || {};

  async function refresh() {
    let metrics = null;
    try {
      metrics = await get(`/api/host/metrics?range=${range}`);
    } catch (error) {
      if (error.status !== 404) throw error;
    }
    setHtml($("#host-cards"), html`${usageCards(metrics && metrics.current)}${countCards(counts)}`);
    if (metrics) charts.update(metrics);
  }

  async function refreshCounts() {
    counts = (await get("/api/host")).vms || {};
    await refresh();
  }

  rangePicker($("#range"), range, (r) => {
    range = r;
    refresh();
  });
  await refresh();
  const timer = setInterval(() => document.visibilityState === "visible" && refresh(), 10000);
  let pending = null;
  const offVm = live.on("vm", () => {
    clearTimeout(pending);
    pending = setTimeout(refreshCounts, 300);
  });
  return () => {
    clearInterval(timer);
    clearTimeout(pending);
    offVm();
    charts.destroy();
  };
}
