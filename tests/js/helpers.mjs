// Test doubles for tether.js in Node: a manual clock with timers, and a fake WebSocket.

export class ManualClock {
  constructor(start = 1_700_000_000_000) {
    this.time = start;
    this.timers = new Map();
    this.nextId = 1;
    this.now = () => this.time;
    this.perfNow = () => this.time;
    this.setTimeout = (fn, ms) => {
      const id = this.nextId++;
      this.timers.set(id, { fn, due: this.time + Math.max(0, ms), id });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
  }

  /** Let `ms` pass, firing each timer at its due time, in order. */
  advance(ms) {
    const end = this.time + ms;
    for (;;) {
      const next = [...this.timers.values()]
        .filter((t) => t.due <= end)
        .sort((a, b) => a.due - b.due || a.id - b.id)[0];
      if (!next) break;
      this.timers.delete(next.id);
      this.time = Math.max(this.time, next.due);
      next.fn();
    }
    this.time = end;
  }

  /** The machine sleeps for `ms`: no timer runs; when it wakes, the overdue ones fire late. */
  sleep(ms) {
    this.time += ms;
    this.advance(0);
  }

  pending() {
    return this.timers.size;
  }
}

/** A stand-in for the browser's WebSocket: records what the client does. */
export function fakeWebSocketClass() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closed = null;
      sockets.push(this);
    }

    send(data) {
      if (this.readyState !== 1) throw new Error("not open");
      this.sent.push(JSON.parse(data));
    }

    close(code, reason) {
      this.closed = { code, reason };
      this.readyState = 3;
    }

    // ---- the server's side
    open(sessionId = `s${sockets.length}`) {
      this.readyState = 1;
      this.onopen?.({});
      this.receive({ type: "connected", sessionId, timestamp: "2024-01-01T00:00:00Z" });
    }

    receive(obj) {
      this.onmessage?.({ data: JSON.stringify(obj) });
    }

    serverClose(code = 1001, reason = "Server shutting down") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }

    fail() {
      this.readyState = 3;
      this.onerror?.({});
      this.onclose?.({ code: 1006, reason: "" });
    }
  }
  return { FakeWebSocket, sockets };
}

/** A fake document/window pair for visibilitychange and online. */
export class FakePage {
  constructor() {
    this.visibilityState = "visible";
    this.listeners = new Map();
    this.addEventListener = (name, fn) => {
      if (!this.listeners.has(name)) this.listeners.set(name, new Set());
      this.listeners.get(name).add(fn);
    };
    this.removeEventListener = (name, fn) => this.listeners.get(name)?.delete(fn);
  }

  dispatch(name) {
    for (const fn of [...(this.listeners.get(name) ?? [])]) fn({ type: name });
  }

  setHidden(hidden) {
    this.visibilityState = hidden ? "hidden" : "visible";
    this.dispatch("visibilitychange");
  }
}

/** A sequence of "random" numbers, repeated. */
export function randoms(...values) {
  let i = 0;
  return () => values[i++ % values.length];
}

/** A TetherClient on `clock` with a fake WebSocket class; `options` override the defaults. */
export function clientOn(TetherClient, clock, options = {}) {
  const { FakeWebSocket, sockets } = fakeWebSocketClass();
  const c = new TetherClient({
    url: "ws://hub.test/ws",
    WebSocket: FakeWebSocket,
    now: clock.now,
    perfNow: clock.perfNow,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    env: {},
    ...options,
  });
  return { c, sockets };
}
