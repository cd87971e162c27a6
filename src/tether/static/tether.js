// tether.js — the browser client of a tether hub (SPEC §4, §7, §9).
//
// An ES module with no build step and no dependencies:
//
//   import { TetherClient } from "/tether.js";
//   const client = new TetherClient({ topics: ["orders"] });
//   client.on("message", (msg) => console.log(msg.topic, msg.seq, msg));
//   client.on("state", ({ state, attempt, delay }) => console.log(state, attempt, delay));
//   client.connect();
//
// What it does, and why:
// - Reconnects with exponential backoff (1 s → 30 s) and full jitter; even the
//   first retry is random, so a server restart does not bring every browser
//   back in the same instant.
// - The backoff resets after a sleep (a timer that fired far later than it was
//   scheduled): the machine was away, and its next attempts should be quick.
// - Browsers answer the server's protocol pings by themselves and never show
//   them to JavaScript, and a half-open connection (after a sleep or a network
//   change) never fires `close`. So the client runs its own liveness watchdog:
//   when nothing arrived for `pingInterval` it sends {"type":"ping","id"}; no
//   answer (no message at all) within `pongTimeout` → close and reconnect. The
//   round trip of that ping is the RTT it reports.
// - Deadlines are wall-clock differences (Date.now()), never counts of timer
//   callbacks, and are checked at once on `visibilitychange` and `online`.
//   Hidden tabs, whose timers browsers throttle to about once a minute, get at
//   least `hiddenSlack` (60 s) before a missing answer counts.
// - It keeps the last `seq` of each topic and reconnects with
//   `?topics=...&since=topic:seq,...`, so the server replays what was missed
//   (SPEC §7); a gap older than the server's history arrives as a `resync` event.
// - With a `token` (or `getToken()`, an async function called before each
//   connect and again before the token expires), it sends {"type":"auth","token"}
//   first, then resumes and subscribes once the server says `authenticated`,
//   so the token stays out of URLs. A server that refuses the token (close 4003,
//   or 4001 when there is no getToken to ask for a fresh one) ends in state
//   `unauthorized`: retrying with it cannot succeed.
//
// The decisions (backoff delays, sleep detection, watchdog deadlines, the
// reconnect URL) are pure functions exported below, tested in Node with an
// injected clock and random source.

export const DEFAULTS = Object.freeze({
  url: null, // default: ws(s)://<this page's host>/ws
  topics: [], // topics besides "*", which every client receives
  since: null, // {topic: seq} to resume from on the first connect
  epoch: null, // the server epoch those seqs belong to (from an earlier `connected`)
  baseDelay: 1000, // ms: backoff cap of the first retry
  maxDelay: 30000, // ms: backoff cap
  pingInterval: 20000, // ms without any message before a liveness ping
  pongTimeout: 10000, // ms to wait for an answer to that ping
  hiddenSlack: 60000, // ms: the least a hidden tab waits for an answer
  connectTimeout: 10000, // ms for the WebSocket to open and greet us
  stableAfter: 5000, // ms a connection must live before the backoff resets
  lateBy: 5000, // ms a timer may fire late before we call it a sleep
  checkInterval: 0, // ms between watchdog checks; 0: derived from the above
  autoConnect: false, // connect from the constructor
  token: null, // a connection token (JWT), sent as the first message
  getToken: null, // async () => token: called before each connect and before expiry
  refreshMargin: 30000, // ms: fetch a fresh token at most this long before expiry
});

// Close codes (tether.codes): the server's, and the ones this client closes with.
export const CODES = Object.freeze({
  TOKEN_EXPIRED: 4001, // server: the token reached its exp
  FORBIDDEN: 4003, // server: no token, or a bad one
  FORCE_RECONNECT: 4000, // client: forceReconnect()
  LIVENESS_TIMEOUT: 4002, // client: the liveness ping went unanswered
  CONNECT_TIMEOUT: 4008, // client: no greeting within connectTimeout
});

// ---------------------------------------------------------------- pure parts

/** The backoff cap of retry `attempt` (1, 2, ...): base·2^(attempt-1), at most `max`. */
export function backoffCap(attempt, { baseDelay = 1000, maxDelay = 30000 } = {}) {
  const n = Math.max(1, Math.floor(attempt));
  // 2 ** 40 is far past any cap; stop there so the power never overflows.
  return Math.min(maxDelay, baseDelay * 2 ** Math.min(n - 1, 40));
}

