// Tokens (issue 14): auth first, topics after `authenticated`, refresh before expiry,
// `unauthorized` when the server refuses. A manual clock and a fake WebSocket.
import assert from "node:assert/strict";
import test from "node:test";

import { CODES, TetherClient, afterClose, refreshDelay } from "../../src/tether/static/tether.js";
import { ManualClock, clientOn, randoms } from "./helpers.mjs";

const settle = () => new Promise((resolve) => setImmediate(resolve)); // getToken() is async

function setup(options = {}) {
  const clock = new ManualClock();
  const minted = [];
  const getToken = async () => {
    minted.push(clock.now());
    return `token-${minted.length}`;
  };
  const { c, sockets } = clientOn(TetherClient, clock, { random: randoms(0.5), getToken, ...options });
  const states = [];
  c.on("state", (s) => states.push(s.state));
  return { clock, c, sockets, minted, states };
}

const query = (ws) => Object.fromEntries(new URL(ws.url).searchParams);
const authenticated = (ws, expiresIn = 2, sub = "alice") =>
  ws.receive({ type: "authenticated", sub, exp: 1, expiresIn, topics: [] });

test("refreshDelay leads expiry by the margin, or a fifth of what is left", () => {
  assert.equal(refreshDelay(3_600_000), 3_570_000);
  assert.equal(refreshDelay(2000), 1600);
  assert.equal(refreshDelay(100_000, 10_000), 90_000);
  assert.equal(refreshDelay(0), 0);
  assert.equal(refreshDelay(-5), 0);
  assert.equal(refreshDelay(undefined), 0);
});

test("afterClose stops on forbidden, and on expired without getToken", () => {
  assert.equal(afterClose(CODES.FORBIDDEN, { canRefresh: true }), "unauthorized");
  assert.equal(afterClose(CODES.TOKEN_EXPIRED), "unauthorized");
  assert.equal(afterClose(CODES.TOKEN_EXPIRED, { canRefresh: true }), "retry");
  for (const code of [1000, 1001, 1006, 1013, 4000, 4002, 4008]) assert.equal(afterClose(code), "retry");
  assert.deepEqual([CODES.TOKEN_EXPIRED, CODES.FORBIDDEN], [4001, 4003]);
});

test("the token goes first, then resume and subscribe; connected once subscribed", async () => {
  const { c, sockets, minted, states } = setup({ topics: ["orders"], since: { orders: 4 } });
  c.connect();
  assert.equal(sockets.length, 0, "no socket before getToken() answered");
  await settle();
  assert.equal(minted.length, 1);
  assert.deepEqual(query(sockets[0]), {}, "neither token nor topics in the URL");
  sockets[0].open();
  assert.deepEqual(sockets[0].sent, [{ type: "auth", token: "token-1" }]);
  c.subscribe(["alerts"]); // waits: the server would close a waiting connection for it
  assert.equal(c.state, "connecting");
  authenticated(sockets[0]);
  assert.equal(c.sub, "alice");
  assert.deepEqual(sockets[0].sent.slice(1), [
    { type: "resume", since: { orders: 4 } },
    { type: "subscribe", topics: ["orders", "alerts"] },
  ]);
  assert.equal(c.state, "connecting");
  sockets[0].receive({ type: "subscribed", topics: ["alerts", "orders"] });
  assert.equal(c.state, "connected");
  assert.deepEqual(states, ["connecting", "connected"]);
});

test("a fresh token is sent before expiry on the same connection", async () => {
  const { clock, c, sockets, minted } = setup({ pingInterval: 60_000 });
  c.connect();
  await settle();
  sockets[0].open();
  authenticated(sockets[0], 2);
  assert.equal(c.state, "connected");
  clock.advance(1599);
  assert.equal(minted.length, 1);
  clock.advance(1);
  await settle();
  assert.equal(minted.length, 2);
  assert.deepEqual(sockets[0].sent.at(-1), { type: "auth", token: "token-2" });
  authenticated(sockets[0], 2);
  clock.advance(1600);
  await settle();
  assert.deepEqual(sockets[0].sent.at(-1), { type: "auth", token: "token-3" });
  assert.equal(sockets.length, 1, "no reconnect");
  assert.equal(c.state, "connected");
});

