// The tricks-nats driver for Node.js: discover peers, register events, wait for counts.
//
// It implements drivers/PROTOCOL.md (version 1) on the official NATS client. Configured from the
// pod's environment alone:
//
//   import { Driver } from "@tricks-nats/driver";
//   const tricks = await Driver.connect();
//   const servers = await tricks.discover("server", 6, { timeout: 60 });
//   await tricks.registerEvent("server-connected");
//   await tricks.waitEvent("server-connected", 6, { timeout: 60 });
//   await tricks.close();
//
// Timeouts are in seconds, as in every other driver.

import { randomBytes } from "node:crypto";

import { AckPolicy, DeliverPolicy, jetstream } from "@nats-io/jetstream";
import { connect, Empty, headers } from "@nats-io/transport-node";

/** The protocol version this driver speaks (`tricks_nats.protocol.VERSION`). */
export const PROTOCOL_VERSION = "1";

/** Tags and event names: one NATS subject token, one KV key. */
export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$/;

const REQUEST_TIMEOUT_MS = 2000;
/** How long a request keeps retrying while NATS restarts (PROTOCOL.md 6.0). */
const RECOVERY_MS = 20000;
const CONNECT_ATTEMPTS = 3;

/** Base of every error this driver raises on purpose. */
export class TricksError extends Error {
  /** @param {string} message @param {ErrorOptions} [options] */
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The pod's environment lacks a variable the driver needs, or holds a bad value. */
export class ConfigError extends TricksError {}

/** NATS could not be reached, refused the credentials, or did not answer. */
export class NatsUnavailable extends TricksError {}

/** A blocking call (waitEvent, discover with a count) ran out of time. */
export class WaitTimeout extends TricksError {}

/**
 * A pod's identity and where its NATS is.
 * @typedef {object} Config
 * @property {string} tag
 * @property {number} replicas
 * @property {number} podId
 * @property {string} experiment
 * @property {string} podIp
 * @property {string} natsUrl
 * @property {string | undefined} natsUser
 * @property {string | undefined} natsPassword
 */

/**
 * One running pod, as the pods bucket holds it.
 * @typedef {object} Peer
 * @property {string} tag
 * @property {number} pod_id
 * @property {string} ip
 * @property {string} name
 */

/**
 * Read the pod's configuration from the environment (PROTOCOL.md section 1).
 * @param {Record<string, string | undefined>} [env]
 * @returns {Config}
 */
export function configFromEnv(env = process.env) {
  /** @param {string} name */
  const need = (name) => {
    const value = env[name];
    if (!value) {
      throw new ConfigError(
        `${name} is not set: run inside a tricks-nats pod, or set it (see drivers/PROTOCOL.md)`,
      );
    }
    return value;
  };
  /** @param {string} name */
  const integer = (name) => {
    const raw = need(name);
    if (!/^-?\d+$/.test(raw.trim())) {
      throw new ConfigError(`${name} must be an integer, got ${JSON.stringify(raw)}`);
    }
    return Number.parseInt(raw, 10);
  };
  const protocol = env.TRICKS_PROTOCOL;
  if (protocol && protocol !== PROTOCOL_VERSION) {
    throw new ConfigError(
      `TRICKS_PROTOCOL is ${protocol}: this driver speaks protocol ${PROTOCOL_VERSION}`,
    );
  }
  let url = env.TRICKS_NATS_URL;
  if (!url) {
    const ip = env.TRICKS_IP;
    const port = env.TRICKS_PORT;
    if (!ip || !port) {
      throw new ConfigError(
        "TRICKS_NATS_URL (or TRICKS_IP and TRICKS_PORT) is not set: run inside a tricks-nats pod",
      );
    }
    url = `nats://${ip}:${port}`;
  }
  return {
    tag: need("TAG"),
    replicas: integer("REPLICAS"),
    podId: integer("POD_ID"),
    experiment: need("EXP_ID"),
    podIp: env.POD_IP ?? "",
    natsUrl: url,
    natsUser: env.TRICKS_NATS_USER || undefined,
    natsPassword: env.TRICKS_NATS_PASSWORD || undefined,
  };
}

/** Subjects and names of one experiment (PROTOCOL.md section 4). */
export const names = {
  /** @param {string} exp */
  countsBucket: (exp) => `tricks-${exp}-counts`,
  /** @param {string} exp */
  podsBucket: (exp) => `tricks-${exp}-pods`,
  /** @param {string} exp */
  countsStream: (exp) => `KV_tricks-${exp}-counts`,
  /** @param {string} exp */
  podsStream: (exp) => `KV_tricks-${exp}-pods`,
  /** @param {string} exp @param {string} event */
  countSubject: (exp, event) => `$KV.tricks-${exp}-counts.${event}`,
  /** @param {string} exp @param {string} event @param {number} value */
  reachedSubject: (exp, event, value) => `tricks.${exp}.reached.${event}.${value}`,
  /** @param {string} exp */
  inboxPrefix: (exp) => `_INBOX_${exp}`,
  /** @param {string} exp @param {string} pod @param {string} event @param {string} nonce */
  msgId: (exp, pod, event, nonce) => `${exp}.${pod}.${event}.${nonce}`,
};

/** @param {string} name @param {string} what */
function checkName(name, what) {
  if (typeof name !== "string" || !NAME_RE.test(name)) {
    throw new TricksError(
      `bad ${what} ${JSON.stringify(name)}: letters, digits, '-' or '_' only`,
    );
  }
}

/** @param {unknown} timeout seconds or undefined/null (wait forever) */
function checkTimeout(timeout) {
  if (timeout === undefined || timeout === null) return undefined;
  if (typeof timeout !== "number" || !(timeout >= 0)) {
    throw new TricksError(`timeout must be a number of seconds >= 0, got ${timeout}`);
  }
  return timeout;
}

/** @param {unknown} err */
function errorName(err) {
  return err instanceof Error ? err.name : "";
}

/** @param {unknown} err */
function isTimeout(err) {
  return errorName(err) === "TimeoutError" ||
    (err instanceof Error && errorName(err.cause) === "TimeoutError");
}

/** @param {unknown} err */
function isNoResponders(err) {
  if (!(err instanceof Error)) return false;
  const check = /** @type {{isNoResponders?: () => boolean}} */ (err);
  return errorName(err) === "NoRespondersError" ||
    errorName(err.cause) === "NoRespondersError" ||
    (typeof check.isNoResponders === "function" && check.isNoResponders());
}

/** @param {unknown} err a request or flush that failed because the connection dropped */
function isDisconnection(err) {
  for (let e = err; e instanceof Error; e = e.cause) {
    if (/disconnect/i.test(e.message)) return true;
  }
  return false;
}

/**
 * Seconds left until `deadline` (a Date.now() value); undefined: no deadline.
 * @param {number | undefined} deadline
 */
function remaining(deadline) {
  return deadline === undefined ? undefined : Math.max(0, (deadline - Date.now()) / 1000);
}

/** @param {unknown} err */
function describe(err) {
  if (!(err instanceof Error)) return String(err);
  const text = err.message || err.name;
  if (/authorization/i.test(text) || errorName(err) === "AuthorizationError") {
    return "credentials refused (authorization violation)";
  }
  return text;
}

/**
 * Wait for `promise`, at most `seconds` (undefined: forever); null when the time ran out.
 * @template T
 * @param {Promise<T>} promise
 * @param {number | undefined} seconds
 * @returns {Promise<{value: T} | null>}
 */
async function within(promise, seconds) {
  if (seconds === undefined) return { value: await promise };
  /** @type {NodeJS.Timeout | undefined} */
  let timer;
  const expired = new Promise((resolve) => {
    timer = setTimeout(() => resolve(null), seconds * 1000);
  });
  try {
    return /** @type {{value: T} | null} */ (
      await Promise.race([promise.then((value) => ({ value })), expired])
    );
  } finally {
    clearTimeout(timer);
  }
}

/** The driver: one NATS connection for one pod. */
export class Driver {
  /**
   * @param {import("@nats-io/transport-node").NatsConnection} nc
   * @param {Config} config
   */
  constructor(nc, config) {
    /** The pod's configuration. */
    this.config = config;
    /** The NATS connection (for what the driver does not cover). */
    this.nc = nc;
    this.js = jetstream(nc, { timeout: REQUEST_TIMEOUT_MS });
    /** One request's timeout; a call retries past it while NATS restarts (RECOVERY_MS). */
    this.requestTimeoutMs = REQUEST_TIMEOUT_MS;
    this.#statusLoop = nc.isClosed() ? Promise.resolve() : this.#followStatus();
  }

