// Building the page. Everything a device or the backend sent (locations, logs, command data)
// goes in as text nodes, never as HTML.

export function h(tag, attributes, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "class") element.className = value;
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, value);
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else element.append(child instanceof Node ? child : String(child));
  }
}

const SVG = "http://www.w3.org/2000/svg";

export function svg(tag, attributes, ...children) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes || {})) element.setAttribute(name, value);
  for (const child of children) if (child) element.append(child);
  return element;
}

export function replace(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

/** Epoch milliseconds as local date and time, to the second. */
export function when(ms) {
  if (ms === null || ms === undefined) return "never";
  const date = new Date(ms);
  const pad = (n) => String(n).padStart(2, "0");
  return (
    `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`
  );
}

/** How long ago, in words an operator reads at a glance. */
export function ago(ms) {
  if (ms === null || ms === undefined) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

export function status(online) {
  return h(
    "span",
    { class: online ? "badge online" : "badge offline" },
    online ? "online" : "offline",
  );
}

/** A panel that says plainly that this gateway does not offer something yet. */
export function unavailable(what) {
  return h("p", { class: "unavailable" }, `${what} is not available on this gateway.`);
}

export function failure(error) {
  return h("p", { class: "error", role: "alert" }, error.message || String(error));
}

export function json(value) {
  if (value === undefined) return "";
  return typeof value === "string" ? value : JSON.stringify(value);
}

/** A table of objects: the given columns first, then any other field the rows have. */
export function table(rows, columns, cells = {}) {
  const names = [...columns];
  for (const row of rows) {
    for (const name of Object.keys(row)) if (!names.includes(name)) names.push(name);
  }
  return h(
    "div",
    { class: "scroll" },
    h(
      "table",
      {},
      h("thead", {}, h("tr", {}, names.map((name) => h("th", {}, name.replaceAll("_", " "))))),
      h(
        "tbody",
        {},
        rows.map((row) =>
          h(
            "tr",
            {},
            names.map((name) => h("td", {}, cells[name] ? cells[name](row[name], row) : json(row[name]))),
          ),
        ),
      ),
    ),
  );
}

export function deviceLink(deviceId) {
  return h("a", { href: `#/device/${encodeURIComponent(deviceId)}` }, deviceId);
}