/**
 * The delay before retry `attempt`: "full jitter", uniform in [0, cap).
 *
 * The first retry is random too: after a server restart, N clients spread
 * over the first second instead of arriving together.
 */
export function backoffDelay(attempt, { baseDelay = 1000, maxDelay = 30000, random = Math.random } = {}) {
  const cap = backoffCap(attempt, { baseDelay, maxDelay });
  const r = Math.min(Math.max(random(), 0), 1);
  return Math.min(cap, Math.floor(r * cap));
}

/**
 * Whether a timer that was due at `due` and runs at `now` fired so late that
 * the machine must have slept (or the clock jumped). A hidden tab's timers are
 * throttled to about once a minute, so lateness there only counts beyond
 * `hiddenSlack` as well. A clock that went backwards counts as a jump.
 */
export function sleptThrough({ due, now, lateBy = 5000, hidden = false, hiddenSlack = 60000 }) {
  const late = now - due;
  if (late < -1000) return true; // the wall clock went back: start over
  return late > (hidden ? lateBy + hiddenSlack : lateBy);
}

/** The time an answer to a ping sent at `sentAt` may take: `pongTimeout`, or more when hidden. */
export function pongDeadline(sentAt, { pongTimeout = 10000, hidden = false, hiddenSlack = 60000 } = {}) {
  return sentAt + (hidden ? Math.max(pongTimeout, hiddenSlack) : pongTimeout);
}

/**
 * What the watchdog must do now: "ok", "ping", "wait" or "dead".
 *
 * - `lastReceived`: when the last message (of any kind) arrived;
 * - `awaitingSince`: when the unanswered liveness ping was sent, or null.
 *   Any message clears it: it proves the connection carries traffic.
 * - `hidden`: the tab was hidden at some time since that ping was sent.
 */
export function watchdogAction({
  now, lastReceived, awaitingSince = null,
  pingInterval = 20000, pongTimeout = 10000, hidden = false, hiddenSlack = 60000,
}) {
  if (awaitingSince !== null && awaitingSince !== undefined) {
    const deadline = pongDeadline(awaitingSince, { pongTimeout, hidden, hiddenSlack });
    return now >= deadline ? "dead" : "wait";
  }
  return now - lastReceived >= pingInterval ? "ping" : "ok";
}

/**
 * The WebSocket URL with `?topics=` and `?since=` for a resume (SPEC §7), and
 * `?epoch=`: the life of the server's history those seqs belong to, so that a
 * restarted server answers `resync` instead of replaying its new numbering.
 */
export function connectUrl(base, topics = [], lastSeq = {}, epoch = null) {
  const url = new URL(base);
  const named = [...new Set(topics)].filter((t) => t && t !== "*");
  if (named.length) url.searchParams.set("topics", named.join(","));
  else url.searchParams.delete("topics");
  const since = Object.entries(lastSeq)
    .filter(([, seq]) => Number.isInteger(seq) && seq >= 0)
    .map(([topic, seq]) => `${topic}:${seq}`);
  if (since.length) url.searchParams.set("since", since.join(","));
  else url.searchParams.delete("since");
  if (since.length && epoch) url.searchParams.set("epoch", epoch);
  else url.searchParams.delete("epoch");
  return url.toString();
}

/**
 * When to fetch a fresh token for one that expires in `expiresInMs`: ahead of
 * expiry by `margin`, or by a fifth of what is left when that is less (a 2 s
 * token is refreshed after 1.6 s), so the new one is in place in time.
 */
export function refreshDelay(expiresInMs, margin = 30000) {
  const left = Math.max(0, Number(expiresInMs) || 0);
  return Math.max(0, left - Math.min(margin, left / 5));
}

/**
 * What to do after the server closed with `code`: "retry" (reconnect with
 * backoff) or "unauthorized" (stop: the same token would be refused again).
 * An expired token (4001) is retried only when `getToken` can give a fresh one.
 */
export function afterClose(code, { canRefresh = false } = {}) {
  if (code === CODES.FORBIDDEN) return "unauthorized";
  if (code === CODES.TOKEN_EXPIRED && !canRefresh) return "unauthorized";
  return "retry";
}

