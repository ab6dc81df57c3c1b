// The console's shell: sign-in, the page router and the live event stream.

import { ApiError, EventStream, auth, get, onUnauthorized } from "./api.js";
import { failure, h, replace } from "./dom.js";
import { devicePage, devicesPage, fleetPage } from "./pages.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const live = document.getElementById("live");
const signOut = document.getElementById("sign-out");

let page = null;
let poll = null;
const stream = new EventStream(
  (event) => page && page.onEvent(event),
  (state, detail) => showStreamState(state, detail),
);

function showStreamState(state, detail) {
  const words = {
    connecting: "Connecting…",
    live: "Live",
    disconnected: `Disconnected: retrying in ${detail} s`,
    unavailable: "No live stream: refreshing every 15 s",
  };
  live.dataset.state = state;
  live.textContent = words[state] || state;
  clearInterval(poll);
  poll = null;
  if (state === "unavailable") poll = setInterval(() => page && page.refresh(), 15000);
  if (state === "live" && detail === "gap" && page) page.refresh();
}

function navigate(hash, options = {}) {
  if (options.quiet) {
    history.replaceState(null, "", hash);
    return;
  }
  if (options.replace) history.replaceState(null, "", hash);
  else location.hash = hash;
  route();
}

function route() {
  if (page) page.dispose();
  const [path, query] = (location.hash.slice(1) || "/fleet").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  for (const link of nav.querySelectorAll("a")) {
    link.classList.toggle("current", link.dataset.page === parts[0] || (parts[0] === "device" && link.dataset.page === "devices"));
  }
  if (parts[0] === "devices") {
    document.title = "Devices · elevgw";
    page = devicesPage(main, params, navigate);
  } else if (parts[0] === "device" && parts[1]) {
    const deviceId = decodeURIComponent(parts[1]);
    document.title = `${deviceId} · elevgw`;
    page = devicePage(main, params, navigate, deviceId);
  } else {
    document.title = "Fleet · elevgw";
    page = fleetPage(main, params, navigate);
  }
  main.focus({ preventScroll: true });
}

function signIn(message) {
  stream.stop();
  if (page) page.dispose();
  page = null;
  nav.hidden = true;
  live.hidden = true;
  signOut.hidden = true;
  document.title = "Sign in · elevgw";
  const key = h("input", {
    type: "password",
    name: "api-key",
    id: "api-key",
    autocomplete: "current-password",
    required: true,
    autofocus: true,
  });
  const note = h("div", { "aria-live": "polite" }, message ? h("p", { class: "error", role: "alert" }, message) : null);
  const form = h(
    "form",
    { class: "sign-in panel" },
    h("h1", {}, "Sign in"),
    h("p", {}, "This gateway wants its API key (the value of --api-key or ELEVGW_API_KEY). It is kept in this tab only and sent in a header, never in a URL."),
    h("label", { for: "api-key" }, "API key"),
    key,
    h("button", { type: "submit" }, "Sign in"),
    note,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    auth.set(key.value.trim());
    await start("The gateway refused this key.");
  });
  replace(main, form);
  key.focus();
}

/** Checks the key (or that none is needed) with one small call, then shows the console. */
async function start(refusedMessage) {
  try {
    await get("/api/v1/devices?limit=1");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      auth.clear();
      signIn(refusedMessage);
    } else {
      replace(main, failure(error), h("button", { type: "button", onclick: () => start(refusedMessage) }, "Try again"));
    }
    return;
  }
  nav.hidden = false;
  live.hidden = false;
  signOut.hidden = !auth.key;
  route();
  stream.start();
}

onUnauthorized(() => {
  auth.clear();
  signIn("The gateway no longer accepts the key: sign in again.");
});
signOut.addEventListener("click", () => {
  auth.clear();
  signIn("Signed out.");
});
window.addEventListener("hashchange", () => {
  if (!nav.hidden) route();
});
start(auth.key ? "The gateway refused the stored key: sign in again." : null);
