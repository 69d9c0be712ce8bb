// A VM's snapshots as a tree (parent links), with create, revert and delete.

import { del, enc, get, post } from "../api.js";
import * as live from "../live.js";
import { $, bytes, confirmAction, formValues, html, setHtml, showError, when } from "../util.js";

/** Nest snapshots under their parents; roots are those without a (known) parent. */
export function snapshotTree(snapshots) {
  const names = new Set(snapshots.map((s) => s.name));
  const children = new Map();
  for (const snap of snapshots) {
    const parent = snap.parent && names.has(snap.parent) ? snap.parent : null;
    if (!children.has(parent)) children.set(parent, []);
    children.get(parent).push(snap);
  }
  return children;
}

function nodeHtml(snap, children) {
  const kids = children.get(snap.name) || [];
  return html`<li data-snapshot="${snap.name}" data-testid="snapshot">
    <div class="snap ${snap.current ? "current" : ""}">
      <span class="name">${snap.name}</span>
      ${snap.current ? html`<span class="badge warn" title="the VM's present state descends from it">current</span>` : ""}
      ${snap.with_memory ? html`<span class="badge busy">with RAM</span>` : ""}
      ${snap.status !== "ready" ? html`<span class="badge busy">${snap.status}</span>` : ""}
      <span class="muted">${when(snap.created_at)} · taken ${snap.vm_state}${snap.pause_ms !== null ? ` · pause ${snap.pause_ms.toFixed(1)} ms` : ""}${snap.size_bytes ? ` · ${bytes(snap.size_bytes)}` : ""}</span>
      ${snap.description ? html`<span>${snap.description}</span>` : ""}
      <span class="actions">
        <button type="button" class="small" data-op="revert" aria-label="Revert to ${snap.name}">Revert</button>
        <button type="button" class="small danger" data-op="delete" aria-label="Delete snapshot ${snap.name}">Delete</button>
      </span>
    </div>
    ${kids.length ? html`<ul class="tree">${kids.map((k) => nodeHtml(k, children))}</ul>` : ""}
  </li>`;
}

export async function render(ctx) {
  const name = ctx.vm.name;
  setHtml(
    ctx.panel,
    html`<form class="card row" id="snap-form" data-testid="snapshot-form">
      <label>Name <input name="name" required data-testid="snapshot-name"></label>
      <label>Description <input name="description"></label>
      <label class="inline"><input type="checkbox" name="memory" data-testid="snapshot-memory"> Include RAM (running VM)</label>
      <button type="submit" class="primary" data-testid="snapshot-create">Take snapshot</button>
    </form>
    <h2>Snapshot tree</h2>
    <div id="snap-tree" data-testid="snapshot-tree"></div>`,
  );
  const tree = $("#snap-tree");
  const refresh = async () => {
    const snapshots = await get(`/api/vms/${enc(name)}/snapshots`);
    const children = snapshotTree(snapshots);
    setHtml(
      tree,
      snapshots.length
        ? html`<ul class="tree root">${(children.get(null) || []).map((s) => nodeHtml(s, children))}</ul>`
        : html`<p class="muted">No snapshots yet.</p>`,
    );
  };
  const job = async (label, call) => {
    try {
      await live.runJob(label, call);
    } catch (error) {
      showError(error);
    }
    await refresh().catch(showError);
    await ctx.refresh().catch(showError);
  };
  $("#snap-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const v = formValues(form);
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      const ended = await live.runJob(`snapshot ${v.name}`, post(`/api/vms/${enc(name)}/snapshots`, v));
      if (ended.state === "succeeded") form.reset();
    } catch (error) {
      showError(error);
    } finally {
      button.disabled = false;
    }
    await refresh().catch(showError);
    await ctx.refresh().catch(showError);
  });
  tree.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-op]");
    if (!button) return;
    const snap = button.closest("li").dataset.snapshot;
    if (button.dataset.op === "revert") {
      if (confirmAction(`Revert ${name} to ${snap}? What it did since is lost.`)) {
        job(`revert to ${snap}`, post(`/api/vms/${enc(name)}/snapshots/${enc(snap)}/revert`, {}));
      }
    } else if (confirmAction(`Delete snapshot ${snap}?`)) {
      job(`delete ${snap}`, del(`/api/vms/${enc(name)}/snapshots/${enc(snap)}`));
    }
  });
  await refresh();
  const offResync = live.on("resync", () => refresh().catch(showError));
  return offResync;
}
