// A VM's page: header with power actions, and tabs (summary, consoles, hardware,
// snapshots, metrics, task log). Tabs with their own modules load on demand.

import { ApiError, del, enc, get, patch, post } from "../api.js";
import * as live from "../live.js";
import { $, badge, bytes, confirmAction, formValues, html, mib, setHtml, showError, vmHref, when } from "../util.js";
import { actionButtons, ipsOf } from "./vms.js";

const TABS = [
  ["summary", "Summary"],
  ["serial", "Serial console"],
  ["display", "Graphical console"],
  ["hardware", "Hardware"],
  ["snapshots", "Snapshots"],
  ["metrics", "Metrics"],
  ["tasks", "Task log"],
];

export async function render(main, name, tab = "summary") {
  if (!TABS.some(([id]) => id === tab)) tab = "summary";
  let vm;
  try {
    vm = await get(`/api/vms/${enc(name)}`);
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 404) throw error;
    setHtml(main, html`<h1>${name}</h1><p class="error" role="alert">${error.message}</p><p><a href="#/vms">All VMs</a></p>`);
    return null;
  }
  setHtml(
    main,
    html`<div class="vm-head">
      <h1 data-testid="vm-name">${vm.name}</h1><span id="vm-state"></span>
      <span class="spacer"></span><div class="actions" id="vm-actions"></div>
    </div>
    <nav class="tabs" aria-label="VM sections">${TABS.map(
      ([id, label]) => html`<a href="${vmHref(vm.name, id)}" data-testid="tab-${id}" ${id === tab ? html`aria-current="page"` : ""}>${label}</a>`,
    )}</nav>
    <section id="tab-panel" data-tab="${tab}"></section>`,
  );
  const panel = $("#tab-panel");
  const ctx = { vm, panel, refresh: null, onVmChange: null };

  function paintHead() {
    setHtml($("#vm-state"), html`${badge(ctx.vm.state)} <span class="muted">${ctx.vm.state_reason}</span>`);
    setHtml($("#vm-actions"), html`${actionButtons(ctx.vm)}`);
  }
  ctx.refresh = async () => {
    try {
      ctx.vm = await get(`/api/vms/${enc(name)}`);
    } catch (error) {
      if (error.status === 404) {
        location.hash = "#/vms";
        return;
      }
      throw error;
    }
    paintHead();
    if (ctx.onVmChange) ctx.onVmChange(ctx.vm);
  };
  paintHead();

  $("#vm-actions").addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    button.disabled = true;
    try {
      await live.runJob(`${button.dataset.action} ${name}`, post(`/api/vms/${enc(name)}/${button.dataset.action}`));
    } catch (error) {
      showError(error);
    }
    await ctx.refresh().catch(showError);
  });

  const offVm = live.on("vm", (event) => {
    if (event.uuid !== ctx.vm.uuid) return;
    if (event.deleted) {
      location.hash = "#/vms";
      return;
    }
    ctx.vm = { ...ctx.vm, state: event.state, state_reason: event.reason ?? ctx.vm.state_reason };
    paintHead();
    ctx.refresh().catch(showError);
  });
  const offResync = live.on("resync", () => ctx.refresh().catch(showError));

  let disposeTab = null;
  if (tab === "summary") disposeTab = summaryTab(ctx);
  else if (tab === "hardware") disposeTab = await hardwareTab(ctx);
  else if (tab === "tasks") disposeTab = await tasksTab(ctx);
  else if (tab === "metrics") disposeTab = await metricsTab(ctx);
  else if (tab === "snapshots") disposeTab = await (await import("./vm_snapshots.js")).render(ctx);
  else disposeTab = await (await import("./console.js")).render(ctx, tab === "serial" ? "serial" : "vnc");

  return () => {
    offVm();
    offResync();
    if (disposeTab) disposeTab();
  };
}

// -- summary -----------------------------------------------------------------------

