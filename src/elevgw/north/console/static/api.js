// Talking to the gateway: the API key, JSON calls, snapshot images and the event stream.
//
// The key lives in sessionStorage (gone when the tab closes) and only ever travels in an
// Authorization header, never in a URL: the event stream is read with fetch() and a stream
// reader instead of EventSource, which cannot send headers.

const KEY_NAME = "elevgw.apiKey";

export const auth = {
  get key() {
    return sessionStorage.getItem(KEY_NAME) || "";
  },
  set(key) {
    sessionStorage.setItem(KEY_NAME, key);
  },
  clear() {
    sessionStorage.removeItem(KEY_NAME);
  },
};

let unauthorized = () => {};

/** Called when the gateway answers 401: the key is missing, wrong or was changed. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

const DEVICE_ANSWERS = new Set(["unknown_device", "device_offline", "unknown_command"]);

export class ApiError extends Error {
  constructor(status, body) {
    const detail = (body && (body.detail || body.error)) || `HTTP ${status}`;
    super(detail);
    this.status = status;
    this.body = body || {};
    this.code = this.body.error || "";
  }

  /** The gateway does not offer this: an older gateway, a feature not deployed yet or
   * switched off (404 event_log_off). A 404 about the device itself is not this. */
  get missingEndpoint() {
    if (this.status === 405) return true;
    return this.status === 404 && !DEVICE_ANSWERS.has(this.code);
  }
}

function headers(extra) {
  const result = { Accept: "application/json", ...extra };
  if (auth.key) result.Authorization = "Bearer " + auth.key;
  return result;
}

/** One API call: resolves with the JSON body of a 2xx answer, rejects with ApiError. */
export async function call(method, path, body) {
  const init = {
    method,
    headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
    cache: "no-store",
    credentials: "omit",
  };
  if (body !== undefined) init.body = JSON.stringify(body);
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ApiError(0, { error: "network", detail: "the gateway did not answer" });
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (error) {
    data = { error: "bad_response", detail: text.slice(0, 200) };
  }
  if (response.status === 401) unauthorized();
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export const get = (path) => call("GET", path);

/** A URL an <img> can show: same-origin snapshots are fetched with the key (the gateway
 * wants it for /snapshots/ too); others (a bucket's URL) are shown as they are, so the key
 * never leaves for another host. */
export async function imageSource(url) {
  const target = new URL(url, location.href);
  if (target.origin !== location.origin) return url;
  const response = await fetch(target.pathname + target.search, {
    headers: headers({ Accept: "image/*" }),
    credentials: "omit",
  });
  if (!response.ok) throw new ApiError(response.status, null);
  return URL.createObjectURL(await response.blob());
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * The live event stream (Server-Sent Events at /api/v1/events/stream).
 *
 * onEvent(event) gets each entry (the JSON of its data, with its cursor); onState(state,
 * detail) hears "connecting", "live", "disconnected" (detail: seconds to the next try) and
 * "unavailable" (the gateway has no stream). It reconnects with backoff and resumes from the
 * last entry it saw with Last-Event-ID, so nothing is missed across a reconnect. A stream
 * that dropped before it delivered any entry has nothing to resume from: "live" then comes
 * with detail "gap", and the page should reload what it shows.
 */
export class EventStream {
  constructor(onEvent, onState) {
    this.onEvent = onEvent;
    this.onState = onState;
    this.lastId = null;
    this.stopped = true;
    this.controller = null;
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.run();
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
  }

  async run() {
    let delay = 1000;
    let first = true;
    while (!this.stopped) {
      this.controller = new AbortController();
      const extra = { Accept: "text/event-stream" };
      if (this.lastId) extra["Last-Event-ID"] = this.lastId;
      this.onState("connecting");
      try {
        const response = await fetch("/api/v1/events/stream", {
          headers: headers(extra),
          cache: "no-store",
          credentials: "omit",
          signal: this.controller.signal,
        });
        if (response.status === 404 || response.status === 405) {
          this.stopped = true;
          this.onState("unavailable");
          return;
        }
        if (response.status === 401) {
          this.stopped = true;
          unauthorized();
          return;
        }
        if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
        this.onState("live", !first && !this.lastId ? "gap" : "");
        first = false;
        delay = 1000;
        await this.read(response.body);
      } catch (error) {
        // Dropped, refused or aborted: the loop decides whether to try again.
      }
      if (this.stopped) return;
      this.onState("disconnected", Math.round(delay / 1000));
      await sleep(delay);
      delay = Math.min(delay * 2, 30000);
    }
  }

  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let entry = { id: null, type: "", data: [] };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        let line = buffer.slice(0, end);
        buffer = buffer.slice(end + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          this.dispatch(entry);
          entry = { id: null, type: "", data: [] };
          continue;
        }
        if (line.startsWith(":")) continue; // a keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "data") entry.data.push(text);
        else if (field === "id") entry.id = text;
        else if (field === "event") entry.type = text;
      }
    }
  }

  dispatch(entry) {
    if (entry.id !== null) this.lastId = entry.id;
    if (!entry.data.length) return;
    let event;
    try {
      event = JSON.parse(entry.data.join("\n"));
    } catch (error) {
      return;
    }
    if (typeof event !== "object" || event === null) return;
    if (!event.type && entry.type) event.type = entry.type;
    if (!event.cursor && entry.id) event.cursor = entry.id;
    this.onEvent(event);
  }
}
