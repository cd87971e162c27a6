// Backoff: the delay sequence (bounds, jitter, randomized first retry, reset after sleep).
import assert from "node:assert/strict";
import test from "node:test";

import { TetherClient, backoffCap, backoffDelay, sleptThrough } from "../../src/tether/static/tether.js";
import { ManualClock, clientOn, randoms } from "./helpers.mjs";

test("the cap doubles from 1 s and stops at 30 s", () => {
  const caps = [1, 2, 3, 4, 5, 6, 7, 20, 1000].map((n) => backoffCap(n));
  assert.deepEqual(caps, [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]);
  assert.equal(backoffCap(0), 1000, "attempt < 1 is treated as the first");
  assert.equal(backoffCap(3, { baseDelay: 100, maxDelay: 250 }), 250);
});

test("delays are full jitter: uniform in [0, cap), never above 30 s", () => {
  for (let attempt = 1; attempt <= 60; attempt++) {
    const cap = backoffCap(attempt);
    assert.equal(backoffDelay(attempt, { random: () => 0 }), 0);
    assert.equal(backoffDelay(attempt, { random: () => 0.5 }), Math.floor(cap / 2));
    const top = backoffDelay(attempt, { random: () => 0.999999 });
    assert.ok(top < cap && top >= cap - 1, `attempt ${attempt}: ${top} vs cap ${cap}`);
    assert.ok(top <= 30000);
  }
  // A broken random source cannot push a delay out of bounds.
  assert.equal(backoffDelay(3, { random: () => 7 }), 4000);
  assert.equal(backoffDelay(3, { random: () => -1 }), 0);
});

test("the first retry is randomized: 1000 clients spread over the first second", () => {
  let seed = 42;
  const random = () => {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    return seed / 2147483648;
  };
  const delays = Array.from({ length: 1000 }, () => backoffDelay(1, { random }));
  assert.ok(delays.every((d) => d >= 0 && d < 1000));
  const buckets = new Array(10).fill(0);
  for (const d of delays) buckets[Math.floor(d / 100)] += 1;
  // No 100 ms slot gets more than a fifth of the clients: no reconnect storm.
  assert.ok(Math.max(...buckets) < 200, `buckets ${buckets}`);
  assert.ok(Math.min(...buckets) > 50, `buckets ${buckets}`);
});

test("a timer that fires far later than due means a sleep", () => {
  const due = 10_000;
  assert.equal(sleptThrough({ due, now: due + 10 }), false);
  assert.equal(sleptThrough({ due, now: due + 5000 }), false);
  assert.equal(sleptThrough({ due, now: due + 5001 }), true);
  assert.equal(sleptThrough({ due, now: due - 5000 }), true, "clock went backwards");
  // A hidden tab's timers run about once a minute: that alone is not a sleep.
  assert.equal(sleptThrough({ due, now: due + 59_000, hidden: true }), false);
  assert.equal(sleptThrough({ due, now: due + 66_000, hidden: true }), true);
});

function client(clock, extra = {}) {
  return clientOn(TetherClient, clock, extra);
}

test("the client's retries follow the sequence, capped, and reset after a stable connection", () => {
  const clock = new ManualClock();
  const { c, sockets } = client(clock, { random: randoms(0.5) });
  const states = [];
  c.on("state", (s) => states.push(s));
  c.connect();
  sockets[0].open();
  clock.advance(10_000); // stable
  sockets[0].serverClose(1001, "Server shutting down");
  const delays = [];
  for (let i = 0; i < 8; i++) {
    const last = states.at(-1);
    assert.equal(last.state, "reconnecting");
    assert.equal(last.attempt, i + 1);
    delays.push(last.delay);
    clock.advance(last.delay);
    sockets.at(-1).fail(); // refused
  }
  assert.deepEqual(delays, [500, 1000, 2000, 4000, 8000, 15000, 15000, 15000]);
  // Success that lasts resets the backoff; a flapping connection does not.
  clock.advance(states.at(-1).delay);
  sockets.at(-1).open();
  clock.advance(1000);
  sockets.at(-1).serverClose(1011, "oops");
  assert.equal(states.at(-1).attempt, 10, "closed after 1 s: still backing off");
  clock.advance(states.at(-1).delay);
  sockets.at(-1).open();
  clock.advance(6000);
  sockets.at(-1).serverClose(1001, "bye");
  assert.equal(states.at(-1).attempt, 1, "stable for 6 s: starts over");
  assert.equal(states.at(-1).delay, 500);
});

test("backoff resets after a sleep: the late retry connects and the next delay is short", () => {
  const clock = new ManualClock();
  const { c, sockets } = client(clock, { random: randoms(0.5) });
  const states = [];
  c.on("state", (s) => states.push(s));
  c.connect();
  sockets[0].fail();
  for (let i = 0; i < 6; i++) {
    clock.advance(states.at(-1).delay);
    sockets.at(-1).fail();
  }
  assert.equal(states.at(-1).attempt, 7);
  assert.equal(states.at(-1).delay, 15000);
  const before = sockets.length;
  clock.sleep(3_600_000); // an hour with the lid closed
  assert.equal(sockets.length, before + 1, "the overdue retry connects at once");
  sockets.at(-1).fail();
  assert.equal(states.at(-1).attempt, 1, "backoff started over");
  assert.ok(states.at(-1).delay < 1000);
});

test("a retry a little late (under lateBy) does not reset the backoff", () => {
  const clock = new ManualClock();
  const { c, sockets } = client(clock, { random: randoms(0.9) });
  const states = [];
  c.on("state", (s) => states.push(s));
  c.connect();
  sockets[0].fail();
  clock.sleep(states.at(-1).delay + 4000); // 4 s late: a busy machine, not a sleep
  sockets.at(-1).fail();
  assert.equal(states.at(-1).attempt, 2);
});

test("forceReconnect opens at once; disconnect stops retrying", () => {
  const clock = new ManualClock();
  const { c, sockets } = client(clock, { random: randoms(0.5) });
  const states = [];
  c.on("state", (s) => states.push(s.state));
  c.connect();
  sockets[0].open();
  c.forceReconnect();
  assert.equal(sockets.length, 2);
  assert.deepEqual(sockets[0].closed, { code: 4000, reason: "force reconnect" });
  sockets[1].fail();
  assert.equal(c.state, "reconnecting");
  c.disconnect();
  clock.advance(60_000);
  assert.equal(sockets.length, 2, "no retry after disconnect");
  assert.equal(c.state, "disconnected");
  assert.equal(clock.pending(), 0, "no timer left behind");
  assert.deepEqual(states, ["connecting", "connected", "connecting", "reconnecting", "disconnected"]);
});
