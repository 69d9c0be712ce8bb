// The VM list: one innerHTML pass for all rows, rows replaced in place on events.

import { enc, get, post } from "../api.js";
import * as live from "../live.js";
import { $, badge, html, mib, setHtml, showError, vmHref } from "../util.js";

/** The power actions a VM in `state` offers: [action, label], in display order. */
export function powerActions(vm) {
  if (vm.is_template) return [];
  switch (vm.state) {
    case "stopped":
    case "crashed":
      return [["start", "Start"]];
    case "running":
      return [
        ["stop", "Shut down"],
        ["reboot", "Reboot"],
        ["pause", "Pause"],
        ["force-stop", "Power off"],
      ];
    case "paused":
      return [
        ["resume", "Resume"],
        ["force-stop", "Power off"],
      ];
    case "starting":
    case "stopping":
      return [["force-stop", "Power off"]];
    default:
      return [];
  }
}

export function actionButtons(vm) {
  return powerActions(vm).map(
    ([action, label]) =>
      html`<button type="button" class="small" data-action="${action}" data-testid="action-${action}" aria-label="${label} ${vm.name}">${label}</button>`,
  );
}

export function ipsOf(vm) {
  return vm.nics
    .map((nic) => nic.ip || nic.reserved_ip)
    .filter(Boolean)
    .join(", ");
}

/** Data that prefetch.js asked for while the page loaded, once (null: ask again). */
function takePrefetch(path) {
  const prefetched = window.vmhivePrefetch && window.vmhivePrefetch[path];
  if (prefetched) delete window.vmhivePrefetch[path];
  return prefetched || null;
}

function rowHtml(vm) {
  return html`<tr data-uuid="${vm.uuid}" data-name="${vm.name}" data-testid="vm-row">
<td><a href="${vmHref(vm.name)}">${vm.name}</a>${vm.is_template ? html` <span class="badge off">template</span>` : ""}</td>
<td>${badge(vm.state)}</td>
<td class="num">${vm.generation}</td>
<td class="num">${vm.vcpus}</td>
<td class="num">${mib(vm.memory_mib)}</td>
<td class="mono">${ipsOf(vm) || "–"}</td>
<td>${vm.node || "–"}</td>
<td class="row-actions">${actionButtons(vm)}</td>
</tr>`;
}

export async function render(main) {
  setHtml(
    main,
    html`<div class="toolbar">
      <h1>Virtual machines</h1><span class="muted" id="vm-count"></span>
      <span class="spacer"></span>
      <label class="inline"><span class="visually-hidden">Filter</span><input type="search" id="vm-filter" placeholder="Filter by name" aria-label="Filter by name"></label>
      <a class="button primary" href="#/vms/new" data-testid="new-vm">New VM</a>
    </div>
    <div class="table-wrap"><table data-testid="vm-table" id="vm-table" class="fixed">
      <colgroup><col style="width:22%"><col style="width:9%"><col style="width:5%"><col style="width:6%"><col style="width:9%"><col style="width:13%"><col style="width:9%"><col style="width:27%"></colgroup>
      <thead><tr><th>Name</th><th>State</th><th class="num">Gen</th><th class="num">vCPUs</th><th class="num">Memory</th><th>IP</th><th>Node</th><th>Actions</th></tr></thead>
      <tbody id="vm-rows"><tr><td colspan="8" class="empty">Loading…</td></tr></tbody>
    </table></div>`,
  );
  const table = $("#vm-table");
  const tbody = $("#vm-rows");
  const filter = $("#vm-filter");
  const byUuid = new Map(); // uuid -> {vm, row}
  let refetching = null;

  function paint(vms) {
    byUuid.clear();
    if (!vms.length) {
      setHtml(tbody, html`<tr><td colspan="8" class="empty">No virtual machines yet. <a href="#/vms/new">Create one</a>.</td></tr>`);
    } else {
      tbody.innerHTML = vms.map((vm) => rowHtml(vm).text).join("");
      const rows = tbody.rows;
      for (let i = 0; i < vms.length; i++) byUuid.set(vms[i].uuid, { vm: vms[i], row: rows[i] });
    }
    $("#vm-count").textContent = `${vms.length} VM${vms.length === 1 ? "" : "s"}`;
    applyFilter();
    table.dataset.ready = "true";
    // For bench/ui_list.py: rendered (DOM built), then painted (the frame after).
    performance.mark("vm-list-rendered");
    requestAnimationFrame(() => setTimeout(() => performance.mark("vm-list-painted"), 0));
  }

  function replaceRow(entry) {
    const tpl = document.createElement("template");
    tpl.innerHTML = rowHtml(entry.vm).text;
    const row = tpl.content.firstElementChild;
    entry.row.replaceWith(row);
    entry.row = row;
    if (filter.value) applyFilter();
  }

  function applyFilter() {
    const needle = filter.value.trim().toLowerCase();
    for (const { vm, row } of byUuid.values()) {
      row.hidden = Boolean(needle) && !vm.name.toLowerCase().includes(needle);
    }
  }

  async function refetch() {
    if (refetching) return refetching;
    refetching = (async () => {
      try {
        const vms = await get("/api/vms");
        const fresh = new Set(vms.map((vm) => vm.uuid));
        const known = [...byUuid.keys()];
        const same = fresh.size === known.length && vms.every((vm, i) => known[i] === vm.uuid);
        if (!same) {
          paint(vms);
          return;
        }
        for (const vm of vms) {
          const entry = byUuid.get(vm.uuid);
          if (JSON.stringify(entry.vm) !== JSON.stringify(vm)) {
            entry.vm = vm;
            replaceRow(entry);
          }
        }
      } catch (error) {
        showError(error);
      } finally {
        refetching = null;
      }
    })();
    return refetching;
  }

  tbody.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const name = button.closest("tr").dataset.name;
    const action = button.dataset.action;
    button.disabled = true;
    try {
      await live.runJob(`${action} ${name}`, post(`/api/vms/${enc(name)}/${action}`));
    } catch (error) {
      showError(error);
    } finally {
      button.disabled = false;
    }
  });
  filter.addEventListener("input", applyFilter);

  const offVm = live.on("vm", (event) => {
    const entry = byUuid.get(event.uuid);
    if (!entry || event.deleted) {
      refetch();
      return;
    }
    entry.vm = { ...entry.vm, state: event.state, state_reason: event.reason ?? entry.vm.state_reason };
    replaceRow(entry);
    // Addresses appear some seconds after a start; the event does not carry them.
    if (event.state === "running") setTimeout(refetch, 5000);
  });
  const offResync = live.on("resync", refetch);
  const timer = setInterval(() => document.visibilityState === "visible" && refetch(), 30000);

  paint((await takePrefetch("/api/vms")) || (await get("/api/vms")));
  return () => {
    offVm();
    offResync();
    clearInterval(timer);
  };
}