test("expired (4001) with getToken reconnects with a fresh token and resumes", async () => {
  const { clock, c, sockets, minted } = setup({ topics: ["orders"] });
  c.connect();
  await settle();
  sockets[0].open();
  authenticated(sockets[0], 600);
  sockets[0].receive({ type: "subscribed", topics: ["orders"] });
  sockets[0].receive({ type: "o", topic: "orders", seq: 7 });
  sockets[0].serverClose(4001, "Token expired");
  assert.equal(c.state, "reconnecting");
  clock.advance(1000);
  await settle();
  assert.equal(minted.length, 2);
  sockets[1].open();
  assert.deepEqual(sockets[1].sent[0], { type: "auth", token: "token-2" });
  authenticated(sockets[1]);
  assert.deepEqual(sockets[1].sent[1], { type: "resume", since: { orders: 7 } });
});

test("forbidden (4003) ends in unauthorized, with no retry until connect()", async () => {
  const { clock, c, sockets, states } = setup();
  c.connect();
  await settle();
  sockets[0].open();
  sockets[0].serverClose(4003, "Forbidden: invalid token");
  assert.equal(c.state, "unauthorized");
  clock.advance(120_000);
  await settle();
  assert.equal(sockets.length, 1);
  assert.deepEqual(states, ["connecting", "unauthorized"]);
  c.connect();
  await settle();
  assert.equal(sockets.length, 2);
});

test("a fixed token that expires ends in unauthorized", () => {
  const clock = new ManualClock();
  const { c, sockets } = clientOn(TetherClient, clock, { token: "fixed" });
  c.connect();
  sockets[0].open();
  assert.deepEqual(sockets[0].sent, [{ type: "auth", token: "fixed" }]);
  authenticated(sockets[0], 1);
  assert.equal(c.state, "connected");
  clock.advance(5000);
  assert.equal(sockets[0].sent.length, 1, "nothing to refresh with");
  sockets[0].serverClose(4001, "Token expired");
  assert.equal(c.state, "unauthorized");
});

test("a failing getToken is an error and a retry, not a crash", async () => {
  const clock = new ManualClock();
  let fail = true;
  const getToken = async () => {
    if (fail) throw new Error("backend down");
    return "ok";
  };
  const { c, sockets } = clientOn(TetherClient, clock, { getToken, random: randoms(0.5) });
  const errors = [];
  c.on("error", (e) => errors.push(e.error));
  c.connect();
  await settle();
  assert.equal(c.state, "reconnecting");
  assert.match(errors[0], /getToken\(\) failed: backend down/);
  fail = false;
  clock.advance(1000);
  await settle();
  assert.equal(sockets.length, 1);
});

test("disconnect() while getToken() is pending opens nothing", async () => {
  const { c, sockets } = setup();
  c.connect();
  c.disconnect();
  await settle();
  assert.equal(sockets.length, 0);
  assert.equal(c.state, "disconnected");
});

test("no liveness ping before the token is taken", async () => {
  const { clock, c, sockets } = setup({ pingInterval: 300, pongTimeout: 300, connectTimeout: 5000 });
  c.connect();
  await settle();
  sockets[0].open();
  clock.advance(1000);
  assert.deepEqual(sockets[0].sent.map((m) => m.type), ["auth"]);
  authenticated(sockets[0]);
  clock.advance(400);
  assert.ok(sockets[0].sent.some((m) => m.type === "ping"));
});

test("without a token nothing changes: topics in the URL, connected on greeting", () => {
  const clock = new ManualClock();
  const { c, sockets } = clientOn(TetherClient, clock, { topics: ["a"] });
  c.connect();
  assert.deepEqual(query(sockets[0]), { topics: "a" });
  sockets[0].open();
  assert.equal(c.state, "connected");
  assert.deepEqual(sockets[0].sent, []);
});
