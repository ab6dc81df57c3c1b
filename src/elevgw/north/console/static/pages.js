// The console's three pages. Each page function draws into ``root`` and returns
// { onEvent(event), refresh(), dispose() }: the shell hands it every live event and asks it to
// refresh when there is no live stream to follow.

import { ApiError, call, get, imageSource } from "./api.js";
import {
  ago,
  deviceLink,
  failure,
  h,
  json,
  replace,
  status,
  table,
  unavailable,
  when,
} from "./dom.js";
import { churnChart, onlineChart } from "./plot.js";

const PAGE_SIZE = 50;

/** Calls ``fn`` at most once per ``ms``: at the first call, then once more at the end of
 * the window if it was called again meanwhile. A reconnect storm of thousands of events
 * costs the gateway one fleet report per window, not one per event. */
function throttle(fn, ms) {
  let timer = null;
  let again = false;
  const fire = () => {
    timer = null;
    if (again) {
      again = false;
      fn();
      timer = setTimeout(fire, ms);
    }
  };
  return () => {
    if (timer) {
      again = true;
      return;
    }
    fn();
    timer = setTimeout(fire, ms);
  };
}

/** Calls ``fn`` once calls have stopped for ``ms``, with the last call's arguments. */
function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

function isOnlineEvent(event) {
  return event.type === "status" && event.status === "online";
}

function isStatusEvent(event) {
  return event.type === "status" && (event.status === "online" || event.status === "offline");
}

/** Draws ``load()``'s answer into ``box``: a "not available" panel for a gateway without
 * the endpoint, the error otherwise. */
async function fill(box, what, load, draw) {
  try {
    const data = await load();
    replace(box, draw(data));
  } catch (error) {
    if (error instanceof ApiError && error.missingEndpoint) replace(box, unavailable(what));
    else replace(box, failure(error));
  }
}

function section(title, ...children) {
  return h("section", { class: "panel" }, h("h2", {}, title), ...children);
}

function figure(label, value, className) {
  const words = label.charAt(0).toUpperCase() + label.slice(1);
  return h("div", { class: "figure " + (className || "") }, h("div", { class: "value" }, value), h("div", { class: "label" }, words));
}

// -- fleet

function lagText(ms) {
  return ms === null || ms === undefined ? "–" : `${Math.round(ms)} ms`;
}

/** The cluster's part of /healthz, when this gateway is one node of several. */
function busText(cluster) {
  if (!cluster) return "not in use (single node)";
  const parts = [`bus ${cluster.bus}`, `lease ${cluster.lease}`];
  if (cluster.routed_p99_ms !== null && cluster.routed_p99_ms !== undefined) {
    parts.push(`routed calls p99 ${cluster.routed_p99_ms} ms`);
  }
  return h("span", { class: cluster.ok ? "" : "bad" }, parts.join(", "));
}

function healthRows(node, healthz) {
  const store = node.store || {};
  const hooks = node.webhooks;
  const reactor = node.reactor || {};
  const rows = [
    ["Node", `${node.node_id} (elevgw ${node.version})`],
    ["Up since", when(node.started)],
    [
      "Store",
      h(
        "span",
        { class: store.ok ? "good" : "bad" },
        store.ok
          ? `${store.name}: answering in ${store.latency_ms} ms`
          : `${store.name}: unavailable (${store.error || "no answer"})`,
      ),
    ],
    [
      "Webhooks",
      hooks
        ? h(
            "span",
            { class: hooks.queued > 1000 ? "bad" : "" },
            `${hooks.queued} queued, ${hooks.in_flight} in flight; ` +
              `${hooks.delivered} delivered, ${hooks.failed} failed, ${hooks.dropped} dropped`,
          )
        : "off (no --backend-url)",
    ],
    ["Cluster bus", busText(healthz && healthz.cluster)],
    [
      "Reactor lag",
      h(
        "span",
        { class: reactor.max_lag_ms > 250 ? "bad" : "" },
        `${lagText(reactor.lag_ms)} now, ${lagText(reactor.max_lag_ms)} at most in the last minute`,
      ),
    ],
  ];
  return h("dl", { class: "facts" }, rows.map(([name, value]) => [h("dt", {}, name), h("dd", {}, value)]));
}

