// The consoles of a VM: serial (xterm.js) and graphical (noVNC). Each connection
// asks for a fresh one-time ticket, so a reload or a reconnect just works; the
// connection comes back by itself when the VM (re)starts.

import RFB from "../../vendor/novnc/core/rfb.js";
import { FitAddon } from "../../vendor/xterm/addon-fit.mjs";
import { Terminal } from "../../vendor/xterm/xterm.mjs";
import { enc, post } from "../api.js";
import { $, html, loadCss, setHtml } from "../util.js";

loadCss("/ui/vendor/xterm/xterm.css");

const RETRY_MS = [1000, 2000, 5000, 10000];

function socketUrl(path, ticket) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}${path}?ticket=${enc(ticket)}`;
}

/**
 * Keeps one connection open while the VM runs: `open(url)` must return an object
 * with close(); the caller reports the end with `closed(reason)`.
 */
function keeper(ctx, kind, status, open) {
  let current = null;
  let disposed = false;
  let retries = 0;
  let timer = null;

  async function connect() {
    clearTimeout(timer);
    if (disposed || current) return;
    if (!["running", "paused"].includes(ctx.vm.state)) {
      status(`The VM is ${ctx.vm.state}; the console connects when it runs.`, "off");
      return;
    }
    status("Connecting…", "busy");
    let ticket;
    try {
      ticket = (await post(`/api/vms/${enc(ctx.vm.name)}/console/ticket`, { kind })).ticket;
    } catch (error) {
      status(error.message, "bad");
      schedule();
      return;
    }
    if (disposed) return;
    const path = `/api/vms/${enc(ctx.vm.name)}/${kind === "serial" ? "console" : "vnc"}`;
    current = open(socketUrl(path, ticket));
  }

  function schedule() {
    if (disposed) return;
    const delay = RETRY_MS[Math.min(retries++, RETRY_MS.length - 1)];
    timer = setTimeout(connect, delay);
  }

  return {
    connect,
    connected() {
      retries = 0;
      status("Connected", "ok");
    },
    closed(reason) {
      current = null;
      if (disposed) return;
      status(`Disconnected${reason ? `: ${reason}` : ""}`, "off");
      if (["running", "paused"].includes(ctx.vm.state)) schedule();
    },
    vmChanged() {
      if (!current) connect();
    },
    reconnect() {
      retries = 0;
      if (current) current.close();
      current = null;
      connect();
    },
    dispose() {
      disposed = true;
      clearTimeout(timer);
      if (current) current.close();
      current = null;
    },
  };
}

export async function render(ctx, kind) {
  setHtml(
    ctx.panel,
    html`<div class="toolbar">
      <span class="console-status" role="status" data-testid="console-status" data-state="off" id="console-status"></span>
      <span class="spacer"></span>
      ${kind === "vnc" ? html`<button type="button" id="cad" data-testid="send-cad">Send Ctrl-Alt-Del</button>` : ""}
      <button type="button" id="reconnect" data-testid="reconnect">Reconnect</button>
    </div>
    ${kind === "serial"
      ? html`<div class="console-box" id="console" data-testid="serial-console"></div>`
      : html`<div class="vnc-box" id="console" data-testid="vnc-console"></div>`}`,
  );
  const box = $("#console");
  const statusEl = $("#console-status");
  const status = (text, state) => {
    statusEl.textContent = text;
    statusEl.dataset.state = state;
  };
  const cleanup = kind === "serial" ? serial(ctx, box, status) : graphical(ctx, box, status);
  $("#reconnect").addEventListener("click", () => cleanup.keeper.reconnect());
  ctx.onVmChange = () => cleanup.keeper.vmChanged();
  cleanup.keeper.connect();
  return () => {
    ctx.onVmChange = null;
    cleanup.dispose();
  };
}

function serial(ctx, box, status) {
  const term = new Terminal({
    convertEol: false,
    cursorBlink: true,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", monospace',
    fontSize: 14,
    scrollback: 5000,
    theme: { background: "#000000" },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  const observer = new ResizeObserver(() => fit.fit());
  observer.observe(box);
  const encoder = new TextEncoder();
  let socket = null;

  const keep = keeper(ctx, "serial", status, (url) => {
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    let replayed = false;
    ws.addEventListener("open", () => keep.connected());
    ws.addEventListener("message", (e) => {
      if (!replayed) {
        replayed = true;
        term.reset(); // the server replays the recent screen first
      }
      term.write(typeof e.data === "string" ? e.data : new Uint8Array(e.data));
    });
    ws.addEventListener("close", (e) => {
      if (socket === ws) socket = null;
      keep.closed(e.reason || (e.code === 1000 ? "" : `code ${e.code}`));
    });
    socket = ws;
    return ws;
  });
  const input = term.onData((data) => {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
  });
  term.focus();
  return {
    keeper: keep,
    dispose() {
      keep.dispose();
      input.dispose();
      observer.disconnect();
      term.dispose();
    },
  };
}

function graphical(ctx, box, status) {
  let rfb = null;
  const keep = keeper(ctx, "vnc", status, (url) => {
    const client = new RFB(box, url, { wsProtocols: ["binary"], shared: true });
    client.scaleViewport = true;
    client.background = "#111";
    client.addEventListener("connect", () => keep.connected());
    client.addEventListener("disconnect", (e) => {
      if (rfb === client) rfb = null;
      keep.closed(e.detail.clean ? "" : "the connection was lost");
    });
    client.addEventListener("securityfailure", (e) => status(`Refused: ${e.detail.reason || e.detail.status}`, "bad"));
    rfb = client;
    return { close: () => client.disconnect() };
  });
  const cad = document.getElementById("cad");
  cad.addEventListener("click", () => rfb && rfb.sendCtrlAltDel());
  return {
    keeper: keep,
    dispose() {
      keep.dispose();
    },
  };
}
