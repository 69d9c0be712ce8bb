// Storage: pools, volumes, ISOs and images; uploads (XHR progress, then the
// import job's progress) and imports from a URL or a path on the host.

import { del, enc, get, post, upload } from "../api.js";
import * as live from "../live.js";
import { $, bytes, confirmAction, formValues, html, setHtml, showError, when } from "../util.js";

const used = (list) => (list && list.length ? list.join(", ") : "–");

function importForm(kind, pools) {
  return html`<form class="card" data-kind="${kind}" data-testid="import-${kind}" style="margin-top:0.75rem">
    <div class="row">
      ${kind === "volume" ? html`<label>Pool <select name="pool">${pools.map((p) => html`<option>${p.name}</option>`)}</select></label>` : ""}
      <label>Name <input name="name" placeholder="default: from the file"></label>
      <label>File to upload <input type="file" name="file" data-testid="upload-${kind}-file"></label>
      <span class="muted">or</span>
      <label>URL or host path <input name="source" placeholder="https://… or /var/lib/vmhive/import/…" size="34"></label>
      <button type="submit">${kind === "iso" ? "Add ISO" : kind === "image" ? "Add image" : "Import volume"}</button>
    </div>
    <div class="row" data-role="progress" hidden style="margin-top:0.5rem">
      <span class="progress" role="progressbar" aria-label="Upload" aria-valuemin="0" aria-valuemax="100"><span style="width:0%"></span></span>
      <span data-role="progress-text" role="status"></span>
    </div>
  </form>`;
}