function counts(fleet, node) {
  const found = (fleet && (fleet.counts || fleet.states)) || null;
  if (found) {
    return Object.entries(found).map(([name, value]) =>
      figure(name.replaceAll("_", " "), typeof value === "object" ? json(value) : value, name),
    );
  }
  return [figure("online on this node", node ? node.sessions : "–", "online")];
}

function deviceTable(rows) {
  if (!rows || !rows.length) return h("p", { class: "muted" }, "None.");
  return table(rows, ["device_id"], {
    device_id: (id) => deviceLink(id),
    last_seen: (ms) => (typeof ms === "number" ? `${when(ms)} (${ago(ms)})` : json(ms)),
  });
}

export function fleetPage(root) {
  const figures = h("div", { class: "figures" }, h("p", { class: "muted" }, "Loading…"));
  const onlineBox = h("div", {});
  const churnBox = h("div", {});
  const healthBox = h("div", {});
  const flappingBox = h("div", {});
  const silentBox = h("div", {});
  replace(
    root,
    h("h1", {}, "Fleet"),
    figures,
    h(
      "div",
      { class: "columns" },
      section("Devices online (this node)", onlineBox),
      section("Connects and disconnects per minute", churnBox, h("p", { class: "legend" }, h("span", { class: "key connects" }), " connects ", h("span", { class: "key disconnects" }), " disconnects")),
    ),
    section("Gateway health", healthBox),
    h("div", { class: "columns" }, section("Top flapping devices", flappingBox), section("Long-silent devices", silentBox)),
  );

  // The fleet report reads every device from the store (about a second of the gateway's
  // reactor for 20,000 devices on Redis), so it is asked for once a minute; between reports
  // the online and offline counts follow the status events, and the node status (cheap)
  // refreshes every 15 s.
  let fleet = null;
  let node = null;

  function drawCounts() {
    replace(figures, counts(fleet, node));
  }

  async function loadNode() {
    try {
      node = await get("/api/v1/status");
    } catch (error) {
      node = null;
      if (error instanceof ApiError && error.missingEndpoint) replace(healthBox, unavailable("The node status"));
      else replace(healthBox, failure(error));
    }
    if (node) {
      let healthz = null;
      try {
        healthz = await get("/healthz");
      } catch (error) {
        healthz = error instanceof ApiError ? error.body : null; // 503 still says why
      }
      replace(healthBox, healthRows(node, healthz));
      const samples = [...node.history, { ts: node.now, online: node.sessions }];
      replace(onlineBox, onlineChart(samples));
      replace(churnBox, churnChart(node.history));
    }
    drawCounts();
  }

  async function loadFleet() {
    try {
      fleet = await get("/api/v1/fleet/health");
      replace(flappingBox, deviceTable(fleet.flapping || fleet.top_flapping || []));
      replace(silentBox, deviceTable(fleet.silent || fleet.long_silent || []));
    } catch (error) {
      fleet = null;
      const panel = error instanceof ApiError && error.missingEndpoint ? unavailable("Fleet health") : failure(error);
      replace(flappingBox, panel);
      replace(silentBox, panel.cloneNode(true));
    }
    drawCounts();
  }

  function refresh() {
    loadNode();
    loadFleet();
  }

  const soon = throttle(loadNode, 5000);
  refresh();
  const timers = [setInterval(loadNode, 15000), setInterval(loadFleet, 60000)];
  return {
    refresh,
    onEvent(event) {
      if (!isStatusEvent(event)) return;
      const found = fleet && fleet.counts;
      // A takeover moves a device that was online already: no count changes.
      if (found && "online" in found && "offline" in found && event.reason !== "takeover") {
        const change = isOnlineEvent(event) ? 1 : -1;
        found.online = Math.max(0, found.online + change);
        found.offline = Math.max(0, found.offline - change);
        drawCounts();
      }
      soon();
    },
    dispose() {
      timers.forEach(clearInterval);
    },
  };
}

// -- devices

function deviceRow(device) {
  return h(
    "tr",
    { "data-device": device.device_id },
    h("td", {}, deviceLink(device.device_id)),
    h("td", {}, device.location),
    h("td", { class: "state" }, status(device.online)),
    h("td", { class: "seen", title: when(device.last_seen) }, ago(device.last_seen)),
    h("td", {}, device.node || "–"),
  );
}

