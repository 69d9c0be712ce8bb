// Networks (virtual switches): list, create, delete; port forwards per network.

import { del, enc, get, post } from "../api.js";
import * as live from "../live.js";
import { $, confirmAction, formValues, html, setHtml, showError } from "../util.js";

export async function render(main) {
  setHtml(
    main,
    html`<h1>Networks</h1>
    <div id="networks"></div>
    <form class="card" id="new-network" data-testid="new-network" style="margin-top:0.75rem"><div class="row">
      <label>Name <input name="name" required data-testid="net-name"></label>
      <label>Type <select name="type" data-testid="net-type">
        <option value="nat">nat (DHCP, DNS, masquerade)</option><option value="internal">internal (host and VMs)</option>
        <option value="private">private (VMs only)</option><option value="external">external (bridged to a host NIC)</option></select></label>
      <label>Subnet <input name="subnet" placeholder="default: a free /24"></label>
      <label>Uplink (external) <input name="uplink" placeholder="host NIC"></label>
      <button type="submit" class="primary">Create network</button>
    </div></form>
    <h2>Port forwards</h2>
    <div class="row"><label>Network <select id="fwd-network" data-testid="fwd-network"></select></label></div>
    <div id="forwards" style="margin-top:0.75rem"></div>
    <form class="card" id="new-forward" data-testid="new-forward" style="margin-top:0.75rem" hidden><div class="row">
      <label>Protocol <select name="proto"><option>tcp</option><option>udp</option></select></label>
      <label>Host port <input name="host_port" type="number" min="1" max="65535" required></label>
      <label>VM <select name="vm" id="fwd-vm"></select></label>
      <label>VM port <input name="vm_port" type="number" min="1" max="65535" required></label>
      <button type="submit">Add forward</button>
    </div></form>`,
  );
  let networks = [];

  async function refresh() {
    const [nets, vms] = await Promise.all([get("/api/networks"), get("/api/vms")]);
    networks = nets;
    setHtml(
      $("#networks"),
      html`<div class="table-wrap"><table data-testid="networks"><thead><tr><th>Name</th><th>Type</th><th>Bridge</th><th>Subnet</th><th>Gateway</th><th>DHCP range</th><th>Uplink</th><th class="num">NICs</th><th></th></tr></thead>
      <tbody>${nets.length ? nets.map((n) => html`<tr data-name="${n.name}"><td>${n.name}</td><td>${n.type}</td><td class="mono">${n.bridge || "–"}</td><td class="mono">${n.subnet || "–"}</td><td class="mono">${n.gateway || "–"}</td>
        <td class="mono">${n.dhcp_range ? n.dhcp_range.join(" – ") : "–"}</td><td>${n.uplink || "–"}</td><td class="num">${n.nics}</td>
        <td><button type="button" class="small danger" data-op="delete" ${n.nics ? html`disabled title="NICs are on it"` : ""}>Delete</button></td></tr>`) : html`<tr><td colspan="9" class="empty">No networks</td></tr>`}</tbody></table></div>`,
    );
    const select = $("#fwd-network");
    const keep = select.value;
    setHtml(select, html`${nets.filter((n) => n.type === "nat").map((n) => html`<option ${n.name === keep ? html`selected` : ""}>${n.name}</option>`)}`);
    setHtml($("#fwd-vm"), html`${vms.map((vm) => html`<option>${vm.name}</option>`)}`);
    $("#new-forward").hidden = !select.options.length;
    await refreshForwards();
  }

  async function refreshForwards() {
    const network = $("#fwd-network").value;
    if (!network) {
      setHtml($("#forwards"), html`<p class="muted">Port forwards exist on nat networks; there is none.</p>`);
      return;
    }
    const forwards = await get(`/api/networks/${enc(network)}/forwards`);
    setHtml(
      $("#forwards"),
      html`<div class="table-wrap"><table data-testid="forwards"><thead><tr><th>Protocol</th><th class="num">Host port</th><th>VM</th><th>NIC</th><th class="num">VM port</th><th>VM address</th><th></th></tr></thead>
      <tbody>${forwards.length ? forwards.map((f) => html`<tr data-proto="${f.proto}" data-port="${f.host_port}"><td>${f.proto}</td><td class="num">${f.host_port}</td><td>${f.vm}</td><td>${f.nic}</td><td class="num">${f.vm_port}</td><td class="mono">${f.vm_ip || "–"}</td>
        <td><button type="button" class="small danger" data-op="remove-forward">Remove</button></td></tr>`) : html`<tr><td colspan="7" class="empty">No port forwards on ${network}</td></tr>`}</tbody></table></div>`,
    );
  }

  main.addEventListener("change", (event) => {
    if (event.target.id === "fwd-network") refreshForwards().catch(showError);
  });

  main.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-op]");
    if (!button) return;
    const row = button.closest("tr");
    try {
      if (button.dataset.op === "delete" && confirmAction(`Delete network ${row.dataset.name}?`)) {
        await live.runJob(`delete ${row.dataset.name}`, del(`/api/networks/${enc(row.dataset.name)}`));
        await refresh();
      } else if (button.dataset.op === "remove-forward") {
        await del(`/api/networks/${enc($("#fwd-network").value)}/forwards/${enc(row.dataset.proto)}/${row.dataset.port}`);
        await refreshForwards();
      }
    } catch (error) {
      showError(error);
    }
  });

  main.addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const v = formValues(form);
    const button = form.querySelector('button[type="submit"]');
    button.disabled = true;
    try {
      if (form.id === "new-network") {
        const body = { name: v.name, type: v.type };
        if (v.subnet) body.subnet = v.subnet;
        if (v.uplink) body.uplink = v.uplink;
        const ended = await live.runJob(`create network ${v.name}`, post("/api/networks", body));
        if (ended.state === "succeeded") form.reset();
        await refresh();
      } else if (form.id === "new-forward") {
        await post(`/api/networks/${enc($("#fwd-network").value)}/forwards`, {
          proto: v.proto,
          host_port: Number(v.host_port),
          vm: v.vm,
          vm_port: Number(v.vm_port),
        });
        form.reset();
        await refreshForwards();
      }
    } catch (error) {
      showError(error);
    } finally {
      button.disabled = false;
    }
  });

  await refresh();
  return live.on("resync", () => refresh().catch(showError));
}
