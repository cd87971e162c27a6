// Bun (a reference, not a Python peer): `Bun.serve` with its built-in WebSocket
// keepalive (`idleTimeout` + `sendPings`, uWebSockets underneath) and
// `server.publish()` to one topic every socket is subscribed to.
//
// Run by bench.measure.server("bun", ...) as
//   bun bench/servers/bun_server.ts --interval I --missed K [--port P]
// and speaks the same JSON lines as the Python servers (bench/servers/common.py):
// events on stdout in bench.proc.emit's shape, commands on stdin
// (broadcast / count / gc). Install: `npm install --prefix bench/bun`.

import { dlopen, FFIType, ptr } from "bun:ffi";

// --- arguments (the same as bench/servers/common.py parse_args) -------------------

function argValue(name: string, fallback: number): number {
  const args = process.argv.slice(2);
  for (let i = 0; i < args.length; i++) {
    if (args[i] === name && i + 1 < args.length) return Number(args[i + 1]);
    if (args[i].startsWith(name + "=")) return Number(args[i].slice(name.length + 1));
  }
  return fallback;
}

const PORT = argValue("--port", 0);
const INTERVAL = argValue("--interval", 1.0); // heartbeat interval I, seconds
// --missed K is accepted and ignored: Bun has no such setting (like websockets/picows).

// --- CLOCK_MONOTONIC, comparable with Python's time.monotonic() ----------------------
// Bun's own clocks (Bun.nanoseconds, performance.now, process.hrtime) all count from
// the process start. One clock_gettime(CLOCK_MONOTONIC) through libc at start-up
// gives the offset from Bun.nanoseconds() to the system-wide monotonic clock.

const CLOCK_MONOTONIC = 1;

function monotonicOffset(): number {
  const libc = dlopen("libc.so.6", {
    clock_gettime: { args: [FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
  });
  const ts = new BigInt64Array(2); // struct timespec { tv_sec; tv_nsec } on 64-bit Linux
  let best = Infinity;
  let offset = 0;
  for (let i = 0; i < 5; i++) {
    const a = Bun.nanoseconds();
    if (libc.symbols.clock_gettime(CLOCK_MONOTONIC, ptr(ts)) !== 0) {
      throw new Error("clock_gettime(CLOCK_MONOTONIC) failed");
    }
    const b = Bun.nanoseconds();
    const mono = Number(ts[0]) + Number(ts[1]) / 1e9;
    if (b - a < best) {
      best = b - a;
      offset = mono - (a + b) / 2 / 1e9;
    }
  }
  libc.close();
  return offset;
}

const OFFSET = monotonicOffset();

function monotonic(): number {
  return OFFSET + Bun.nanoseconds() / 1e9;
}

// --- output: the exact line shape of bench.proc.emit (json.dumps defaults) ----------

type Value = number | string | Value[];

function pyJson(v: Value): string {
  if (Array.isArray(v)) return "[" + v.map(pyJson).join(", ") + "]";
  return JSON.stringify(v);
}

function emit(event: string, data: Record<string, Value> = {}): void {
  const parts = [`"ev": ${pyJson(event)}`];
  for (const [k, v] of Object.entries(data)) parts.push(`${JSON.stringify(k)}: ${pyJson(v)}`);
  process.stdout.write("{" + parts.join(", ") + "}\n");
}

// --- the server -------------------------------------------------------------------

const TOPIC = "tick";
const PAD = "x".repeat(40);

// ~100 bytes on the wire, byte for byte common.py's message(i).
function message(i: number): string {
  return JSON.stringify({ type: "tick", payload: { i, pad: PAD } });
}

let clients = 0;

// Bun's keepalive is uWebSockets': a socket silent for `idleTimeout - margin` seconds
// is pinged, and closed if `margin` more seconds pass without a frame from it (margin
// 4, 8 or 16 s, growing with idleTimeout). Its timers tick every 4 s, so both spans
// are whole 4 s ticks and I < 4 s cannot be had: the idleTimeout (a multiple of 4,
// 8..960) whose ping period is nearest to I is used (ties: the smallest idleTimeout),
// and the period it gives is announced in "ready" so the suite can count rounds by it.
// (Checked with a client that logs pings, Bun 1.4.5: I = 1 s → ping every 4 s, close
// 4 s after an unanswered one; I = 16 s → 16 s / 8 s; I = 30 s → 28 s / 16 s.)
function keepalive(idleTimeout: number): { ping: number; close: number } {
  let margin = 4;
  while (idleTimeout - 2 * margin >= 2 * margin && margin < 16) margin *= 2;
  const ticks = (s: number) => Math.ceil(s / 4) * 4;
  return { ping: ticks(idleTimeout - margin), close: ticks(margin) };
}

function chooseIdleTimeout(interval: number): number {
  let best = 8;
  for (let t = 8; t <= 960; t += 4) {
    const d = Math.abs(keepalive(t).ping - interval);
    const b = Math.abs(keepalive(best).ping - interval);
    if (d < b) best = t;
  }
  return best;
}

const IDLE_TIMEOUT = chooseIdleTimeout(INTERVAL);
const KEEPALIVE = keepalive(IDLE_TIMEOUT);

const server = Bun.serve({
  hostname: "127.0.0.1",
  port: PORT,
  fetch(req, srv) {
    if (srv.upgrade(req)) return undefined; // every path is a WebSocket endpoint
    return new Response("WebSocket only", { status: 426 });
  },
  websocket: {
    idleTimeout: IDLE_TIMEOUT,
    sendPings: true,
    perMessageDeflate: false,
    open(ws) {
      clients++;
      ws.subscribe(TOPIC);
    },
    message() {
      // clients only listen
    },
    close() {
      clients--;
      emit("closed", { wall: Date.now() / 1000 });
    },
  },
});

emit("ready", {
  port: server.port,
  server: "bun",
  idle_timeout: IDLE_TIMEOUT,
  ping_period: KEEPALIVE.ping,
  close_after: KEEPALIVE.close,
});

// --- the suite's commands on stdin --------------------------------------------------

function nextTurn(): Promise<void> {
  // One event-loop pass (I/O included) between messages, as asyncio.sleep(0) does.
  return new Promise((resolve) => setImmediate(resolve));
}

for await (const line of console) {
  if (!line.trim()) continue;
  const cmd = JSON.parse(line);
  if (cmd.cmd === "broadcast") {
    const n = Number(cmd.count);
    const t0 = monotonic();
    for (let i = 0; i < n; i++) {
      server.publish(TOPIC, message(i));
      await nextTurn();
    }
    emit("published", { count: n, t0, t1: monotonic() });
  } else if (cmd.cmd === "count") {
    emit("count", { n: clients });
  } else if (cmd.cmd === "gc") {
    // No Python GC here; zeros keep the suite's gc bookkeeping working.
    emit("gc", { seconds: [0, 0, 0], runs: [0, 0, 0], objects: 0 });
  } else if (cmd.cmd === "clock") {
    emit("clock", { t: monotonic() }); // for checking the clock against Python's
  }
}
process.exit(0);
