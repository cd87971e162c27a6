// Resume by seq (SPEC §7): the client keeps the last seq per topic and reconnects with it.
import assert from "node:assert/strict";
import test from "node:test";

import { TetherClient, connectUrl } from "../../src/tether/static/tether.js";
import { ManualClock, clientOn, randoms } from "./helpers.mjs";

test("connectUrl carries topics and since", () => {
  assert.equal(connectUrl("ws://h:1/ws"), "ws://h:1/ws");
  const url = new URL(connectUrl("ws://h:1/ws", ["a", "b", "*", "a"], { a: 12, "*": 3 }));
  assert.equal(url.searchParams.get("topics"), "a,b");
  assert.equal(url.searchParams.get("since"), "a:12,*:3");
});

function setup(options = {}) {
  const clock = new ManualClock();
  const { c, sockets } = clientOn(TetherClient, clock, { random: randoms(0.5), ...options });
  return { clock, c, sockets };
}

const query = (ws) => Object.fromEntries(new URL(ws.url).searchParams);

test("every reconnect resumes from the last seq of each subscribed topic", () => {
  const { clock, c, sockets } = setup({ topics: ["orders"] });
  const got = [];
  c.on("message", (m) => got.push(`${m.topic}:${m.seq}`));
  c.connect();
  assert.deepEqual(query(sockets[0]), { topics: "orders" });
  sockets[0].open();
  sockets[0].receive({ type: "o", topic: "orders", seq: 1 });
  sockets[0].receive({ type: "o", topic: "orders", seq: 2 });
  sockets[0].receive({ type: "n", topic: "*", seq: 7 });
  sockets[0].serverClose(1006, "");
  clock.advance(1000);
  assert.deepEqual(query(sockets[1]), { topics: "orders", since: "orders:2,*:7" });
  sockets[1].open();
  // The replay overlaps what we had (a duplicate is dropped), then continues.
  for (const seq of [2, 3, 4]) sockets[1].receive({ type: "o", topic: "orders", seq });
  c.forceReconnect();
  assert.deepEqual(query(sockets[2]), { topics: "orders", since: "orders:4,*:7" });
  assert.deepEqual(got, ["orders:1", "orders:2", "*:7", "orders:3", "orders:4"]);
  assert.equal(c.duplicates, 1);
});

test("subscribe/unsubscribe are sent and remembered; an unsubscribed topic is not resumed", () => {
  const { c, sockets } = setup();
  c.connect();
  sockets[0].open();
  c.subscribe(["a", "b"]);
  assert.deepEqual(sockets[0].sent.at(-1), { type: "subscribe", topics: ["a", "b"] });
  sockets[0].receive({ type: "x", topic: "a", seq: 5 });
  sockets[0].receive({ type: "x", topic: "b", seq: 9 });
  c.unsubscribe("b");
  assert.deepEqual(sockets[0].sent.at(-1), { type: "unsubscribe", topics: ["b"] });
  c.forceReconnect();
  assert.deepEqual(query(sockets[1]), { topics: "a", since: "a:5" });
});

test("resync reaches the application and resets the topic's seq", () => {
  const { c, sockets } = setup({ topics: ["a"], since: { a: 40 } });
  const resyncs = [];
  const got = [];
  c.on("resync", (r) => resyncs.push(r));
  c.on("message", (m) => got.push(m.seq));
  c.connect();
  assert.deepEqual(query(sockets[0]), { topics: "a", since: "a:40" });
  sockets[0].open();
  // The server restarted: its numbering is behind ours.
  sockets[0].receive({ type: "resync", topic: "a", seq: 0 });
  sockets[0].receive({ type: "x", topic: "a", seq: 1 });
  assert.deepEqual(resyncs, [{ topic: "a", seq: 0 }]);
  assert.deepEqual(got, [1], "new numbering is delivered, not dropped as duplicates");
  assert.equal(c.lastSeq.a, 1);
});

test("server errors and controls are events; a bad frame is ignored", () => {
  const { c, sockets } = setup();
  const errors = [];
  const controls = [];
  c.on("error", (e) => errors.push(e.error));
  c.on("control", (m) => controls.push(m.type));
  c.on("message", () => {
    throw new Error("a broken callback must not break the client");
  });
  c.connect();
  sockets[0].open();
  sockets[0].onmessage({ data: "not json" });
  sockets[0].receive({ type: "error", error: "unknown message type 'x'" });
  sockets[0].receive({ type: "subscribed", topics: ["a"] });
  const prev = console.error;
  console.error = () => {};
  try {
    sockets[0].receive({ type: "x", topic: "*", seq: 1 });
  } finally {
    console.error = prev;
  }
  assert.deepEqual(errors, ["unknown message type 'x'"]);
  assert.deepEqual(controls, ["subscribed"]);
  assert.equal(c.lastSeq["*"], 1);
  assert.equal(c.state, "connected");
});

test("connectUrl names the epoch of its positions, and only with them", () => {
  const url = new URL(connectUrl("ws://h:1/ws", ["a"], { a: 3 }, "e1"));
  assert.equal(url.searchParams.get("epoch"), "e1");
  assert.equal(new URL(connectUrl("ws://h:1/ws", ["a"], {}, "e1")).searchParams.get("epoch"), null);
  assert.equal(new URL(connectUrl("ws://h:1/ws", ["a"], { a: 3 })).searchParams.get("epoch"), null);
});

test("a hole in a topic's seqs is asked for again, once, and filled in order", () => {
  const { c, sockets } = setup({ topics: ["a"] });
  const got = [];
  c.on("message", (m) => got.push(m.seq));
  c.connect();
  sockets[0].open();
  sockets[0].receive({ type: "subscribed", topics: ["a"], seqs: { a: 4 } });
  sockets[0].receive({ type: "x", topic: "a", seq: 5 });
  sockets[0].receive({ type: "x", topic: "a", seq: 8 }); // 6 and 7 never came
  sockets[0].receive({ type: "x", topic: "a", seq: 9 });
  const resumes = sockets[0].sent.filter((m) => m.type === "resume");
  assert.deepEqual(resumes, [{ type: "resume", since: { a: 5 } }]);
  for (const seq of [6, 7, 8, 9, 10]) sockets[0].receive({ type: "x", topic: "a", seq });
  assert.deepEqual(got, [5, 6, 7, 8, 9, 10]);
  assert.equal(c.gaps, 1);
});

test("a topic's first position comes from subscribed", () => {
  const { c, sockets } = setup();
  c.connect();
  sockets[0].open();
  c.subscribe(["fresh"]);
  sockets[0].receive({ type: "subscribed", topics: ["fresh"], seqs: { fresh: 0 } });
  assert.equal(c.lastSeq.fresh, 0);
  c.forceReconnect();
  assert.equal(new URL(sockets[1].url).searchParams.get("since"), "fresh:0");
});

test("a topic added while the connection opens is subscribed once it is open", () => {
  const { c, sockets } = setup({ topics: ["a"] });
  c.connect();
  c.subscribe(["late"]); // not open yet: cannot be sent now
  assert.deepEqual(sockets[0].sent, []);
  sockets[0].open(); // and the server's `connected`
  assert.deepEqual(sockets[0].sent.filter((m) => m.type === "subscribe"),
    [{ type: "subscribe", topics: ["late"] }]);
});
