// The create wizard: hardware, disk (blank, image or template clone), ISO, network,
// cloud-init basics; one job (or clone + edit + start), its progress shown here.

import { enc, get, patch, post } from "../api.js";
import * as live from "../live.js";
import { $, bytes, formValues, html, setHtml, vmHref } from "../util.js";

function options(items, selected, label = (x) => x) {
  return items.map((item) => html`<option value="${item}" ${item === selected ? html`selected` : ""}>${label(item)}</option>`);
}

export async function render(main) {
  const [images, isos, networks, vms] = await Promise.all([
    get("/api/images"),
    get("/api/isos"),
    get("/api/networks"),
    get("/api/vms"),
  ]);
  const templates = vms.filter((vm) => vm.is_template).map((vm) => vm.name);
  const imageSizes = Object.fromEntries(images.map((i) => [i.name, i.virtual_size]));
  const networkNames = networks.map((n) => n.name);
  const defaultNetwork = networkNames.includes("default") ? "default" : networkNames[0] || "";
  setHtml(
    main,
    html`<h1>New virtual machine</h1>
    <form id="wizard" class="card" data-testid="wizard" novalidate>
      <fieldset><legend>General</legend><div class="form-grid">
        <label>Name <input name="name" required pattern="[A-Za-z0-9][A-Za-z0-9._-]*" data-testid="wz-name"></label>
        <label>Description <input name="description" data-testid="wz-description"></label>
      </div></fieldset>
      <fieldset id="hardware"><legend>Hardware</legend><div class="form-grid">
        <div role="radiogroup" aria-label="Generation"><span>Generation</span>
          <label class="inline"><input type="radio" name="generation" value="1" data-testid="wz-gen1"> 1 (BIOS, i440fx)</label>
          <label class="inline"><input type="radio" name="generation" value="2" checked data-testid="wz-gen2"> 2 (UEFI, q35, virtio)</label>
        </div>
        <label>vCPUs <input name="vcpus" type="number" min="1" max="64" value="1" data-testid="wz-vcpus"></label>
        <label>Memory (MiB) <input name="memory_mib" type="number" min="32" step="32" value="512" data-testid="wz-memory"></label>
      </div></fieldset>
      <fieldset><legend>Disk</legend>
        <div class="row" role="radiogroup" aria-label="Disk source">
          <label class="inline"><input type="radio" name="disk" value="none" data-testid="wz-disk-none"> No disk</label>
          <label class="inline"><input type="radio" name="disk" value="blank" checked data-testid="wz-disk-blank"> Blank</label>
          <label class="inline"><input type="radio" name="disk" value="image" ${images.length ? "" : html`disabled`} data-testid="wz-disk-image"> From an image</label>
          <label class="inline"><input type="radio" name="disk" value="template" ${templates.length ? "" : html`disabled`} data-testid="wz-disk-template"> Clone a template</label>
        </div>
        <div class="form-grid" style="margin-top:0.75rem">
          <label data-for="blank">Size <input name="size" value="10G" data-testid="wz-size"></label>
          <label data-for="image">Image <select name="image" data-testid="wz-image">${options(images.map((i) => i.name), images[0] && images[0].name, (n) => `${n} (${bytes(imageSizes[n])})`)}</select></label>
          <label data-for="image">Grow to (optional) <input name="grow" placeholder="e.g. 20G" data-testid="wz-grow"></label>
          <label data-for="image">Mode <select name="mode"><option value="overlay">overlay (copy-on-write)</option><option value="copy">full copy</option></select></label>
          <label data-for="template">Template <select name="template" data-testid="wz-template">${options(templates, templates[0])}</select></label>
          <label data-for="template" class="inline"><input type="checkbox" name="linked" checked> Linked clone</label>
        </div>
      </fieldset>
      <fieldset data-hide-for="template"><legend>Media and network</legend><div class="form-grid">
        <label>ISO <select name="iso" data-testid="wz-iso"><option value="">none</option>${options(isos.map((i) => i.name), "")}</select></label>
        <label>Network <select name="network" data-testid="wz-network">
          ${options(networkNames, defaultNetwork)}
          <option value="" ${networkNames.length ? "" : html`selected`}>${networkNames.length ? "user-mode NAT (no vmhive network)" : "user-mode NAT"}</option>
          <option value="-">no network card</option>
        </select></label>
      </div></fieldset>
      <fieldset data-hide-for="template"><legend><label class="inline"><input type="checkbox" name="cloud_init" data-testid="wz-cloudinit"> Cloud-init</label></legend>
        <p class="muted" id="ci-off">A NoCloud seed for images that run cloud-init: hostname, a user, an SSH key.</p>
        <div class="form-grid" id="ci-fields" hidden>
          <label>Hostname <input name="ci_hostname" placeholder="the VM's name"></label>
          <label>User <input name="ci_user" placeholder="the image's default user"></label>
          <label>Password hash <input name="ci_hash" placeholder="$6$… (mkpasswd -m sha-512)" autocomplete="off"></label>
          <label style="grid-column: 1 / -1">SSH public key <textarea name="ci_key" rows="2" placeholder="ssh-ed25519 AAAA…"></textarea></label>
        </div>
      </fieldset>
      <div class="toolbar">
        <label class="inline"><input type="checkbox" name="start" checked data-testid="wz-start"> Start after creating</label>
        <span class="spacer"></span>
        <span id="wz-progress" role="status" data-testid="wz-progress"></span>
        <a class="button" href="#/vms">Cancel</a>
        <button type="submit" class="primary" data-testid="wz-create">Create</button>
      </div>
    </form>`,
  );
  const form = $("#wizard");

  function sync() {
    const disk = form.querySelector('input[name="disk"]:checked').value;
    for (const el of form.querySelectorAll("[data-for]")) el.hidden = el.dataset.for !== disk;
    for (const el of form.querySelectorAll("[data-hide-for]")) el.hidden = el.dataset.hideFor === disk;
    $("#hardware").querySelector('[role="radiogroup"]').hidden = disk === "template";
    $("#ci-fields").hidden = !form.cloud_init.checked;
    $("#ci-off").hidden = form.cloud_init.checked;
  }
  form.addEventListener("change", sync);
  sync();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const v = formValues(form);
    const button = $('[data-testid="wz-create"]');
    const progress = $("#wz-progress");
    if (!v.name) {
      progress.textContent = "A name is required.";
      form.name.focus();
      return;
    }
    button.disabled = true;
    progress.classList.remove("error");
    try {
      const ended = v.disk === "template" ? await cloneTemplate(v, progress) : await create(v, progress);
      if (ended && ended.state === "succeeded") location.hash = vmHref(v.name);
    } catch (error) {
      progress.textContent = error.message;
      progress.classList.add("error");
    } finally {
      button.disabled = false;
    }
  });
}