function summaryTab(ctx) {
  const paint = (vm) =>
    setHtml(
      ctx.panel,
      html`<div class="summary-grid">
      <div class="card"><h2 style="margin-top:0">Overview</h2><dl class="props" data-testid="vm-summary">
        <dt>State</dt><dd>${badge(vm.state)} ${vm.state_reason}</dd>
        <dt>Desired</dt><dd>${vm.desired_state}</dd>
        <dt>Description</dt><dd>${vm.description || "–"}</dd>
        <dt>Generation</dt><dd>${vm.generation} (${vm.machine})</dd>
        <dt>vCPUs</dt><dd>${vm.vcpus}</dd>
        <dt>Memory</dt><dd>${mib(vm.memory_mib)}</dd>
        <dt>IP</dt><dd class="mono" data-testid="vm-ip">${ipsOf(vm) || "–"}</dd>
        <dt>Node</dt><dd>${vm.node || "–"}</dd>
        <dt>Accelerator</dt><dd>${vm.accel || "–"}</dd>
        <dt>PID</dt><dd>${vm.pid || "–"}</dd>
        <dt>Autostart</dt><dd>${vm.autostart ? "yes" : "no"}</dd>
        <dt>Cloud-init</dt><dd>${vm.cloud_init ? vm.cloud_init_instance_id : "off"}</dd>
        <dt>Template</dt><dd>${vm.is_template ? "yes" : "no"}</dd>
        <dt>UUID</dt><dd class="mono">${vm.uuid}</dd>
        <dt>Created</dt><dd>${when(vm.created_at)}</dd>
      </dl></div>
      <div>
        <form class="card" id="edit-form" data-testid="edit-form"><h2 style="margin-top:0">Settings</h2><div class="form-grid">
          <label>vCPUs <input name="vcpus" type="number" min="1" value="${vm.vcpus}"></label>
          <label>Memory (MiB) <input name="memory_mib" type="number" min="32" value="${vm.memory_mib}"></label>
          <label>Description <input name="description" value="${vm.description}"></label>
          <label class="inline"><input type="checkbox" name="autostart" ${vm.autostart ? html`checked` : ""}> Autostart</label>
        </div><p><button type="submit">Save</button> <span class="muted">vCPUs and memory apply at the next start.</span></p></form>
        <form class="card" id="clone-form" data-testid="clone-form" style="margin-top:1rem"><h2 style="margin-top:0">Clone</h2><div class="form-grid">
          <label>New name <input name="name" required data-testid="clone-name"></label>
          ${vm.is_template ? html`<label class="inline"><input type="checkbox" name="linked" checked> Linked clone</label>` : ""}
          <label class="inline"><input type="checkbox" name="start"> Start it</label>
        </div><p><button type="submit" data-testid="clone-submit">Clone</button></p></form>
        <div class="card" style="margin-top:1rem"><h2 style="margin-top:0">Other actions</h2><div class="actions">
          <button type="button" id="make-template" data-testid="make-template" ${vm.is_template || vm.state !== "stopped" ? html`disabled` : ""}>Convert to template</button>
          <button type="button" class="danger" id="delete-vm" data-testid="delete-vm">Delete VM</button>
        </div></div>
      </div></div>`,
    );
  paint(ctx.vm);
  ctx.onVmChange = (vm) => {
    if (!ctx.panel.contains(document.activeElement) || document.activeElement === document.body) paint(vm);
  };
  const name = ctx.vm.name;
  ctx.panel.addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const v = formValues(form);
    const button = form.querySelector('button[type="submit"]');
    button.disabled = true;
    try {
      if (form.id === "edit-form") {
        await patch(`/api/vms/${enc(name)}`, {
          vcpus: Number(v.vcpus),
          memory_mib: Number(v.memory_mib),
          description: v.description,
          autostart: v.autostart,
        });
        await ctx.refresh();
      } else if (form.id === "clone-form") {
        const body = { name: v.name, start: v.start };
        if ("linked" in v) body.linked = v.linked;
        const job = await live.runJob(`clone ${name} as ${v.name}`, post(`/api/vms/${enc(name)}/clone`, body));
        if (job.state === "succeeded") location.hash = vmHref(v.name);
      }
    } catch (error) {
      showError(error);
    } finally {
      button.disabled = false;
    }
  });
  ctx.panel.addEventListener("click", async (event) => {
    const id = event.target.id;
    if (id === "make-template" && confirmAction(`Make ${name} a template? Its disks become read-only.`)) {
      await live.runJob(`template ${name}`, post(`/api/vms/${enc(name)}/template`)).catch(showError);
      await ctx.refresh().catch(showError);
    } else if (id === "delete-vm" && confirmAction(`Delete ${name} and its disks?`)) {
      const force = ctx.vm.state !== "stopped";
      const job = await live.runJob(`delete ${name}`, del(`/api/vms/${enc(name)}${force ? "?force=true" : ""}`)).catch(showError);
      if (job && job.state === "succeeded") location.hash = "#/vms";
    }
  });
  return () => {
    ctx.onVmChange = null;
  };
}

