// The liveness watchdog: deadlines by wall-clock differences, hidden-tab slack, wake checks.
import assert from "node:assert/strict";
import test from "node:test";

import { TetherClient, pongDeadline, watchdogAction } from "../../src/tether/static/tether.js";
import { FakePage, ManualClock, clientOn, randoms } from "./helpers.mjs";

const OPTS = { pingInterval: 20_000, pongTimeout: 10_000, hiddenSlack: 60_000 };

test("watchdogAction: ok while traffic is recent, ping when idle", () => {
  assert.equal(watchdogAction({ ...OPTS, now: 19_999, lastReceived: 0 }), "ok");
  assert.equal(watchdogAction({ ...OPTS, now: 20_000, lastReceived: 0 }), "ping");
  assert.equal(watchdogAction({ ...OPTS, now: 25_000, lastReceived: 10_000 }), "ok");
});

test("watchdogAction: an unanswered ping is dead at its deadline, not before", () => {
  const base = { ...OPTS, lastReceived: 0, awaitingSince: 20_000 };
  assert.equal(watchdogAction({ ...base, now: 29_999 }), "wait");
  assert.equal(watchdogAction({ ...base, now: 30_000 }), "dead");
});

test("hidden tabs get at least 60 s of slack", () => {
  assert.equal(pongDeadline(1000, { pongTimeout: 10_000 }), 11_000);
  assert.equal(pongDeadline(1000, { pongTimeout: 10_000, hidden: true }), 61_000);
  assert.equal(pongDeadline(1000, { pongTimeout: 90_000, hidden: true }), 91_000);
  const base = { ...OPTS, lastReceived: 0, awaitingSince: 0, hidden: true };
  assert.equal(watchdogAction({ ...base, now: 59_999 }), "wait");
  assert.equal(watchdogAction({ ...base, now: 60_000 }), "dead");
});

function setup(extra = {}) {
  const clock = new ManualClock();
  const page = new FakePage();
  const { c, sockets } = clientOn(TetherClient, clock, {
    random: randoms(0.5),
    document: page,
    window: page,
    pingInterval: 1000,
    pongTimeout: 500,
    checkInterval: 100,
    ...extra,
  });
  const states = [];
  c.on("state", (s) => states.push(s));
  c.connect();
  sockets[0].open();
  return { clock, page, c, sockets, states };
}

const pings = (ws) => ws.sent.filter((m) => m.type === "ping");

test("an idle connection is pinged; the pong gives the RTT and keeps it up", () => {
  const { clock, c, sockets } = setup();
  const rtts = [];
  c.on("rtt", (ms) => rtts.push(ms));
  clock.advance(999);
  assert.equal(pings(sockets[0]).length, 0);
  clock.advance(1);
  assert.equal(pings(sockets[0]).length, 1, "pinged after 1000 ms without traffic");
  const { id } = pings(sockets[0])[0];
  clock.advance(42);
  sockets[0].receive({ type: "pong", id, timestamp: "x" });
  assert.deepEqual(rtts, [42]);
  assert.equal(c.rtt, 42);
  let answered = 1;
  for (let t = 0; t < 5000; t += 10) {
    clock.advance(10);
    for (const ping of pings(sockets[0]).slice(answered)) {
      sockets[0].receive({ type: "pong", id: ping.id });
      answered += 1;
    }
  }
  assert.equal(c.state, "connected");
  assert.equal(sockets.length, 1);
  assert.ok(answered >= 5, `keeps pinging while idle (${answered})`);
  assert.equal(rtts.length, answered);
});

test("traffic keeps the watchdog quiet: no ping while messages flow", () => {
  const { clock, sockets } = setup();
  for (let i = 1; i <= 50; i++) {
    clock.advance(200);
    sockets[0].receive({ type: "tick", topic: "*", seq: i });
  }
  assert.equal(pings(sockets[0]).length, 0);
});

test("no answer within pongTimeout: close and reconnect (half-open link)", () => {
  const { clock, c, sockets, states } = setup();
  clock.advance(1100); // ping sent at ~1000-1100
  const sentAt = clock.now();
  assert.equal(pings(sockets[0]).length, 1);
  clock.advance(399);
  assert.equal(c.state, "connected");
  clock.advance(300);
  assert.equal(c.state, "reconnecting");
  assert.equal(states.at(-1).reason, "liveness timeout");
  assert.equal(sockets[0].closed.code, 4002);
  assert.ok(clock.now() - sentAt <= 500 + 100 + 100, "detected within timeout + one check");
  clock.advance(states.at(-1).delay);
  assert.equal(sockets.length, 2, "reconnects after the backoff delay");
});