/** ws(s)://host/ws for the page this module runs in. */
export function defaultUrl(loc = globalThis.location) {
  if (!loc) throw new Error("tether: no `url` given and no page location to derive it from");
  return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/ws`;
}

// ---------------------------------------------------------------- the client

const STATES = ["idle", "connecting", "connected", "reconnecting", "disconnected", "unauthorized"];

/**
 * A connection to a tether hub that stays up: reconnect, watchdog, resume.
 *
 * Events (`on(name, cb)` returns a function that removes `cb`):
 * - "message" (msg): every published message, with `topic` and `seq`;
 * - "state" ({state, attempt, delay?, code?, reason?}), and the same under
 *   the state's own name: "connecting", "connected", "reconnecting", "disconnected",
 *   "unauthorized" (the server refused the token: no more retries until connect());
 * - "resync" ({topic, seq}): a gap older than the server's history; refetch state;
 * - "rtt" (ms): the round trip of a liveness ping;
 * - "error" (msg): the server refused something we sent ({"type":"error"}; a
 *   topic the token does not grant comes with `topic`), or getToken() failed;
 * - "authenticated" (msg): the server took a token ({sub, exp, expiresIn});
 * - "control" (msg): any other server message (subscribed, unsubscribed, ...).
 */
export class TetherClient {
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options };
    const o = this.options;
    const env = options.env ?? globalThis;
    this._WebSocket = options.WebSocket ?? env.WebSocket;
    this._now = options.now ?? (() => Date.now());
    this._perf = options.perfNow ?? (() => (env.performance ?? Date).now());
    this._random = options.random ?? Math.random;
    this._setTimeout = options.setTimeout ?? ((fn, ms) => env.setTimeout(fn, ms));
    this._clearTimeout = options.clearTimeout ?? ((id) => env.clearTimeout(id));
    this._document = options.document ?? env.document ?? null;
    this._window = options.window ?? (env.addEventListener ? env : null);
    this.url = o.url ?? defaultUrl(options.location ?? env.location);
    this.checkInterval = o.checkInterval > 0 ? o.checkInterval
      : Math.max(20, Math.min(1000, Math.floor(Math.min(o.pingInterval, o.pongTimeout) / 4)));

    this.state = "idle";
    this.attempt = 0; // retries since the last stable connection
    this.reconnects = 0; // connections opened after the first
    this.sessionId = null;
    this.rtt = null; // ms, the last liveness ping's round trip
    this.lastSeq = {}; // topic → last seq received
    this.epoch = null; // the server's history's life, from `connected`
    this._seqEpoch = o.epoch ?? null; // the life `lastSeq` belongs to (sent with a resume)
    this.topics = new Set(o.topics.filter((t) => t !== "*"));
    for (const [topic, seq] of Object.entries(o.since ?? {})) this.lastSeq[topic] = seq;
    this.received = 0;
    this.duplicates = 0;
    this.gaps = 0; // holes seen in a topic's seqs (each asked for again)
    this._healing = new Set(); // topics asked for again, until the hole is filled
    this.sub = null; // the token's user, as the server read it
    this.expiresAt = null; // ms (this clock) when the server will close for expiry

    this._handlers = new Map();
    this._ws = null;
    this._wanted = false;
    this._openedAt = null;
    this._connects = 0;
    this._retry = null; // {timer, due}
    this._check = null; // {timer, due}
    this._connectTimer = null;
    this._lastReceived = 0;
    this._ping = null; // {id, sentAt, perf, hidden}
    this._pingId = 0;
    this._token = o.token; // the token of the current connection
    this._admitted = false; // may this connection send (authenticated, or no token)?
    this._awaitingSubscribed = false;
    this._refresh = null; // timer of the next getToken() for this connection
    this._attemptId = 0; // getToken() answers for an older attempt are dropped

    this._onVisibility = () => this._wake(this._hidden() ? "hidden" : "visible");
    this._onOnline = () => this._wake("online");
    this._onOffline = () => this._wake("offline");
    if (o.autoConnect) this.connect();
  }

  // ---- public API

  /** Add a callback; returns a function that removes it. */
  on(event, cb) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(cb);
    return () => this.off(event, cb);
  }

  off(event, cb) {
    this._handlers.get(event)?.delete(cb);
  }

  /** Start (or keep) a connection; reconnects until `disconnect()`. */
  connect() {
    this._want(true);
    if (!this._ws && !this._retry) this._open();
    return this;
  }

  /** Close for good: no reconnect until `connect()` is called again. */
  disconnect(code = 1000, reason = "client disconnect") {
    this._want(false);
    this._cancelRetry();
    const ws = this._drop(code, reason);
    this.attempt = 0;
    this._setState("disconnected", { code, reason, wasOpen: Boolean(ws) });
  }

  /** Drop the current connection and open a new one now (resuming by seq). */
  forceReconnect(reason = "force reconnect") {
    this._want(true);
    this._cancelRetry();
    this._drop(CODES.FORCE_RECONNECT, reason);
    this.attempt = 0;
    this._open();
  }

  /** Receive `topics` too; kept across reconnects. */
  subscribe(topics) {
    const list = [].concat(topics).filter((t) => t && t !== "*");
    for (const t of list) this.topics.add(t);
    if (list.length) this._send({ type: "subscribe", topics: list });
  }

  /** Stop receiving `topics`; their seqs are forgotten (no resume for them). */
  unsubscribe(topics) {
    const list = [].concat(topics).filter((t) => t && t !== "*");
    for (const t of list) {
      this.topics.delete(t);
      delete this.lastSeq[t];
    }
    if (list.length) this._send({ type: "unsubscribe", topics: list });
  }

  /** Use `token` (or none: null) from the next connection on; forceReconnect() to use it now. */
  setToken(token) {
    this.options.token = token || null;
    this._token = this.options.token;
  }

  /** Whether connections carry a token (`token` or `getToken`). */
  get usesToken() {
    return Boolean(this.options.getToken || this.options.token);
  }

  /** Send a liveness ping now (the answer updates `rtt`); false when not connected. */
  ping() {
    if (!this._isOpen()) return false;
    const id = ++this._pingId;
    this._ping = { id, sentAt: this._now(), perf: this._perf(), hidden: this._hidden(), answered: false };
    return this._send({ type: "ping", id });
  }

  /** The URL the next connection will use (with topics and since, unless a token is sent). */
  nextUrl() {
    if (this.usesToken) return connectUrl(this.url, [], {}); // asked for once authenticated
    return connectUrl(this.url, [...this.topics], this._since(), this._seqEpoch);
  }

  _since() {
    const since = {};
    for (const [topic, seq] of Object.entries(this.lastSeq)) {
      if (topic === "*" || this.topics.has(topic)) since[topic] = seq;
    }
    return since;
  }

  // ---- connection

  /** Whether we want a connection; page events matter only while we do. */
  _want(wanted) {
    if (wanted === this._wanted) return;
    this._wanted = wanted;
    const how = wanted ? "addEventListener" : "removeEventListener";
    this._document?.[how]?.("visibilitychange", this._onVisibility);
    this._window?.[how]?.("online", this._onOnline);
    this._window?.[how]?.("offline", this._onOffline);
  }

  _open() {
    this._connects += 1;
    if (this._connects > 1) this.reconnects += 1;
    this._setState("connecting", { attempt: this.attempt });
    const attempt = ++this._attemptId;
    const getToken = this.options.getToken;
    if (!getToken) {
      this._openSocket();
      return;
    }
    // A fresh token before each connect; an answer for an attempt given up meanwhile is dropped.
    this._retry = { timer: null, due: this._now(), delay: 0, fetching: true };
    Promise.resolve()
      .then(() => getToken())
      .then((token) => {
        if (attempt !== this._attemptId || !this._wanted) return;
        this._retry = null;
        if (typeof token !== "string" || !token) throw new Error("getToken() gave no token");
        this._token = token;
        this._openSocket();
      })
      .catch((err) => {
        if (attempt !== this._attemptId || !this._wanted) return;
        this._retry = null;
        this._emit("error", { type: "error", error: `getToken() failed: ${err?.message ?? err}` });
        this._scheduleRetry({ code: 1006, reason: "getToken() failed" });
      });
  }

  _openSocket() {
    let ws;
    try {
      ws = new this._WebSocket(this.nextUrl());
      this._urlTopics = new Set(this.usesToken ? [] : this.topics); // asked for in the URL
    } catch (err) {
      this._emit("error", { type: "error", error: String(err) });
      this._scheduleRetry({ code: 1006, reason: String(err) });
      return;
    }
    this._ws = ws;
    ws.onopen = () => this._ws === ws && this._opened();
    ws.onmessage = (ev) => this._ws === ws && this._message(ev.data);
    ws.onclose = (ev) => this._ws === ws && this._closed(ev.code, ev.reason);
    ws.onerror = () => {}; // a close event follows
    this._connectTimer = this._setTimeout(() => {
      this._connectTimer = null;
      if (this._ws === ws && this.state !== "connected") this._lost(CODES.CONNECT_TIMEOUT, "connect timeout");
    }, this.options.connectTimeout);
  }

  _opened() {
    this._openedAt = this._now();
    this._lastReceived = this._openedAt;
    this._ping = null;
    this._admitted = !this.usesToken;
    this._awaitingSubscribed = false;
    if (this.usesToken) this._sendRaw({ type: "auth", token: this._token });
    this._armCheck();
  }

  _greeted(msg) {
    this.sessionId = msg.sessionId ?? null;
    this._takePositions(msg.seqs);
    this.epoch = typeof msg.epoch === "string" ? msg.epoch : null;
    // The URL carried our positions: from here on they are of this life.
    if (!this.usesToken) {
      this._seqEpoch = this.epoch;
      // Topics added while this connection was opening (a subscribe cannot be sent
      // before it is open): asked for now.
      const late = [...this.topics].filter((t) => !this._urlTopics?.has(t));
      if (late.length) this._send({ type: "subscribe", topics: late });
    }
    if (!this.usesToken) this._ready();
  }

  /** What was asked for flows: the connection is up. */
  _ready() {
    if (this._connectTimer !== null) {
      this._clearTimeout(this._connectTimer);
      this._connectTimer = null;
    }
    this._setState("connected", { attempt: this.attempt, sessionId: this.sessionId });
  }

  /** Where each topic stands (`connected`, `subscribed`): a topic never received starts there. */
  _takePositions(seqs) {
    for (const [t, seq] of Object.entries(seqs ?? {})) {
      if (this.lastSeq[t] === undefined && Number.isInteger(seq)) this.lastSeq[t] = seq;
    }
  }

  _authenticated(msg) {
    this.sub = msg.sub ?? null;
    const expiresIn = Number.isFinite(msg.expiresIn) ? msg.expiresIn * 1000 : null;
    this.expiresAt = expiresIn === null ? null : this._now() + expiresIn;
    this._cancelRefresh();
    if (expiresIn !== null && this.options.getToken) {
      const ws = this._ws;
      this._refresh = this._setTimeout(() => this._refreshToken(ws),
        refreshDelay(expiresIn, this.options.refreshMargin));
    }
    this._emit("authenticated", msg);
    if (this._admitted) return; // a refresh
    this._admitted = true;
    const since = this._since();
    if (!Object.keys(since).length && !this.topics.size) {
      this._ready();
      return;
    }
    if (Object.keys(since).length) {
      const resume = { type: "resume", since };
      if (this._seqEpoch) resume.epoch = this._seqEpoch;
      this._send(resume);
    }
    this._seqEpoch = this.epoch;
    // The server answers in order: its `subscribed` says the resume is done too.
    this._awaitingSubscribed = true;
    this._send({ type: "subscribe", topics: [...this.topics] });
  }

  async _refreshToken(ws) {
    this._refresh = null;
    let token;
    try {
      token = await this.options.getToken();
    } catch (err) {
      // The server closes at exp (4001); the reconnect asks getToken() again.
      this._emit("error", { type: "error", error: `getToken() failed: ${err?.message ?? err}` });
      return;
    }
    if (this._ws !== ws || typeof token !== "string" || !token) return;
    this._token = token;
    this._sendRaw({ type: "auth", token });
  }

  _cancelRefresh() {
    if (this._refresh !== null) {
      this._clearTimeout(this._refresh);
      this._refresh = null;
    }
  }

  _closed(code, reason) {
    if (afterClose(code, { canRefresh: Boolean(this.options.getToken) }) === "unauthorized") {
      this._drop(1000, reason);
      this._want(false);
      this.attempt = 0;
      this._setState("unauthorized", { code, reason });
      return;
    }
    this._lost(code, reason);
  }

  /** The connection is gone (closed, or given up on): clean up and retry. */
  _lost(code, reason) {
    this._drop(code === 1006 ? 1000 : code, reason);
    if (this._wanted) this._scheduleRetry({ code, reason });
    else this._setState("disconnected", { code, reason });
  }

  /** Detach and close the current socket; returns it (or null). */
  _drop(code, reason) {
    const ws = this._ws;
    this._ws = null;
    this._admitted = false;
    this._cancelCheck();
    this._cancelRefresh();
    if (this._connectTimer !== null) {
      this._clearTimeout(this._connectTimer);
      this._connectTimer = null;
    }
    this._ping = null;
    if (this._openedAt !== null) {
      // A connection that lived long enough was a success: the next retry starts over.
      if (this._now() - this._openedAt >= this.options.stableAfter) this.attempt = 0;
      this._openedAt = null;
    }
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        // Browsers only accept 1000 or 3000–4999 from scripts.
        const ok = code === 1000 || (code >= 3000 && code <= 4999);
        ws.close(ok ? code : 1000, String(reason ?? "").slice(0, 100));
      } catch {
        // already closed
      }
    }
    return ws;
  }

  _scheduleRetry(why) {
    this.attempt += 1;
    const o = this.options;
    const delay = backoffDelay(this.attempt, { baseDelay: o.baseDelay, maxDelay: o.maxDelay, random: this._random });
    const due = this._now() + delay;
    const timer = this._setTimeout(() => this._retryFired(), delay);
    this._retry = { timer, due, delay };
    this._setState("reconnecting", { attempt: this.attempt, delay, code: why.code, reason: why.reason });
  }

  _retryFired() {
    const retry = this._retry;
    this._retry = null;
    if (!retry || !this._wanted) return;
    const o = this.options;
    if (sleptThrough({ due: retry.due, now: this._now(), lateBy: o.lateBy, hidden: this._hidden(), hiddenSlack: o.hiddenSlack })) {
      this.attempt = 0; // the machine slept: start the backoff over
    }
    this._open();
  }

  _cancelRetry() {
    if (this._retry) {
      if (this._retry.timer !== null) this._clearTimeout(this._retry.timer);
      this._retry = null;
    }
    this._attemptId += 1; // a getToken() under way is for an attempt given up
  }

  // ---- inbound

  _message(data) {
    this._lastReceived = this._now();
    if (this._ping) this._ping.answered = true; // any traffic proves the link
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object") return;
    this.received += 1;
    const topic = msg.topic;
    if (typeof topic === "string" && Number.isInteger(msg.seq) && msg.type !== "resync") {
      const last = this.lastSeq[topic];
      if (last !== undefined && msg.seq <= last) {
        this.duplicates += 1; // a resume overlap: delivered already
        return;
      }
      if (last !== undefined && msg.seq > last + 1) {
        // A hole: the server promised none. Ask for the topic again from what we
        // have; this message comes back with that replay, in its place.
        if (!this._healing.has(topic)) {
          this._healing.add(topic);
          this.gaps += 1;
          const resume = { type: "resume", since: { [topic]: last } };
          if (this.epoch) resume.epoch = this.epoch;
          this._send(resume);
        }
        return;
      }
      this._healing.delete(topic);
      this.lastSeq[topic] = msg.seq;
      this._emit("message", msg);
      return;
    }
    switch (msg.type) {
      case "connected":
        this._greeted(msg);
        break;
      case "pong":
        if (this._ping && msg.id === this._ping.id) {
          this.rtt = Math.max(0, this._perf() - this._ping.perf);
          this._ping = null;
          this._emit("rtt", this.rtt);
        }
        break;
      case "resync":
        if (typeof msg.topic === "string") {
          this.lastSeq[msg.topic] = Number.isInteger(msg.seq) ? msg.seq : 0;
          this._emit("resync", { topic: msg.topic, seq: msg.seq ?? 0 });
        }
        break;
      case "authenticated":
        this._authenticated(msg);
        break;
      case "subscribed":
        this._takePositions(msg.seqs);
        this._emit("control", msg);
        if (this._awaitingSubscribed) {
          this._awaitingSubscribed = false;
          this._ready();
        }
        break;
      case "error":
        this._emit("error", msg);
        break;
      default:
        this._emit("control", msg);
    }
  }

  _send(obj) {
    if (!this._isOpen()) return false;
    return this._sendRaw(obj);
  }

  _sendRaw(obj) {
    if (!this._ws || this._ws.readyState !== 1) return false;
    try {
      this._ws.send(JSON.stringify(obj));
      return true;
    } catch {
      return false;
    }
  }

  /** Open, and allowed to send (a connection waiting for its token may send only `auth`). */
  _isOpen() {
    return Boolean(this._ws) && this._ws.readyState === 1 && this._admitted;
  }

  // ---- liveness watchdog (SPEC §4)

  _hidden() {
    return Boolean(this._document && this._document.visibilityState === "hidden");
  }

  _armCheck() {
    this._cancelCheck();
    const timer = this._setTimeout(() => this._checkFired(), this.checkInterval);
    this._check = { timer, due: this._now() + this.checkInterval };
  }

  _cancelCheck() {
    if (this._check) {
      this._clearTimeout(this._check.timer);
      this._check = null;
    }
  }

  _checkFired() {
    const check = this._check;
    this._check = null;
    if (!check || !this._ws) return;
    const o = this.options;
    const slept = sleptThrough({ due: check.due, now: this._now(), lateBy: o.lateBy, hidden: this._hidden(), hiddenSlack: o.hiddenSlack });
    this._watch(slept ? "slept" : "timer");
  }

  /** Apply the watchdog's decision; `why` is "timer", "slept", "visible", "online". */
  _watch(why) {
    if (!this._ws) return;
    if (!this._isOpen()) {
      this._armCheck(); // still opening: the connect timeout covers it
      return;
    }
    const o = this.options;
    const now = this._now();
    const ping = this._ping && !this._ping.answered ? this._ping : null;
    if (why !== "timer") {
      // After a sleep, or when the page comes back or the network changes, an
      // answer may be waiting unread behind this very callback, and a quiet
      // link may be dead: judge nothing stale, ask again now with a fresh deadline.
      this.ping();
      this._armCheck();
      return;
    }
    const action = watchdogAction({
      now,
      lastReceived: this._lastReceived,
      awaitingSince: ping ? ping.sentAt : null,
      pingInterval: o.pingInterval,
      pongTimeout: o.pongTimeout,
      hidden: Boolean(ping && (ping.hidden || this._hidden())),
      hiddenSlack: o.hiddenSlack,
    });
    if (action === "dead") {
      this._lost(CODES.LIVENESS_TIMEOUT, "liveness timeout");
      return;
    }
    if (action === "ping") this.ping();
    this._armCheck();
  }

  /** visibilitychange / online: reconnect at once if waiting, re-check liveness if connected. */
  _wake(why) {
    if (!this._wanted) return;
    if (why === "hidden") {
      if (this._ping) this._ping.hidden = true;
      return;
    }
    if (this._retry) {
      this._cancelRetry();
      this._open();
      return;
    }
    // Back on the network, or off it (the link is likely dead: ask now rather than
    // at the watchdog's next look, about 4 s later): a probe with a fresh deadline.
    if (this._ws && this.state === "connected") this._watch(why);
  }

  // ---- events

  _setState(state, detail = {}) {
    if (!STATES.includes(state)) throw new Error(`unknown state ${state}`);
    this.state = state;
    const event = { state, ...detail };
    this._emit(state, event);
    this._emit("state", event);
  }

  _emit(event, value) {
    const handlers = this._handlers.get(event);
    if (!handlers) return;
    for (const cb of [...handlers]) {
      try {
        cb(value);
      } catch (err) {
        // One bad callback must not break the client or the other callbacks.
        (globalThis.console ?? { error() {} }).error("tether: callback for", event, "failed:", err);
      }
    }
  }
}

/** Shorthand: a connected client. */
export function connect(options = {}) {
  return new TetherClient(options).connect();
}

export default TetherClient;
