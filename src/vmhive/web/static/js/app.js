// The app shell: session (login, logout, CSRF token), hash routes, live-status badge.

import { api, onUnauthorized, setCsrf } from "./api.js";
import * as live from "./live.js";
import { $, html, setHtml, showError } from "./util.js";

const main = document.getElementById("main");
let user = null;
let dispose = null;
let renderSeq = 0;

// Each route: a pattern on the hash, the page module, and the nav entry it lights.
const ROUTES = [
  [/^#?\/?$/, "dashboard", "dashboard"],
  [/^#\/vms$/, "vms", "vms"],
  [/^#\/vms\/new$/, "wizard", "vms"],
  [/^#\/vms\/([^/]+)(?:\/([a-z-]+))?$/, "vm", "vms"],
  [/^#\/storage$/, "storage", "storage"],
  [/^#\/networks$/, "networks", "networks"],
  [/^#\/jobs$/, "jobs", "jobs"],
];

async function route() {
  const seq = ++renderSeq;
  if (dispose) {
    try {
      dispose();
    } catch (error) {
      console.error(error);
    }
    dispose = null;
  }
  if (!user) {
    renderLogin();
    return;
  }
  const hash = location.hash || "#/";
  const match = ROUTES.map(([pattern, page, nav]) => [hash.match(pattern), page, nav]).find(([m]) => m);
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.toggleAttribute("aria-current", Boolean(match && link.dataset.nav === match[2]));
    if (match && link.dataset.nav === match[2]) link.setAttribute("aria-current", "page");
  }
  if (!match) {
    setHtml(main, html`<h1>Not found</h1><p>No page at <code>${hash}</code>. <a href="#/">Dashboard</a></p>`);
    return;
  }
  const [m, page] = match;
  const params = m.slice(1).map((part) => (part === undefined ? undefined : decodeURIComponent(part)));
  try {
    const module = await import(`./pages/${page}.js`);
    if (seq !== renderSeq) return; // the user went elsewhere meanwhile
    main.dataset.page = page;
    dispose = (await module.render(main, ...params)) || null;
    if (seq !== renderSeq && dispose) {
      dispose();
      dispose = null;
    }
  } catch (error) {
    if (seq !== renderSeq) return;
    setHtml(main, html`<h1>Error</h1><p class="error" role="alert">${error.message || error}</p>`);
  }
}

function renderLogin() {
  document.getElementById("top").hidden = true;
  main.dataset.page = "login";
  setHtml(
    main,
    html`<form class="login card" id="login-form" data-testid="login-form">
      <h1><img src="/ui/icon.svg" alt="" width="28" height="28"> vmhive</h1>
      <label>User name <input name="username" autocomplete="username" required autofocus data-testid="login-user"></label>
      <label>Password <input name="password" type="password" autocomplete="current-password" required data-testid="login-password"></label>
      <p class="error" role="alert" id="login-error" data-testid="login-error" hidden></p>
      <button type="submit" class="primary" data-testid="login-submit">Log in</button>
    </form>`,
  );
  const form = $("#login-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button");
    const message = $("#login-error");
    button.disabled = true;
    message.hidden = true;
    try {
      const answer = await api("POST", "/api/auth/login", {
        username: form.username.value.trim(),
        password: form.password.value,
      });
      startSession(answer);
    } catch (error) {
      message.textContent = error.message;
      message.hidden = false;
      form.password.select();
    } finally {
      button.disabled = false;
    }
  });
}

function startSession(me) {
  user = me.user;
  setCsrf(me.csrf_token);
  document.getElementById("top").hidden = false;
  document.getElementById("user").textContent = user;
  live.connect();
  route();
}

function endSession() {
  user = null;
  setCsrf(null);
  live.disconnect();
  route();
}

async function logout() {
  try {
    await api("POST", "/api/auth/logout");
  } catch (error) {
    if (error.status !== 401) {
      showError(error);
      return;
    }
  }
  endSession();
}

live.on("status", (up) => {
  const badge = document.getElementById("live");
  badge.textContent = up ? "live" : "offline";
  badge.classList.toggle("up", up);
});

onUnauthorized(() => {
  if (user) endSession();
});

document.getElementById("logout").addEventListener("click", logout);
window.addEventListener("hashchange", route);

async function boot() {
  try {
    startSession(await api("GET", "/api/auth/me"));
  } catch (error) {
    if (error.status !== 401) showError(error);
    renderLogin();
  }
}

boot();