// -- hardware ----------------------------------------------------------------------

async function hardwareTab(ctx) {
  const name = ctx.vm.name;
  const [isos, networks] = await Promise.all([get("/api/isos"), get("/api/networks")]);
  const isoOptions = isos.map((i) => html`<option value="${i.name}">${i.name}</option>`);
  const paint = (vm) =>
    setHtml(
      ctx.panel,
      html`<h2>Disks</h2><div class="table-wrap"><table data-testid="disks">
        <thead><tr><th>#</th><th>Source</th><th>Format</th><th class="num">Size</th><th>Path</th></tr></thead>
        <tbody>${vm.disks.length ? vm.disks.map((d) => html`<tr><td>${d.index}</td><td>${d.source}${d.image ? ` (${d.image})` : ""}</td><td>${d.format}</td><td class="num">${bytes(d.size_bytes)}</td><td class="mono">${d.path}</td></tr>`) : html`<tr><td colspan="5" class="empty">No disks</td></tr>`}</tbody></table></div>
      <h2>CD-ROM drives</h2><div class="table-wrap"><table data-testid="cdroms">
        <thead><tr><th>#</th><th>Medium</th><th>Actions</th></tr></thead>
        <tbody>${vm.cdroms.length ? vm.cdroms.map((c) => html`<tr data-drive="${c.index}"><td>${c.index}</td><td>${c.iso ? html`<span title="${c.iso}">${c.iso.split("/").pop()}</span>` : html`<span class="muted">empty</span>`}</td>
          <td><div class="row"><select aria-label="ISO for drive ${c.index}" data-role="iso">${isoOptions}</select>
          <button type="button" class="small" data-op="insert" ${isos.length ? "" : html`disabled`}>Insert</button>
          <button type="button" class="small" data-op="eject" ${c.iso ? "" : html`disabled`}>Eject</button></div></td></tr>`) : html`<tr><td colspan="3" class="empty">No CD-ROM drives</td></tr>`}</tbody></table></div>
      <h2>Network cards</h2><div class="table-wrap"><table data-testid="nics">
        <thead><tr><th>#</th><th>MAC</th><th>Model</th><th>Network</th><th>IP</th><th>Link</th><th>Actions</th></tr></thead>
        <tbody>${vm.nics.length ? vm.nics.map((n) => html`<tr data-nic="${n.index}"><td>${n.index}</td><td class="mono">${n.mac}</td><td>${n.model || "–"}</td><td>${n.network || n.backend}</td><td class="mono">${n.ip || n.reserved_ip || "–"}</td>
          <td>${n.link_up ? badge("up") : badge("down")}</td>
          <td><div class="actions"><button type="button" class="small" data-op="link">${n.link_up ? "Unplug cable" : "Plug cable"}</button>
          <button type="button" class="small danger" data-op="remove-nic">Remove</button></div></td></tr>`) : html`<tr><td colspan="7" class="empty">No network cards</td></tr>`}</tbody></table></div>
      ${networks.length
        ? html`<form class="row" id="add-nic" style="margin-top:0.75rem">
        <label>Network <select name="network" required>${networks.map((n) => html`<option value="${n.name}">${n.name}</option>`)}</select></label>
        <label>Model <select name="model"><option value="">default</option><option>virtio</option><option>e1000</option></select></label>
        <button type="submit">Add network card</button></form>`
        : html`<p class="muted">To add a network card, first create a network on the <a href="#/networks">Networks</a> page.</p>`}`,
    );
  paint(ctx.vm);
  ctx.onVmChange = paint;
  const job = (label, call) => live.runJob(label, call).then(() => ctx.refresh(), showError);
  ctx.panel.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-op]");
    if (!button) return;
    const row = button.closest("tr");
    const op = button.dataset.op;
    if (op === "insert") {
      const iso = row.querySelector('[data-role="iso"]').value;
      job(`insert ${iso}`, post(`/api/vms/${enc(name)}/cdroms/${row.dataset.drive}/insert`, { iso }));
    } else if (op === "eject") {
      job("eject", post(`/api/vms/${enc(name)}/cdroms/${row.dataset.drive}/eject`));
    } else if (op === "link") {
      const nic = ctx.vm.nics.find((n) => String(n.index) === row.dataset.nic);
      job("link", post(`/api/vms/${enc(name)}/nics/${row.dataset.nic}/link`, { up: !nic.link_up }));
    } else if (op === "remove-nic" && confirmAction(`Remove network card ${row.dataset.nic}?`)) {
      job("remove NIC", del(`/api/vms/${enc(name)}/nics/${row.dataset.nic}`));
    }
  });
  ctx.panel.addEventListener("submit", (event) => {
    event.preventDefault();
    const v = formValues(event.target);
    job("add NIC", post(`/api/vms/${enc(name)}/nics`, { network: v.network, ...(v.model ? { model: v.model } : {}) }));
  });
  return () => {
    ctx.onVmChange = null;
  };
}