function showProgress(progress, label) {
  return (job) => {
    progress.textContent = `${label}: ${job.state}${job.state === "running" ? ` (${job.progress} %)` : ""}`;
  };
}

async function create(v, progress) {
  const body = {
    name: v.name,
    description: v.description,
    generation: Number(v.generation),
    vcpus: Number(v.vcpus),
    memory_mib: Number(v.memory_mib),
    start: v.start,
    disks: [],
  };
  if (v.disk === "blank") body.disks.push({ size: v.size });
  if (v.disk === "image") body.disks.push({ image: v.image, mode: v.mode, ...(v.grow ? { size: v.grow } : {}) });
  if (v.iso) body.iso = v.iso;
  if (v.network === "-") body.nic = false;
  else if (v.network) body.network = v.network;
  if (v.cloud_init) {
    const keys = v.ci_key ? [v.ci_key] : [];
    const settings = { hostname: v.ci_hostname || null };
    if (v.ci_user) {
      settings.users = [{ name: v.ci_user, ssh_authorized_keys: keys, hashed_passwd: v.ci_hash || null }];
    } else {
      settings.ssh_keys = keys;
    }
    body.cloud_init_settings = settings;
  }
  return finish(await post("/api/vms", body), progress, `Creating ${v.name}`);
}

async function cloneTemplate(v, progress) {
  const job = await post(`/api/vms/${enc(v.template)}/clone`, { name: v.name, linked: v.linked });
  const ended = await finish(job, progress, `Cloning ${v.template}`);
  if (ended.state !== "succeeded") return ended;
  await patch(`/api/vms/${enc(v.name)}`, {
    vcpus: Number(v.vcpus),
    memory_mib: Number(v.memory_mib),
    ...(v.description ? { description: v.description } : {}),
  });
  if (!v.start) return ended;
  return finish(await post(`/api/vms/${enc(v.name)}/start`), progress, `Starting ${v.name}`);
}

async function finish(job, progress, label) {
  const ended = await live.trackJob(job, showProgress(progress, label));
  if (ended.state !== "succeeded") {
    progress.classList.add("error");
    progress.textContent = `${label} ${ended.state}: ${ended.error || ""}`;
  }
  return ended;
}