export async function render(main) {
  // The forms need the pools: ask first, so nothing can be submitted half-filled.
  const firstPools = await get("/api/pools");
  const poolOptions = firstPools.map((p) => html`<option>${p.name}</option>`);
  setHtml(
    main,
    html`<h1>Storage</h1>
    <h2>Pools</h2><div id="pools"></div>
    <h2>Volumes</h2><div id="volumes"></div>
    <form class="card row" id="new-volume" style="margin-top:0.75rem" data-testid="new-volume">
      <label>Pool <select name="pool" id="volume-pool">${poolOptions}</select></label>
      <label>Name <input name="name" required></label>
      <label>Size <input name="size" value="10G" required></label>
      <label>Format <select name="format"><option>qcow2</option><option>raw</option></select></label>
      <button type="submit">Create volume</button>
    </form>
    ${importForm("volume", firstPools)}
    <h2>ISO images</h2><div id="isos"></div>${importForm("iso", firstPools)}
    <h2>Disk images</h2><div id="images"></div>${importForm("image", firstPools)}`,
  );

  async function refresh() {
    const [pools, volumes, isos, images] = await Promise.all([
      get("/api/pools"),
      get("/api/volumes"),
      get("/api/isos"),
      get("/api/images"),
    ]);
    setHtml(
      $("#pools"),
      html`<div class="table-wrap"><table data-testid="pools"><thead><tr><th>Name</th><th>Type</th><th>Scope</th><th>Path</th><th class="num">Volumes</th><th class="num">Free</th><th class="num">Total</th><th>On this node</th></tr></thead>
      <tbody>${pools.map((p) => html`<tr><td>${p.name}</td><td>${p.type}</td><td>${p.shared ? "shared" : "local"}</td><td class="mono">${p.path}</td><td class="num">${p.volumes}</td><td class="num">${bytes(p.free_bytes)}</td><td class="num">${bytes(p.total_bytes)}</td><td>${p.usable ? "usable" : html`<span class="badge bad" title="${p.problem}">not usable</span>`}</td></tr>`)}</tbody></table></div>`,
    );
    setHtml(
      $("#volumes"),
      html`<div class="table-wrap"><table data-testid="volumes"><thead><tr><th>Pool</th><th>Name</th><th>Format</th><th class="num">Size</th><th class="num">Allocated</th><th>Attached to</th><th>Backing</th><th>Node</th><th></th></tr></thead>
      <tbody>${volumes.length ? volumes.map((v) => html`<tr data-pool="${v.pool}" data-name="${v.name}"><td>${v.pool}</td><td>${v.name}</td><td>${v.format}</td><td class="num">${bytes(v.virtual_size)}</td><td class="num">${bytes(v.allocated_size)}</td><td>${used(v.attached_to)}</td><td>${v.backing || "–"}</td><td>${v.node || "–"}</td>
        <td><button type="button" class="small danger" data-op="delete-volume" ${v.attached_to.length ? html`disabled` : ""}>Delete</button></td></tr>`) : html`<tr><td colspan="9" class="empty">No volumes</td></tr>`}</tbody></table></div>`,
    );
    setHtml(
      $("#isos"),
      html`<div class="table-wrap"><table data-testid="isos"><thead><tr><th>Name</th><th class="num">Size</th><th>Used by</th><th>Path</th><th></th></tr></thead>
      <tbody>${isos.length ? isos.map((i) => html`<tr data-name="${i.name}"><td>${i.name}</td><td class="num">${bytes(i.size)}</td><td>${used(i.used_by)}</td><td class="mono">${i.path}</td>
        <td><button type="button" class="small danger" data-op="delete-iso" ${i.used_by.length ? html`disabled` : ""}>Delete</button></td></tr>`) : html`<tr><td colspan="5" class="empty">No ISOs</td></tr>`}</tbody></table></div>`,
    );
    setHtml(
      $("#images"),
      html`<div class="table-wrap"><table data-testid="images"><thead><tr><th>Name</th><th>Format</th><th class="num">Virtual size</th><th class="num">On disk</th><th>Origin</th><th>Added</th><th></th></tr></thead>
      <tbody>${images.length ? images.map((i) => html`<tr data-name="${i.name}"><td>${i.name}</td><td>${i.format}</td><td class="num">${bytes(i.virtual_size)}</td><td class="num">${bytes(i.actual_size)}</td><td title="${i.source}">${i.origin}</td><td>${when(i.created_at)}</td>
        <td><button type="button" class="small danger" data-op="delete-image">Delete</button></td></tr>`) : html`<tr><td colspan="7" class="empty">No images</td></tr>`}</tbody></table></div>`,
    );
  }

  const job = async (label, call) => {
    try {
      return await live.runJob(label, call);
    } catch (error) {
      showError(error);
      return null;
    } finally {
      await refresh().catch(showError);
    }
  };

  main.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-op]");
    if (!button) return;
    const row = button.closest("tr");
    const name = row.dataset.name;
    if (!confirmAction(`Delete ${name}?`)) return;
    try {
      if (button.dataset.op === "delete-volume") {
        await job(`delete ${name}`, del(`/api/pools/${enc(row.dataset.pool)}/volumes/${enc(name)}`));
      } else if (button.dataset.op === "delete-iso") {
        await del(`/api/isos/${enc(name)}`);
      } else if (button.dataset.op === "delete-image") {
        await del(`/api/images/${enc(name)}`);
      }
    } catch (error) {
      showError(error);
    }
    await refresh().catch(showError);
  });

  main.addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const button = form.querySelector('button[type="submit"]');
    button.disabled = true;
    try {
      if (form.id === "new-volume") {
        const v = formValues(form);
        const ended = await job(`create volume ${v.name}`, post(`/api/pools/${enc(v.pool)}/volumes`, { name: v.name, size: v.size, format: v.format }));
        if (ended && ended.state === "succeeded") form.reset();
      } else if (form.dataset.kind) {
        await importInto(form);
      }
    } finally {
      button.disabled = false;
    }
  });

  async function importInto(form) {
    const kind = form.dataset.kind;
    const v = formValues(form);
    const file = form.file.files[0];
    const bar = form.querySelector('[data-role="progress"]');
    const fill = bar.querySelector(".progress > span");
    const text = bar.querySelector('[data-role="progress-text"]');
    const show = (fraction, label) => {
      bar.hidden = false;
      fill.style.width = `${Math.round(fraction * 100)}%`;
      text.textContent = label;
    };
    try {
      let submitted;
      if (file) {
        const name = v.name || file.name;
        const path =
          kind === "iso" ? `/api/isos/${enc(name)}/upload`
          : kind === "image" ? `/api/images/${enc(name)}/upload`
          : `/api/pools/${enc(v.pool)}/volumes/${enc(name)}/upload`;
        submitted = await upload(path, file, (f) => show(f, `uploading ${name}: ${Math.round(f * 100)} %`));
      } else if (v.source) {
        const body = { source: v.source, ...(v.name ? { name: v.name } : {}) };
        const path = kind === "iso" ? "/api/isos" : kind === "image" ? "/api/images" : `/api/pools/${enc(v.pool)}/import`;
        submitted = await post(path, body);
      } else {
        show(0, "Choose a file or give a URL or path.");
        return;
      }
      const ended = await live.trackJob(submitted, (j) => show(j.progress / 100, `importing: ${j.state} ${j.progress} %`));
      if (ended.state === "succeeded") {
        show(1, "done");
        form.reset();
      } else {
        show(0, `import ${ended.state}: ${ended.error || ""}`);
      }
    } catch (error) {
      show(0, error.message);
    }
    await refresh().catch(showError);
  }

  await refresh();
  const offResync = live.on("resync", () => refresh().catch(showError));
  return offResync;
}