export function devicesPage(root, params, navigate) {
  const search = h("input", {
    type: "search",
    name: "q",
    placeholder: "Search id or location",
    value: params.get("q") || "",
    "aria-label": "search devices by id or location",
  });
  const filter = h(
    "select",
    { name: "online", "aria-label": "online filter" },
    h("option", { value: "" }, "all devices"),
    h("option", { value: "true" }, "online"),
    h("option", { value: "false" }, "offline"),
  );
  filter.value = params.get("online") || "";
  const body = h("tbody", {});
  const more = h("button", { type: "button", class: "more", hidden: true }, "Load more");
  const note = h("p", { class: "muted", "aria-live": "polite" });
  let next = null;
  let shown = 0;
  let generation = 0;

  replace(
    root,
    h("h1", {}, "Devices"),
    h("form", { class: "toolbar", role: "search", onsubmit: (e) => e.preventDefault() }, search, filter),
    h(
      "div",
      { class: "scroll" },
      h(
        "table",
        { class: "devices" },
        h("thead", {}, h("tr", {}, ["device", "location", "status", "last seen", "node"].map((t) => h("th", {}, t)))),
        body,
      ),
    ),
    note,
    more,
  );

  function query(after, size) {
    const args = new URLSearchParams({ limit: String(size || PAGE_SIZE) });
    if (search.value.trim()) args.set("q", search.value.trim());
    if (filter.value) args.set("online", filter.value);
    if (after) args.set("after", after);
    return "/api/v1/devices?" + args;
  }

  /** One page of ``size`` rows. A filtered page may come back short with a ``next`` (the
   * gateway bounds each request's work): the console then asks on, a few times at most, so
   * the operator sees a full page without clicking through empty ones. */
  async function load(after, size) {
    const mine = ++generation;
    const wanted = size || PAGE_SIZE;
    more.disabled = true;
    note.textContent = "Loading…";
    try {
      let page = await get(query(after, wanted));
      if (mine !== generation) return;
      if (!after) {
        body.replaceChildren();
        shown = 0;
      }
      let got = 0;
      for (let tries = 0; ; tries++) {
        for (const device of page.devices) body.append(deviceRow(device));
        shown += page.devices.length;
        got += page.devices.length;
        next = page.next;
        if (got >= wanted || !next || tries >= 10) break;
        note.textContent = `${shown} shown; looking further…`;
        page = await get(query(next, wanted - got));
        if (mine !== generation) return;
      }
      more.hidden = !next;
      more.disabled = false;
      note.textContent = `${shown} device${shown === 1 ? "" : "s"} shown` + (next ? "; more below." : ".");
    } catch (error) {
      if (mine !== generation) return;
      replace(note, failure(error));
    }
  }

  function filtersChanged() {
    const args = new URLSearchParams();
    if (search.value.trim()) args.set("q", search.value.trim());
    if (filter.value) args.set("online", filter.value);
    navigate("#/devices" + (args.toString() ? "?" + args : ""), { replace: true, quiet: true });
    load(null);
  }

  search.addEventListener("input", debounce(filtersChanged, 300));
  filter.addEventListener("change", filtersChanged);
  more.addEventListener("click", () => load(next));
  load(null);

  if (params.get("revoked")) {
    root.querySelector("h1").after(h("p", { class: "good", role: "status" }, `${params.get("revoked")} is revoked.`));
  }

  return {
    // Reloads as many devices as are shown (at most 1,000), so polling keeps "Load more"'s rows.
    refresh: () => load(null, Math.min(1000, Math.max(PAGE_SIZE, shown))),
    onEvent(event) {
      if (!isStatusEvent(event)) return;
      const row = body.querySelector(`tr[data-device="${CSS.escape(event.device_id)}"]`);
      if (!row) return;
      row.querySelector(".state").replaceChildren(status(isOnlineEvent(event)));
      const seen = row.querySelector(".seen");
      seen.textContent = ago(event.ts);
      seen.title = when(event.ts);
    },
    dispose() {
      generation++;
    },
  };
}

// -- one device

function numberOrNull(input) {
  const text = input.value.trim();
  return text === "" ? null : Number(text);
}

function commandData(text) {
  if (!text.trim()) return null;
  try {
    return JSON.parse(text);
  } catch (error) {
    return text; // plain text is sent as a JSON string
  }
}

const PENDING = new Set(["queued", "sent"]);