  /** @type {Set<(status: import("@nats-io/transport-node").Status) => void>} */
  #listeners = new Set();
  /** How often the connection dropped so far. */
  #disconnects = 0;
  #connected = true;
  /** @type {Promise<void>} */
  #statusLoop;

  /** The one loop over the connection's status events; ends when the connection closes. */
  async #followStatus() {
    try {
      for await (const status of this.nc.status()) {
        if (status.type === "disconnect") {
          this.#disconnects++;
          this.#connected = false;
        } else if (status.type === "reconnect") {
          this.#connected = true;
        }
        for (const listener of [...this.#listeners]) {
          try {
            listener(status);
          } catch {
            // a listener's failure is its own
          }
        }
      }
    } catch {
      // the iterator failed: the connection is gone
    }
    this.#connected = false;
  }

  /**
   * Follow the connection's status events until the returned function is called.
   * @param {(status: import("@nats-io/transport-node").Status) => void} listener
   */
  #listen(listener) {
    this.#listeners.add(listener);
    return () => {
      this.#listeners.delete(listener);
    };
  }

  /**
   * Call `listener` after every reconnect (the server may have restarted: PROTOCOL.md 6.3,
   * 6.4), until the returned function is called.
   * @param {() => void} listener
   * @returns {() => void}
   */
  onReconnect(listener) {
    return this.#listen((status) => {
      if (status.type === "reconnect") listener();
    });
  }

  /**
   * Did `err` (of a call started when `#disconnects` was `seen`) come from a dropped
   * connection that the client is re-establishing? Then a reconnect event will follow.
   * @param {unknown} err
   * @param {number} seen
   */
  #lostConnection(err, seen) {
    if (this.nc.isClosed()) return false;
    return this.#disconnects > seen || !this.#connected || isDisconnection(err);
  }

  /** The pod's name, `<tag>-<pod_id>`. */
  get pod() {
    return `${this.config.tag}-${this.config.podId}`;
  }

  /**
   * Connect with `config` (default: from the environment).
   * @param {Config} [config]
   * @param {{requestTimeoutMs?: number}} [tuning] one request's timeout (default 2000)
   * @returns {Promise<Driver>}
   */
  static async connect(config, tuning = {}) {
    const c = config ?? configFromEnv();
    /** @type {import("@nats-io/transport-node").NodeConnectionOptions} */
    const options = {
      servers: [c.natsUrl],
      name: `tricks-${c.experiment}-${c.tag}-${c.podId}`,
      inboxPrefix: names.inboxPrefix(c.experiment),
      timeout: REQUEST_TIMEOUT_MS,
      // once connected, reconnect forever: a restarted server comes back on the same port
      reconnect: true,
      maxReconnectAttempts: -1,
      reconnectTimeWait: 200,
    };
    if (c.natsUser) {
      options.user = c.natsUser;
      options.pass = c.natsPassword ?? "";
    }
    /** @type {unknown} */
    let last;
    for (let attempt = 0; attempt < CONNECT_ATTEMPTS; attempt++) {
      try {
        const driver = new Driver(await connect(options), c);
        if (tuning.requestTimeoutMs !== undefined) driver.requestTimeoutMs = tuning.requestTimeoutMs;
        return driver;
      } catch (err) {
        last = err;
        if (/authorization/i.test(describe(err))) break;
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
    }
    throw new NatsUnavailable(`cannot reach NATS at ${c.natsUrl}: ${describe(last)}`, {
      cause: last,
    });
  }

  /** Drain and close the connection. */
  async close() {
    if (!this.nc.isClosed()) {
      try {
        await this.nc.drain();
      } catch {
        await this.nc.close();
      }
    }
    await this.#statusLoop;
    this.#listeners.clear();
  }

  /**
   * A NATS request that rides out a restarting server (PROTOCOL.md 6.0): retried while the
   * connection is re-established and while a restarted server has not loaded its streams yet;
   * the same body and headers every time, so a retried increment keeps its message id.
   * @param {string} subject
   * @param {string | Uint8Array} body
   * @param {string} what for the error message
   * @param {import("@nats-io/transport-node").MsgHdrs} [hdrs]
   */
  async #request(subject, body, what, hdrs) {
    const deadline = Date.now() + RECOVERY_MS;
    let pause = 50;
    /** @type {unknown} */
    let last;
    for (;;) {
      try {
        return await this.nc.request(subject, body, {
          timeout: this.requestTimeoutMs,
          headers: hdrs,
        });
      } catch (err) {
        last = err;
        if (isNoResponders(err)) {
          if (await this.#countsStreamMissing()) {
            throw new TricksError(
              `experiment ${JSON.stringify(this.config.experiment)} is not running on this NATS ` +
                "(no counts bucket)",
              { cause: err },
            );
          }
        } else if (!isTimeout(err) && !isDisconnection(err)) {
          throw new NatsUnavailable(`cannot ${what}: ${describe(err)}`, { cause: err });
        }
      }
      if (this.nc.isClosed() || Date.now() + pause >= deadline) {
        throw new NatsUnavailable(`cannot ${what}: NATS did not answer (${describe(last)})`, {
          cause: last,
        });
      }
      await new Promise((resolve) => setTimeout(resolve, pause)); // backoff, not a wait
      pause = Math.min(pause * 2, 1000);
    }
  }

  /** True only when JetStream answers that the counts stream does not exist. */
  async #countsStreamMissing() {
    const stream = names.countsStream(this.config.experiment);
    try {
      const reply = await this.nc.request(`$JS.API.STREAM.INFO.${stream}`, Empty, {
        timeout: REQUEST_TIMEOUT_MS,
      });
      /** @type {{error?: {code?: number}}} */
      const info = reply.json();
      return info.error?.code === 404;
    } catch {
      return false; // JetStream itself is not answering yet: a restart in progress
    }
  }

  /**
   * Add one to event `name`, exactly once even when the request is retried.
   * @param {string} name
   * @returns {Promise<number>} the count right after this registration
   */
  async registerEvent(name) {
    checkName(name, "event name");
    const nonce = randomBytes(8).toString("hex");
    return this.increment(name, names.msgId(this.config.experiment, this.pod, name, nonce));
  }

  /**
   * The increment of PROTOCOL.md 6.1 with a given message id: requests with the same id
   * count once (registerEvent makes a fresh one per call).
   * @param {string} name
   * @param {string} msgId
   * @returns {Promise<number>}
   */
  async increment(name, msgId) {
    checkName(name, "event name");
    const exp = this.config.experiment;
    const h = headers();
    h.set("Nats-Incr", "1");
    h.set("Nats-Msg-Id", msgId);
    h.set("Tricks-Pod", this.pod);
    const reply = await this.#request(
      names.countSubject(exp, name),
      Empty,
      `register event ${JSON.stringify(name)}`,
      h,
    );
    /** @type {{seq?: number, val?: string, duplicate?: boolean, error?: {description?: string}}} */
    let ack;
    try {
      ack = reply.json();
    } catch (err) {
      throw new TricksError(`increment of ${JSON.stringify(name)}: malformed reply`, {
        cause: err,
      });
    }
    if (ack.error) {
      throw new TricksError(
        `increment of ${JSON.stringify(name)} refused: ${ack.error.description ?? "?"}`,
      );
    }
    if (typeof ack.val === "string") return Number.parseInt(ack.val, 10);
    return this.#valueAt(ack.seq ?? 0);
  }

  /** @param {number} seq */
  async #valueAt(seq) {
    const stream = names.countsStream(this.config.experiment);
    const reply = await this.#request(
      `$JS.API.DIRECT.GET.${stream}`,
      JSON.stringify({ seq }),
      "read a count",
    );
    return parseCount(reply.data) ?? 0;
  }

  /**
   * The current count of event `name` (0 when never registered).
   * @param {string} name
   * @returns {Promise<number>}
   */
  async count(name) {
    checkName(name, "event name");
    const exp = this.config.experiment;
    const subject = `$JS.API.DIRECT.GET.${names.countsStream(exp)}.${names.countSubject(exp, name)}`;
    const reply = await this.#request(subject, Empty, `read event ${JSON.stringify(name)}`);
    if (reply.headers?.code === 404) return 0;
    return parseCount(reply.data) ?? 0;
  }

  /**
   * Block until event `name` has been registered at least `value` times.
   * Subscribes to the coordinator's one notification first, then reads the count; reads it
   * again after every reconnect (a notification sent while we were away is lost).
   * @param {string} name
   * @param {number} value
   * @param {{timeout?: number}} [options] timeout in seconds (default: forever)
   * @returns {Promise<number>} the count reached (>= value)
   */
  async waitEvent(name, value, options = {}) {
    checkName(name, "event name");
    if (!Number.isInteger(value)) {
      throw new TricksError(`value must be an integer, got ${value}`);
    }
    const timeout = checkTimeout(options.timeout);
    const deadline = timeout === undefined ? undefined : Date.now() + timeout * 1000;
    const sub = this.nc.subscribe(
      names.reachedSubject(this.config.experiment, name, value),
      { max: 1 },
    );
    const reached = (async () => {
      for await (const _ of sub) return true;
      return false;
    })();
    let stale = true; // the count is to be (re)read
    /** @type {() => void} */
    let wake = () => {};
    const unlisten = this.onReconnect(() => {
      stale = true; // the client restored the subscription before telling us
      wake();
    });
    let current = 0;
    try {
      for (;;) {
        if (stale) {
          stale = false;
          const seen = this.#disconnects;
          try {
            await this.nc.flush();
            current = await this.count(name);
            if (current >= value) return current;
          } catch (err) {
            if (!this.#lostConnection(err, seen)) throw err;
            // the connection dropped: the reconnect reads the count again
          }
          if (stale) continue;
        }
        /** @type {Promise<"reconnect">} */
        const woken = new Promise((resolve) => {
          wake = () => resolve("reconnect");
        });
        const got = await within(
          Promise.race([reached.then((ok) => (ok ? "reached" : "closed")), woken]),
          remaining(deadline),
        );
        if (got === null) break;
        if (got.value === "reached") return Math.max(value, current);
        if (got.value === "closed") {
          throw new NatsUnavailable(`waiting for ${JSON.stringify(name)}: the connection closed`);
        }
      }
      const now = await this.count(name);
      if (now >= value) return now;
      throw new WaitTimeout(
        `timed out after ${timeout}s waiting for ${JSON.stringify(name)} to reach ${value} ` +
          `(it is ${now})`,
      );
    } finally {
      unlisten();
      sub.unsubscribe();
      await reached;
    }
  }

  /**
   * The running pods of `tag`; with `count`, first wait until at least that many run.
   * A KV watch of `<tag>.*` on the pods bucket, until caught up (PROTOCOL.md 6.4); after a
   * reconnect the watch starts over (a restarted server may have lost its consumer).
   * @param {string} tag
   * @param {number | null} [count]
   * @param {{timeout?: number}} [options] timeout in seconds (default: forever)
   * @returns {Promise<Peer[]>} sorted by pod id
   */
  async discover(tag, count = null, options = {}) {
    checkName(tag, "tag");
    if (count !== null && count !== undefined && !(Number.isInteger(count) && count >= 0)) {
      throw new TricksError(`count must be an integer >= 0, got ${count}`);
    }
    const timeout = checkTimeout(options.timeout);
    const deadline = timeout === undefined ? undefined : Date.now() + timeout * 1000;
    let restart = false;
    let closed = false;
    /** @type {() => void} */
    let wake = () => {};
    const unlisten = this.#listen((status) => {
      if (status.type === "reconnect") restart = true;
      else if (status.type === "close") closed = true;
      else return;
      wake();
    });
    /** @type {Map<string, Peer>} */
    let live = new Map();
    try {
      for (;;) {
        if (closed || this.nc.isClosed()) {
          throw new NatsUnavailable(`discovering ${JSON.stringify(tag)}: the connection closed`);
        }
        restart = false;
        live = new Map();
        /** @type {{peers: Promise<Peer[]>, stop: () => Promise<void>} | null} */
        let watch = null;
        const seen = this.#disconnects;
        try {
          watch = await this.#watchPods(tag, count ?? null, live);
        } catch (err) {
          if (!this.#lostConnection(err, seen)) {
            throw this.#jsError(`discover ${JSON.stringify(tag)}`, err);
          }
          // the connection dropped: start over after the reconnect
        }
        try {
          if (restart || closed) continue;
          /** @type {Promise<null>} */
          const woken = new Promise((resolve) => {
            wake = () => resolve(null);
          });
          const got = await within(
            watch ? Promise.race([watch.peers, woken]) : woken,
            remaining(deadline),
          );
          if (got === null) {
            throw new WaitTimeout(
              `timed out after ${timeout}s discovering ${count} pods of ` +
                `${JSON.stringify(tag)} (${live.size} running)`,
            );
          }
          if (got.value !== null) return got.value;
        } finally {
          await watch?.stop();
        }
      }
    } finally {
      unlisten();
    }
  }

  /**
   * One KV watch of `<tag>.*` (PROTOCOL.md 6.4 steps 1-4) filling `live`; `peers` resolves
   * once it has caught up with at least `count` pods.
   * @param {string} tag
   * @param {number | null} count
   * @param {Map<string, Peer>} live
   * @returns {Promise<{peers: Promise<Peer[]>, stop: () => Promise<void>}>}
   */
  async #watchPods(tag, count, live) {
    const exp = this.config.experiment;
    const prefix = `$KV.${names.podsBucket(exp)}.`;
    /** @type {(peers: Peer[]) => void} */
    let done = () => {};
    /** @type {Promise<Peer[]>} */
    const peers = new Promise((resolve) => {
      done = resolve;
    });
    let caughtUp = false;
    const check = () => {
      if (caughtUp && (count === null || live.size >= count)) {
        done([...live.values()].sort((a, b) => a.pod_id - b.pod_id));
      }
    };
    const consumer = await this.js.consumers.getPushConsumer(names.podsStream(exp), {
      filter_subjects: `${prefix}${tag}.*`,
      deliver_policy: DeliverPolicy.LastPerSubject,
    });
    /** @type {import("@nats-io/jetstream").ConsumerMessages | undefined} */
    let messages;
    const stop = async () => {
      messages?.stop();
      await consumer.delete().catch(() => false);
    };
    try {
      const info = await consumer.info(true);
      messages = await consumer.consume({
        callback: (m) => {
          const key = m.subject.slice(prefix.length);
          const op = m.headers?.get("KV-Operation");
          if (op === "DEL" || op === "PURGE" || m.data.length === 0) {
            live.delete(key);
          } else {
            try {
              const record = /** @type {Peer} */ (m.json());
              live.set(key, { ...record, name: record.name ?? "" });
            } catch {
              // a malformed record: not a pod
            }
          }
          if (m.info.pending === 0) caughtUp = true;
          check();
        },
      });
      if (info.num_pending === 0) caughtUp = true;
      check();
    } catch (err) {
      await stop();
      throw err;
    }
    return { peers, stop };
  }

  /**
   * @param {string} what
   * @param {unknown} err
   */
  #jsError(what, err) {
    if (err instanceof TricksError) return err;
    const text = describe(err);
    if (/stream not found|no responders/i.test(text) || isNoResponders(err)) {
      return new TricksError(
        `experiment ${JSON.stringify(this.config.experiment)} is not running on this NATS`,
        { cause: err },
      );
    }
    return new NatsUnavailable(`cannot ${what}: ${text}`, { cause: err });
  }
}

/**
 * A counter body `{"val":"<n>"}`, or null for anything else.
 * @param {Uint8Array} data
 * @returns {number | null}
 */
export function parseCount(data) {
  try {
    const body = JSON.parse(new TextDecoder().decode(data));
    const n = Number.parseInt(body.val, 10);
    return Number.isNaN(n) ? null : n;
  } catch {
    return null;
  }
}