// -- metrics -----------------------------------------------------------------------

async function metricsTab(ctx) {
  const { chartGrid, VM_CHARTS, rangePicker } = await import("../charts.js");
  setHtml(ctx.panel, html`<div class="toolbar"><span class="spacer"></span><div id="vm-range"></div></div><div id="vm-charts"></div><p class="muted" id="metrics-note"></p>`);
  const charts = chartGrid($("#vm-charts"), VM_CHARTS);
  let range = "hour";
  const refresh = async () => {
    try {
      charts.update(await get(`/api/vms/${enc(ctx.vm.name)}/metrics?range=${range}`));
    } catch (error) {
      $("#metrics-note").textContent = error.message;
    }
  };
  rangePicker($("#vm-range"), range, (r) => {
    range = r;
    refresh();
  });
  await refresh();
  const timer = setInterval(() => document.visibilityState === "visible" && refresh(), 5000);
  return () => {
    clearInterval(timer);
    charts.destroy();
  };
}

// -- task log ----------------------------------------------------------------------

async function tasksTab(ctx) {
  const target = `vm:${ctx.vm.uuid}`;
  const { handleJobClicks, jobTable, jobRowHtml } = await import("./jobs.js");
  let jobs = (await get("/api/jobs?limit=1000")).filter((j) => j.target === target);
  const paint = () => setHtml(ctx.panel, html`${jobTable(jobs, "vm-tasks")}<div id="job-detail"></div>`);
  paint();
  handleJobClicks(ctx.panel);
  const offJob = live.on("job", (job) => {
    if (job.target !== target) return;
    const row = ctx.panel.querySelector(`tr[data-job="${CSS.escape(job.id)}"]`);
    if (row) {
      const tpl = document.createElement("template");
      tpl.innerHTML = jobRowHtml(job).text;
      row.replaceWith(tpl.content.firstElementChild);
    } else {
      jobs = [job, ...jobs];
      paint();
    }
  });
  return offJob;
}