test("any message counts as an answer, even before the pong", () => {
  const { clock, c, sockets } = setup();
  clock.advance(1100);
  assert.equal(pings(sockets[0]).length, 1);
  clock.advance(300);
  sockets[0].receive({ type: "news", topic: "*", seq: 1 });
  clock.advance(400);
  assert.equal(c.state, "connected");
});

test("a hidden tab waits at least hiddenSlack for the answer", () => {
  const { clock, page, c, sockets } = setup({ hiddenSlack: 60_000 });
  page.setHidden(true);
  clock.advance(1100);
  assert.equal(pings(sockets[0]).length, 1);
  clock.advance(59_000 - 200); // throttled timers fire once a minute; simulate by time alone
  assert.equal(c.state, "connected", "no false timeout in a background tab");
  clock.advance(1200);
  assert.equal(c.state, "reconnecting", "but a dead link is still found");
});

test("a ping sent while visible keeps its slack if the tab is hidden meanwhile", () => {
  const { clock, page, c } = setup({ hiddenSlack: 60_000 });
  clock.advance(1100);
  page.setHidden(true);
  clock.advance(2000);
  assert.equal(c.state, "connected");
});

test("a late watchdog timer (sleep) voids the old ping and asks again", () => {
  const { clock, c, sockets } = setup({ lateBy: 5000 });
  clock.advance(1100);
  assert.equal(pings(sockets[0]).length, 1);
  clock.sleep(600_000); // laptop lid closed for ten minutes, the answer may be unread
  assert.equal(c.state, "connected", "nothing judged on a timer that fired late");
  assert.equal(pings(sockets[0]).length, 2, "a fresh ping with a fresh deadline");
  const { id } = pings(sockets[0])[1];
  clock.advance(30);
  sockets[0].receive({ type: "pong", id });
  assert.equal(c.rtt, 30);
  clock.advance(450);
  assert.equal(c.state, "connected");
});

test("after a sleep a dead link is still detected within pongTimeout", () => {
  const { clock, c } = setup({ lateBy: 5000 });
  clock.sleep(600_000);
  clock.advance(500 + 100);
  assert.equal(c.state, "reconnecting");
});

test("becoming visible, online or offline checks at once", () => {
  const { clock, page, c, sockets } = setup();
  clock.advance(300);
  page.setHidden(true);
  page.setHidden(false);
  assert.equal(pings(sockets[0]).length, 1, "visible: probe ping at once");
  page.dispatch("online");
  assert.equal(pings(sockets[0]).length, 2, "online: probe ping at once");
  page.dispatch("offline");
  assert.equal(pings(sockets[0]).length, 3, "offline: probe ping at once");
  clock.advance(600);
  assert.equal(c.state, "reconnecting", "probe unanswered: reconnect");
});

test("visible or online while waiting to retry reconnects at once", () => {
  const { clock, page, c, sockets } = setup({ baseDelay: 10_000, maxDelay: 30_000 });
  sockets[0].serverClose(1001, "Server shutting down");
  assert.equal(c.state, "reconnecting");
  clock.advance(100);
  page.setHidden(false);
  assert.equal(sockets.length, 2);
  assert.equal(c.state, "connecting");
  sockets[1].fail();
  page.dispatch("online");
  assert.equal(sockets.length, 3);
});

test("a connection that never opens (server stopped) times out", () => {
  const { clock, c, sockets } = setup({ connectTimeout: 1000 });
  c.forceReconnect();
  assert.equal(sockets.length, 2);
  clock.advance(999);
  assert.equal(c.state, "connecting");
  clock.advance(1);
  assert.equal(c.state, "reconnecting");
  assert.equal(sockets[1].closed.code, 4008); // CODES.CONNECT_TIMEOUT: 4001 is the server's "Token expired"
});

test("page events are listened to only while a connection is wanted", () => {
  const { clock, page, c, sockets } = setup();
  c.disconnect();
  assert.equal(page.listeners.get("visibilitychange").size, 0);
  assert.equal(page.listeners.get("online").size, 0);
  page.dispatch("online");
  clock.advance(60_000);
  assert.equal(sockets.length, 1, "no reconnect after disconnect()");
  c.forceReconnect();
  assert.equal(sockets.length, 2);
  sockets[1].open();
  sockets[1].serverClose(1001, "Server shutting down");
  page.dispatch("online");
  assert.equal(sockets.length, 3, "listening again after forceReconnect()");
});