export function devicePage(root, params, navigate, deviceId) {
  const base = `/api/v1/devices/${encodeURIComponent(deviceId)}`;
  const header = h("div", { class: "device-header" }, h("p", { class: "muted" }, "Loading…"));
  const healthBox = h("div", {});
  const gallery = h("div", { class: "gallery" });
  const snapshotNote = h("p", { class: "muted", "aria-live": "polite" });
  const commandsBox = h("div", {});
  const sendNote = h("div", { "aria-live": "polite" });
  const logsBox = h("div", {});
  const tokenBox = h("div", { "aria-live": "polite" });
  const shownSnapshots = new Set();
  let device = null;
  let disposed = false;

  const commandInput = h("input", { name: "command", required: true, placeholder: "REBOOT", autocomplete: "off" });
  const dataInput = h("textarea", { name: "data", rows: 2, placeholder: '{"volume": 3} or plain text' });
  const waitInput = h("input", { name: "wait", type: "number", min: 0, step: "any", placeholder: "seconds" });
  const ttlInput = h("input", { name: "ttl", type: "number", min: 0, step: "any", placeholder: "seconds" });
  const collapseInput = h("input", { name: "collapse_key", autocomplete: "off" });
  const sendForm = h(
    "form",
    { class: "command-form", onsubmit: sendCommand },
    h("label", {}, "Command", commandInput),
    h("label", { class: "wide" }, "Data (JSON)", dataInput),
    h("label", {}, "Wait for the ack", waitInput),
    h("label", {}, "Queue while offline (ttl)", ttlInput),
    h("label", {}, "Collapse key", collapseInput),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Send command")),
  );
  const snapshotButton = h("button", { type: "button", onclick: takeSnapshot }, "Take snapshot");
  const dangerBox = h("div", { class: "danger" });

  replace(
    root,
    h("p", { class: "crumbs" }, h("a", { href: "#/devices" }, "Devices"), " / ", deviceId),
    header,
    h(
      "div",
      { class: "columns" },
      section("Health", healthBox),
      section("Snapshots", h("div", { class: "actions" }, snapshotButton), snapshotNote, gallery),
    ),
    section("Commands", sendForm, sendNote, commandsBox),
    section("Recent logs", h("div", { class: "actions" }, h("button", { type: "button", onclick: loadLogs }, "Refresh")), logsBox),
    section("Credentials", tokenBox, dangerBox),
  );

  function drawHeader() {
    replace(
      header,
      h("h1", {}, device.location, " ", status(device.online)),
      h(
        "dl",
        { class: "facts" },
        h("dt", {}, "Device id"),
        h("dd", {}, h("code", {}, device.device_id)),
        h("dt", {}, "Last seen"),
        h("dd", { class: "last-seen" }, device.last_seen ? `${when(device.last_seen)} (${ago(device.last_seen)})` : "never"),
        h("dt", {}, "Connected since"),
        h("dd", {}, device.connected_since ? when(device.connected_since) : "–"),
        h("dt", {}, "Node"),
        h("dd", {}, device.node || "–"),
        h("dt", {}, "Registered"),
        h("dd", {}, when(device.created)),
      ),
    );
  }

  async function loadDevice() {
    try {
      device = await get(base);
      drawHeader();
      return true;
    } catch (error) {
      if (error instanceof ApiError && error.code === "unknown_device") {
        replace(header, h("h1", {}, deviceId), h("p", { class: "error" }, "No such device: it was revoked or never registered."));
        for (const element of [sendForm, snapshotButton]) element.hidden = true;
      } else {
        replace(header, failure(error));
      }
      return false;
    }
  }

  function loadHealth() {
    return fill(healthBox, "Device health", () => get(base + "/health"), (health) => {
      const rows = [];
      const shown = new Set(["device_id", "online", "node", "last_seen"]);
      const fact = (name, value, ...keys) => {
        if (!keys.some((key) => key in health)) return;
        keys.forEach((key) => shown.add(key));
        rows.push(h("dt", {}, name), h("dd", {}, value));
      };
      const pct = (value) => (value === null || value === undefined ? "–" : `${value} %`);
      fact("Online", `${pct(health.online_pct_24h)} of the last 24 h, ${pct(health.online_pct_7d)} of 7 days`, "online_pct_24h", "online_pct_7d");
      fact("Connects", json(health.connects), "connects");
      const reasons = Object.entries(health.disconnects || {});
      fact("Disconnects", reasons.length ? reasons.map(([why, n]) => `${n} ${why}`).join(", ") : "none", "disconnects");
      fact("Flaps", `${health.flaps_24h} in 24 h (${health.flaps} in all)`, "flaps", "flaps_24h");
      fact("Takeovers", json(health.takeovers), "takeovers");
      fact("Online since", health.online_since ? when(health.online_since) : "–", "online_since");
      const last = health.last_disconnect;
      fact("Last disconnect", last ? `${last.reason} at ${when(last.at)}` : "–", "last_disconnect");
      fact("Watched since", when(health.observed_since), "observed_since");
      for (const [name, value] of Object.entries(health)) {
        if (shown.has(name)) continue;
        const text = value && typeof value === "object" && !Array.isArray(value)
          ? Object.entries(value).map(([k, v]) => `${k.replaceAll("_", " ")}: ${json(v)}`).join(", ")
          : json(value);
        rows.push(h("dt", {}, name.replaceAll("_", " ")), h("dd", {}, text));
      }
      return h("dl", { class: "facts" }, rows);
    });
  }

  async function showSnapshot(snapshot, first) {
    const url = snapshot.url;
    if (!url || shownSnapshots.has(url)) return;
    shownSnapshots.add(url);
    const image = h("img", { alt: `snapshot of ${deviceId}`, loading: "lazy" });
    const item = h("figure", {}, h("a", { href: "#", title: "open full size" }, image), h("figcaption", {}, when(snapshot.taken_at || snapshot.ts)));
    if (first) gallery.prepend(item);
    else gallery.append(item);
    while (gallery.children.length > 12) gallery.lastChild.remove();
    try {
      const source = await imageSource(url);
      image.src = source;
      item.querySelector("a").addEventListener("click", (e) => {
        e.preventDefault();
        window.open(source, "_blank", "noopener");
      });
    } catch (error) {
      item.append(failure(error));
    }
  }

  async function loadSnapshots() {
    try {
      const found = await get(`/api/v1/events?device_id=${encodeURIComponent(deviceId)}&type=snapshot&limit=500`);
      const events = (found.events || []).slice(-8).reverse();
      for (const event of events) await showSnapshot(event, false);
      if (!events.length && !gallery.children.length) snapshotNote.textContent = "No snapshot yet.";
    } catch (error) {
      if (!(error instanceof ApiError && error.missingEndpoint)) replace(snapshotNote, failure(error));
      else if (!gallery.children.length) snapshotNote.textContent = "Snapshots taken here appear below.";
    }
  }

  async function takeSnapshot() {
    snapshotButton.disabled = true;
    snapshotNote.textContent = "Asking the device for a snapshot…";
    try {
      const snapshot = await get(`/api/v1/devices/remote/${encodeURIComponent(deviceId)}/snapshot?timeout=20`);
      snapshotNote.textContent = `Snapshot received: ${snapshot.size} bytes, ${snapshot.content_type}.`;
      await showSnapshot(snapshot, true);
    } catch (error) {
      replace(snapshotNote, failure(error));
    } finally {
      snapshotButton.disabled = false;
    }
  }

  async function cancelCommand(commandId) {
    try {
      await call("DELETE", `${base}/commands/${encodeURIComponent(commandId)}`);
    } catch (error) {
      replace(sendNote, failure(error));
    }
    loadCommands();
  }

  function commandRows(commands) {
    if (!commands.length) return h("p", { class: "muted" }, "No commands yet.");
    return table(commands, ["id", "command", "state", "data", "result", "created", "updated", "expires"], {
      state: (state, row) =>
        h(
          "span",
          {},
          h("span", { class: `state-${state}` }, state),
          PENDING.has(state)
            ? [" ", h("button", { type: "button", class: "small", onclick: () => cancelCommand(row.id) }, "Cancel")]
            : null,
        ),
      created: (ms) => when(ms),
      updated: (ms) => when(ms),
      expires: (ms) => (ms ? when(ms) : "–"),
      collapse_key: (key) => key || "–",
    });
  }

  function loadCommands() {
    return fill(commandsBox, "Command history", () => get(base + "/commands"), (answer) =>
      commandRows(answer.commands || answer),
    );
  }

  async function sendCommand(e) {
    e.preventDefault();
    const body = { command: commandInput.value.trim(), data: commandData(dataInput.value) };
    const wait = numberOrNull(waitInput);
    const ttl = numberOrNull(ttlInput);
    if (wait !== null) body.wait = wait;
    if (ttl !== null) body.ttl = ttl;
    if (collapseInput.value.trim()) body.collapse_key = collapseInput.value.trim();
    const button = sendForm.querySelector("button");
    button.disabled = true;
    replace(sendNote, h("p", { class: "muted" }, wait ? `Waiting up to ${wait} s for the device…` : "Sending…"));
    try {
      const answer = await call("POST", base + "/commands", body);
      replace(sendNote, h("p", { class: "good" }, `Command ${answer.id}: ${answer.state}` + (answer.result !== undefined ? `, result ${json(answer.result)}` : "")));
    } catch (error) {
      if (error instanceof ApiError && error.missingEndpoint) {
        await sendDirect(body);
      } else if (error instanceof ApiError && error.body.id) {
        replace(sendNote, h("p", { class: "error" }, `Command ${error.body.id}: ${error.body.state || error.code} (${error.message})`));
      } else {
        replace(sendNote, failure(error));
      }
    } finally {
      button.disabled = false;
      loadCommands();
    }
  }

  /** A gateway without command tracking still takes POST /api/send. */
  async function sendDirect(body) {
    try {
      const answer = await call("POST", "/api/send", { device_id: deviceId, command: body.command, data: body.data });
      replace(sendNote, h("p", { class: "good" }, `Command ${answer.id}: sent (this gateway does not track command states).`));
    } catch (error) {
      replace(sendNote, failure(error));
    }
  }

  async function loadLogs() {
    await fill(logsBox, "The log", () => get(base + "/logs?limit=50"), (answer) => {
      if (!answer.logs.length) return h("p", { class: "muted" }, "No logs.");
      return h("ol", { class: "logs" }, answer.logs.map((entry) => h("li", {}, h("time", {}, when(entry.ts)), " ", h("code", {}, json(entry.payload)))));
    });
  }

  function confirmStep(label, question, action) {
    const start = h("button", { type: "button", class: "warn" }, label);
    const box = h("span", {}, start);
    start.addEventListener("click", () => {
      const yes = h("button", { type: "button", class: "warn" }, "Yes, " + label.toLowerCase());
      const no = h("button", { type: "button" }, "Cancel");
      replace(box, h("span", { class: "question" }, question, " "), yes, " ", no);
      no.addEventListener("click", () => replace(box, start));
      yes.addEventListener("click", async () => {
        yes.disabled = no.disabled = true;
        try {
          await action();
        } catch (error) {
          replace(tokenBox, failure(error));
        }
        replace(box, start);
      });
    });
    return box;
  }

  replace(
    dangerBox,
    confirmStep("Rotate token", "The device's current token stops working at once.", async () => {
      const answer = await call("POST", base + "/token");
      const value = h("code", { class: "token" }, answer.token);
      replace(
        tokenBox,
        h(
          "div",
          { class: "token-box", role: "status" },
          h("p", {}, "New token, shown only now: put it on the device before you leave this page."),
          value,
          " ",
          h("button", { type: "button", onclick: () => navigator.clipboard && navigator.clipboard.writeText(answer.token) }, "Copy"),
        ),
      );
    }),
    " ",
    confirmStep("Revoke", "The device is disconnected and can no longer sign in.", async () => {
      await call("DELETE", base);
      replace(tokenBox, h("p", { class: "good" }, `${deviceId} is revoked.`));
      navigate("#/devices?revoked=" + encodeURIComponent(deviceId));
    }),
  );

  async function refresh() {
    if (await loadDevice()) {
      loadHealth();
      loadCommands();
      loadLogs();
      loadSnapshots();
    }
  }

  const soonHealth = throttle(loadHealth, 2000);
  const soonCommands = throttle(loadCommands, 500);
  refresh();

  return {
    refresh,
    onEvent(event) {
      if (disposed || event.device_id !== deviceId) return;
      if (isStatusEvent(event) && device) {
        device.online = isOnlineEvent(event);
        device.last_seen = event.ts;
        if (!device.online) device.connected_since = null;
        else device.connected_since = event.ts;
        drawHeader();
        soonHealth();
      } else if (event.type === "snapshot") {
        showSnapshot(event, true);
        snapshotNote.textContent = "";
      } else if (event.type === "command") {
        soonCommands();
      }
    },
    dispose() {
      disposed = true;
    },
  };
}
