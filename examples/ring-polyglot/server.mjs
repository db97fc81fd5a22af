// A ring server in JavaScript, wire-compatible with examples/ring/server.py: listens on
// POD_IP:RING_PORT, connects to its right neighbour, proves the ring with a token, registers
// `server-connected`, then forwards client requests around the ring until SIGTERM.
// It records two metrics (drivers/PROTOCOL.md 6.6, in runs/<id>/metrics.csv): `token_ms`, the
// time its token took round the ring at startup, and `ring_ms`, the time each client request
// took round the ring (from the request in to the reply out, every server on the way).
import net from "node:net";
import { createInterface } from "node:readline";

import { Driver } from "../../drivers/js/src/index.js";

const PORT = Number(process.env.RING_PORT ?? "7000");

const tricks = await Driver.connect();
const me = tricks.config;

/** @type {(socket: net.Socket) => void} */
let rightReady = () => {};
/** @type {Promise<net.Socket>} */
const right = new Promise((resolve) => {
  rightReady = resolve;
});
/** @type {() => void} */
let ringClosed = () => {};
const closed = new Promise((resolve) => {
  ringClosed = () => resolve(undefined);
});
/**
 * Requests on their way round the ring, by id: who asked, and since when (ms).
 * @type {Map<string, {socket: net.Socket, since: number}>}
 */
const clients = new Map();
let ids = 0;
/** @type {number} when our token left (ms) */
let tokenSent = 0;

/** @param {object} msg */
async function forward(msg) {
  (await right).write(`${JSON.stringify(msg)}\n`); // a token may arrive before we connect
}

/** @param {any} msg @param {net.Socket} from */
async function handle(msg, from) {
  if (msg.type === "token") {
    if (msg.origin === me.podId) {
      tricks.record("token_ms", performance.now() - tokenSent);
      ringClosed();
    } else {
      await forward(msg);
    }
  } else if (msg.type === "request") {
    const id = `${me.podId}:${ids++}`;
    clients.set(id, { socket: from, since: performance.now() });
    await forward({ type: "ring", origin: me.podId, id, hops: 1, seq: msg.seq });
  } else if (msg.type === "ring") {
    if (msg.origin === me.podId) {
      const back = clients.get(msg.id);
      clients.delete(msg.id);
      if (!back) return;
      back.socket.write(`${JSON.stringify({ type: "reply", seq: msg.seq, hops: msg.hops })}\n`);
      tricks.record("ring_ms", performance.now() - back.since); // never blocks: sent in batches
    } else {
      await forward({ ...msg, hops: msg.hops + 1 });
    }
  }
}

const server = net.createServer((socket) => {
  socket.on("error", () => {});
  createInterface({ input: socket }).on("line", (line) => handle(JSON.parse(line), socket));
});
await new Promise((resolve) => server.listen(PORT, me.podIp, () => resolve(undefined)));
console.log(`server ${me.podId} (node) listening on ${me.podIp}:${PORT}`);

process.on("SIGTERM", async () => {
  console.log(`server ${me.podId}: stopping`);
  server.close();
  (await right).destroy();
  for (const { socket } of clients.values()) socket.destroy();
  await tricks.close(); // sends the samples still buffered first
  process.exit(0);
});

/** The neighbour is running but may not listen yet: retry for a while. @param {string} host */
async function connect(host) {
  for (let attempt = 0; attempt < 100; attempt++) {
    try {
      return await new Promise((resolve, reject) => {
        const socket = net.connect(PORT, host, () => resolve(socket));
        socket.once("error", reject);
      });
    } catch {
      await new Promise((resolve) => setTimeout(resolve, Math.min(50 * (attempt + 1), 500)));
    }
  }
  throw new Error(`cannot connect to ${host}:${PORT}`);
}

const peers = await tricks.discover("server", me.replicas, { timeout: 60 });
const neighbour = peers.find((p) => p.pod_id === (me.podId + 1) % me.replicas);
if (!neighbour) throw new Error("no right neighbour");
const socket = /** @type {net.Socket} */ (await connect(neighbour.ip));
socket.on("error", () => {});
rightReady(socket);
console.log(`server ${me.podId} connected to server ${neighbour.pod_id} at ${neighbour.ip}`);
tokenSent = performance.now();
await forward({ type: "token", origin: me.podId });
await closed;
console.log(`server ${me.podId}: token went round the ring of ${me.replicas}`);
await tricks.registerEvent("server-connected");
