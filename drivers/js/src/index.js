// The tricks-nats driver for Node.js: discover peers, register events, wait for counts,
// record samples, exchange data on topics.
//
// It implements drivers/PROTOCOL.md (version 2) on core NATS with the official client (no
// JetStream API: requests, subscriptions and direct gets only). Configured from the pod's
// environment alone:
//
//   import { Driver } from "@tricks-nats/driver";
//   const tricks = await Driver.connect();
//   const servers = await tricks.discover("server", 6, { timeout: 60 });
//   await tricks.registerEvent("server-connected");
//   await tricks.waitEvent("server-connected", 6, { timeout: 60 });
//   tricks.record("request_ms", 12.5, { op: "get" });   // never blocks; sent in batches
//   await tricks.publish("config", { leader: 3 });      // kept for the run; its seq
//   for await (const msg of tricks.subscribe("config")) console.log(msg.json());
//   await tricks.close();                               // sends what is buffered first
//
// Timeouts are in seconds, as in every other driver. Every call fails only with the errors
// below (all TricksError).

import { randomBytes } from "node:crypto";

import { connect, Empty, headers, usernamePasswordAuthenticator } from "@nats-io/transport-node";

import { encodeTopicData, JS_ID_IN_PROCESS, Subscription } from "./topics.js";

export { MAX_TOPIC_BYTES } from "./topics.js";

/** The protocol version this driver speaks (`tricks_nats.protocol.VERSION`). */
export const PROTOCOL_VERSION = "2";

/** Tags and event names: one NATS subject token, one KV key. */
export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$/;

const REQUEST_TIMEOUT_MS = 2000;
/** How long a request, and connecting, keep retrying while NATS restarts (PROTOCOL.md 6). */
const RECOVERY_MS = 20000;
/** How long a call waits in all while NATS answers but the coordinator has not yet. */
const PATIENCE_MS = 300000;
const CONNECT_TIMEOUT_MS = 2000;

/** Samples waiting to be sent at most (PROTOCOL.md 6.6); one more is dropped, and counted. */
const BUFFER_SAMPLES = 100_000;
/** A batch goes out as soon as this many samples wait, */
const BATCH_SAMPLES = 4096;
/** or at most this long after a sample was recorded. */
const BATCH_INTERVAL_MS = 200;
/** A batch's body stays under this many bytes (the stream takes up to 1 MiB). */
const BATCH_BYTES = 256 * 1024;
/** close() gives the buffered samples this long to reach the stream. */
const CLOSE_FLUSH_MS = 10_000;
/** The exit status after SIGTERM (128 + 15), as without a handler. */
const SIGTERM_STATUS = 143;

/** Label keys of a sample: short identifiers. */
export const LABEL_RE = /^[A-Za-z_][A-Za-z0-9_]{0,31}$/;
/** Label keys that are columns of metrics.csv. */
const RESERVED_LABELS = new Set(["ts", "tag", "pod_id", "name", "value"]);
const MAX_LABELS = 8;
const MAX_LABEL_VALUE = 200;

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
 * NATS refused a subject to these credentials (a permissions violation): a wrong EXP_ID, or a
 * call beyond the pod's permissions. Final at once, never ridden out.
 */
export class PermissionDenied extends TricksError {}

/** `discover` of a tag the experiment does not have (TRICKS_TAGS): a typo, said at once. */
export class UnknownTag extends TricksError {}

/**
 * A pod's identity and where its NATS is. `natsPassword` is a non-enumerable property: it is
 * not printed (util.inspect, console.log), serialized (JSON.stringify) nor copied by a spread.
 * @typedef {object} Config
 * @property {string} tag
 * @property {number} replicas
 * @property {number} podId
 * @property {string} experiment
 * @property {string} podIp
 * @property {string} natsUrl
 * @property {string | undefined} natsUser
 * @property {string | undefined} natsPassword
 * @property {string[]} [tags] the experiment's tags (TRICKS_TAGS); absent: discover checks none
 */

/**
 * One running pod, as its tag's roster lists it.
 * @typedef {object} Peer
 * @property {string} tag
 * @property {number} pod_id
 * @property {string} ip
 * @property {string} name
 */

/**
 * `config` with its password made non-enumerable (kept, but never printed or serialized).
 * @param {Config} config
 * @returns {Config}
 */
function hidePassword(config) {
  const { natsPassword, ...visible } = config;
  const copy = /** @type {Config} */ ({ ...visible });
  Object.defineProperty(copy, "natsPassword", {
    value: natsPassword,
    enumerable: false,
    writable: true,
    configurable: true,
  });
  return copy;
}

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
      `TRICKS_PROTOCOL is ${JSON.stringify(protocol)}: this driver speaks protocol ` +
        `${PROTOCOL_VERSION} only (drivers/PROTOCOL.md)`,
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
  const user = env.TRICKS_NATS_USER || undefined;
  const tags = env.TRICKS_TAGS ? env.TRICKS_TAGS.split(",") : undefined;
  return hidePassword({
    tag: need("TAG"),
    replicas: integer("REPLICAS"),
    podId: integer("POD_ID"),
    experiment: need("EXP_ID"),
    podIp: env.POD_IP ?? "",
    natsUrl: url,
    natsUser: user,
    natsPassword: user ? (env.TRICKS_NATS_PASSWORD ?? "") : undefined,
    ...(tags ? { tags } : {}),
  });
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
  /** The counter of `event` (only the coordinator writes it). @param {string} exp @param {string} event */
  countSubject: (exp, event) => `$KV.tricks-${exp}-counts.${event}`,
  /** Pods register `event` with a request here. @param {string} exp @param {string} event */
  eventSubject: (exp, event) => `tricks.${exp}.event.${event}`,
  /** The last message here is the roster of `tag`. @param {string} exp @param {string} tag */
  rosterSubject: (exp, tag) => `$KV.tricks-${exp}-pods.${tag}`,
  /** @param {string} exp @param {string} event @param {number} value */
  reachedSubject: (exp, event, value) => `tricks.${exp}.reached.${event}.${value}`,
  /** @param {string} exp */
  inboxPrefix: (exp) => `_INBOX_${exp}`,
  /** @param {string} exp @param {string} pod @param {string} event @param {string} nonce */
  msgId: (exp, pod, event, nonce) => `${exp}.${pod}.${event}.${nonce}`,
  /**
   * A pod's metrics batches go here (`pod`: `<tag>-<pod_id>`).
   * @param {string} exp @param {string} pod
   */
  metricsSubject: (exp, pod) => `tricks.${exp}.metrics.${pod}`,
  /** The stream that stores the batches. @param {string} exp */
  metricsStream: (exp) => `tricks-${exp}-metrics`,
  /**
   * A batch's message id: one per batch, the same on its retries.
   * @param {string} exp @param {string} pod @param {string} nonce
   */
  metricsMsgId: (exp, pod, nonce) => `${exp}.${pod}.metrics.${nonce}`,
  /**
   * Pods publish a topic's messages here (a request: the reply is the stream's ack).
   * @param {string} exp @param {string} topic
   */
  topicSubject: (exp, topic) => `tricks.${exp}.topic.${topic}`,
  /**
   * The topics stream republishes each message it stores here (only the server may).
   * @param {string} exp @param {string} topic
   */
  storedSubject: (exp, topic) => `tricks.${exp}.stored.${topic}`,
  /** The stream that keeps every topic's messages for the run. @param {string} exp */
  topicsStream: (exp) => `tricks-${exp}-topics`,
  /**
   * A publish's message id: one per call, the same on its retries.
   * @param {string} exp @param {string} pod @param {string} topic @param {string} nonce
   */
  topicMsgId: (exp, pod, topic, nonce) => `${exp}.${pod}.topic.${topic}.${nonce}`,
};

/** @param {unknown} name @param {string} what */
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

/**
 * A sample: `[ts, name, value]` or `[ts, name, value, labels]` (PROTOCOL.md 6.6).
 * @typedef {[number, string, number] | [number, string, number, Record<string, string>]} Sample
 */

/**
 * Labels checked (PROTOCOL.md 6.6) and copied, numbers turned into strings; null when none.
 * @param {unknown} labels
 * @returns {Record<string, string> | null}
 */
function checkLabels(labels) {
  if (typeof labels !== "object" || labels === null || Array.isArray(labels)) {
    throw new TricksError(`labels must be an object of strings, got ${describeValue(labels)}`);
  }
  /** @type {Record<string, string> | null} */
  let copy = null;
  let n = 0;
  for (const [key, raw] of Object.entries(labels)) {
    if (++n > MAX_LABELS) {
      throw new TricksError(`at most ${MAX_LABELS} labels, got ${Object.keys(labels).length}`);
    }
    if (!LABEL_RE.test(key)) {
      throw new TricksError(
        `bad label ${JSON.stringify(key)}: a letter or '_', then up to 31 letters, digits or '_'`,
      );
    }
    if (RESERVED_LABELS.has(key)) {
      throw new TricksError(`label ${JSON.stringify(key)} is reserved (a column of metrics.csv)`);
    }
    /** @type {unknown} */
    let value = raw;
    if (typeof value === "number" && Number.isFinite(value)) value = String(value);
    if (typeof value !== "string") {
      throw new TricksError(`label ${key} must be a string, got ${describeValue(raw)}`);
    }
    // at most 200 characters (code points, as in Python); UTF-16 units are never fewer
    if (value.length > MAX_LABEL_VALUE && [...value].length > MAX_LABEL_VALUE) {
      throw new TricksError(`label ${key} is longer than ${MAX_LABEL_VALUE} characters`);
    }
    (copy ??= {})[key] = value;
  }
  return copy;
}

/** A short description of a value for an error message. @param {unknown} value */
function describeValue(value) {
  if (typeof value === "string") return JSON.stringify(value.slice(0, 40));
  if (typeof value === "bigint") return `${value}n`;
  if (typeof value === "function") return "a function";
  if (value === null || typeof value !== "object") return String(value);
  return Array.isArray(value) ? "an array" : "an object";
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
  return /^NoResponders/.test(errorName(err)) || /^NoResponders/.test(errorName(err.cause)) ||
    (typeof check.isNoResponders === "function" && check.isNoResponders());
}

/** @param {unknown} err a request or flush that failed because the connection dropped */
function isDisconnection(err) {
  for (let e = err; e instanceof Error; e = e.cause) {
    if (/disconnect/i.test(e.message)) return true;
  }
  return false;
}

/** @param {unknown} err */
function isAuthorization(err) {
  for (let e = err; e instanceof Error; e = e.cause) {
    if (errorName(e) === "AuthorizationError" || /authorization violation/i.test(e.message)) {
      return true;
    }
  }
  return false;
}

/**
 * The server's "Permissions Violation for Publish|Subscription to <subject>" behind `err`.
 * @param {unknown} err
 * @returns {{subject: string} | null}
 */
function permissionViolation(err) {
  for (let e = err; e instanceof Error; e = e.cause) {
    if (errorName(e) === "PermissionViolationError" || /permissions violation/i.test(e.message)) {
      const subject = /** @type {{subject?: unknown}} */ (e).subject;
      const quoted = e.message.match(/to "(\S+)"/);
      return { subject: typeof subject === "string" && subject ? subject : quoted?.[1] ?? "?" };
    }
  }
  return null;
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
  if (isAuthorization(err)) return "credentials refused (authorization violation)";
  return err.message || err.name;
}

/** @param {number} ms */
function pause(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
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

/** @param {import("@nats-io/transport-node").Subscription | null} sub */
function unsubscribe(sub) {
  try {
    sub?.unsubscribe();
  } catch {
    // the connection is gone, and the interest with it
  }
}

/**
 * Why a waiter woke up: a notification (with the count its body states, or null when it
 * states none for this event), a reconnect, an error.
 * @typedef {{told: number | null, msg?: import("@nats-io/transport-node").Msg} | "reconnect" | {error: unknown}} Wakeup
 */

/** The wake-ups of one waiter, in order; none is lost while it is busy. */
class Wakeups {
  /** @type {Wakeup[]} */
  #queue = [];
  /** @type {((wakeup: Wakeup) => void) | null} */
  #waiting = null;

  /** @param {Wakeup} wakeup */
  push(wakeup) {
    const waiting = this.#waiting;
    this.#waiting = null;
    if (waiting) waiting(wakeup);
    else this.#queue.push(wakeup);
  }

  /** @returns {Promise<Wakeup>} */
  next() {
    const first = this.#queue.shift();
    if (first !== undefined) return Promise.resolve(first);
    return new Promise((resolve) => {
      this.#waiting = resolve;
    });
  }
}

/** Rejection of `#shutdown`: the driver was closed, or its connection ended. */
const SHUTDOWN = new Error("shutdown");

/**
 * For whom a request works: `check(what)` throws once it must give up, and `ended` then
 * rejects with SHUTDOWN; with `abort`, that also cuts short the wait for a reply.
 * @typedef {object} Scope
 * @property {(what: string) => void} check
 * @property {Promise<never>} ended
 * @property {boolean} abort
 */

/**
 * The SIGTERM handler the drivers share (PROTOCOL.md 6.6, "nothing lost at exit"). Installed
 * when a driver first has samples to send, only where the program has no SIGTERM listener
 * then (a listener replaces Node's default: exit at once); removed when the last driver that
 * has samples closes. A driver that records nothing leaves SIGTERM alone.
 */
const sigterm = {
  /** @type {Set<Driver>} the open drivers */
  drivers: new Set(),
  installed: false,
  /** Alone, close every driver (each sends its samples first) and exit as Node would. */
  handler() {
    const drivers = [...sigterm.drivers];
    if (process.listenerCount("SIGTERM") > 1) {
      // The program has its own handler by now: it decides when to exit; help it lose nothing.
      for (const driver of drivers) driver.flush().catch(() => {});
      return;
    }
    Promise.allSettled(drivers.map((driver) => driver.close())).then(() => {
      process.exit(SIGTERM_STATUS);
    });
  },
  /** @param {Driver} driver */
  add(driver) {
    if (!sigterm.installed) {
      if (process.listenerCount("SIGTERM") > 0) return; // the program handles SIGTERM itself
      process.on("SIGTERM", sigterm.handler);
      sigterm.installed = true;
    }
    sigterm.drivers.add(driver);
  },
  /** @param {Driver} driver */
  remove(driver) {
    sigterm.drivers.delete(driver);
    if (sigterm.installed && sigterm.drivers.size === 0) {
      process.removeListener("SIGTERM", sigterm.handler);
      sigterm.installed = false;
    }
  },
};

/** The driver: one NATS connection for one pod. */
export class Driver {
  /**
   * @param {import("@nats-io/transport-node").NatsConnection} nc
   * @param {Config} config
   */
  constructor(nc, config) {
    /** The pod's configuration (its password is not enumerable). */
    this.config = hidePassword(config);
    /** The NATS connection (for what the driver does not cover). */
    this.nc = nc;
    /** One request's timeout; a call retries past it while NATS restarts (`recoveryMs`). */
    this.requestTimeoutMs = REQUEST_TIMEOUT_MS;
    /** How long a call retries unanswered requests before NatsUnavailable (PROTOCOL.md 6). */
    this.recoveryMs = RECOVERY_MS;
    /** Samples that may wait to be sent; record() drops (and counts) one more. */
    this.bufferSamples = BUFFER_SAMPLES;
    this.#shutdown = new Promise((_, reject) => {
      this.#shut = () => reject(SHUTDOWN);
    });
    this.#shutdown.catch(() => {}); // observed by whoever races it
    this.#calls = {
      check: (what) => this.#checkOpen(what),
      ended: this.#shutdown,
      abort: false,
    };
    /** @type {Promise<never>} */
    const senderEnded = new Promise((_, reject) => {
      this.#abortSender = () => reject(SHUTDOWN);
    });
    senderEnded.catch(() => {});
    this.#sending = {
      check: (what) => {
        if (this.#gone || this.nc.isClosed()) {
          throw new NatsUnavailable(`cannot ${what}: the NATS connection is closed`);
        }
        if (this.#senderStopped) throw new TricksError(`cannot ${what}: the driver is closed`);
      },
      ended: senderEnded,
      abort: true,
    };
    this.#metricsSubject = names.metricsSubject(this.config.experiment, this.pod);
    this.#statusLoop = nc.isClosed() ? this.#ended() : this.#followStatus();
  }

  /** @type {Set<(type: string) => void>} */
  #listeners = new Set();
  /** @type {Map<string, {subject: string}>} subjects the server refused, with the refusal */
  #denied = new Map();
  /** How often the connection dropped so far. */
  #disconnects = 0;
  #connected = true;
  /** close() was called. */
  #closing = false;
  /** The connection is closed (by close() or for good by the client). */
  #gone = false;
  /** @type {Promise<never>} rejects (with SHUTDOWN) once closed or the connection gone */
  #shutdown;
  /** @type {() => void} */
  #shut = () => {};
  /** @type {Promise<void>} */
  #statusLoop;
  /** @type {Scope} the public calls: they end when the driver closes */
  #calls;
  /** @type {Set<() => void>} called once closed or the connection gone (subscriptions) */
  #endHooks = new Set();

  /** Tell the subscriptions that the driver ended: their waiting calls end at once. */
  #endSubscriptions() {
    const hooks = [...this.#endHooks];
    this.#endHooks.clear();
    for (const hook of hooks) {
      try {
        hook();
      } catch {
        // a hook's failure is its own
      }
    }
  }

  // The samples of record() (PROTOCOL.md 6.6). Samples are numbered in the order recorded;
  // the sender takes them from the buffer into batches, one batch in flight.
  /** @type {Sample[]} the samples waiting, from `#head` on */
  #buffer = [];
  #head = 0;
  /** Samples dropped so far: a full buffer, a refused batch, a batch NATS did not take. */
  #dropped = 0;
  /** @type {Map<string, number>} expected ms between samples, by name (expectInterval) */
  #intervals = new Map();
  /** `,"intervals":{...}` of a batch, or "" while none was declared */
  #intervalsJson = "";
  #intervalsVersion = 0;
  /** `dropped` and the intervals' version in the last batch the stream stored */
  #reportedDropped = 0;
  #reportedIntervals = 0;
  /** Samples taken into batches so far, and how many of them are done with (stored or lost). */
  #taken = 0;
  #settled = 0;
  /** Batches formed so far, and how many of them are done with. */
  #formed = 0;
  #finished = 0;
  /** Send whatever the batch size until `#taken` reaches this (the timer, a flush). */
  #wantUntil = 0;
  /** Send a batch (with no samples if need be) until `#formed` reaches this (a flush). */
  #needFormed = 0;
  /** @type {{target: number, batch: number, resolve: () => void}[]} pending flushes */
  #flushes = [];
  /** @type {Promise<void> | null} the sender, while it runs */
  #sender = null;
  /** @type {NodeJS.Timeout | null} */
  #timer = null;
  #senderStopped = false;
  /** @type {() => void} */
  #abortSender = () => {};
  /** @type {Scope} the sender's requests: they end when the sender stops, not at close() */
  #sending;
  #metricsSubject = "";
  #warnedLoss = false;
  /** The SIGTERM handler was offered this driver (at its first sample or interval). */
  #watched = false;

  async #ended() {
    this.#gone = true;
    this.#connected = false;
    this.#shut();
    this.#endSubscriptions();
    this.#stopSender();
    sigterm.remove(this);
  }

  /** The one loop over the connection's status events; ends when the connection closes. */
  async #followStatus() {
    try {
      for await (const status of this.nc.status()) {
        if (status.type === "disconnect") {
          this.#disconnects++;
          this.#connected = false;
        } else if (status.type === "reconnect") {
          this.#connected = true;
        } else if (status.type === "error") {
          const denied = permissionViolation(status.error);
          if (denied) this.#denied.set(denied.subject, denied);
        }
        this.#tell(status.type);
      }
    } catch {
      // the iterator failed: the connection is gone
    }
    await this.#ended();
    this.#tell("close");
  }

  /** @param {string} type */
  #tell(type) {
    for (const listener of [...this.#listeners]) {
      try {
        listener(type);
      } catch {
        // a listener's failure is its own
      }
    }
  }

  /**
   * Follow the connection's status events until the returned function is called.
   * @param {(type: string) => void} listener
   */
  #listen(listener) {
    this.#listeners.add(listener);
    return () => {
      this.#listeners.delete(listener);
    };
  }

  /**
   * Call `listener` after every reconnect (the server may have restarted: PROTOCOL.md 6.3),
   * until the returned function is called.
   * @param {() => void} listener
   * @returns {() => void}
   */
  onReconnect(listener) {
    return this.#listen((type) => {
      if (type === "reconnect") listener();
    });
  }

  /**
   * Did `err` (of a call started when `#disconnects` was `seen`) come from a dropped
   * connection that the client is re-establishing? Then a reconnect event will follow.
   * @param {unknown} err
   * @param {number} seen
   */
  #lostConnection(err, seen) {
    if (this.#closing || this.#gone || this.nc.isClosed()) return false;
    if (err instanceof TricksError && !(err instanceof NatsUnavailable)) return false;
    return this.#disconnects > seen || !this.#connected || isDisconnection(err);
  }

  /** Throw when the driver is closed or its connection gone. @param {string} what */
  #checkOpen(what) {
    if (this.#closing) throw new TricksError(`cannot ${what}: the driver is closed`);
    if (this.#gone || this.nc.isClosed()) {
      throw new NatsUnavailable(`cannot ${what}: the NATS connection is closed`);
    }
  }

  /**
   * `promise`, or null when `deadline` passes first; fails at once when the driver closes.
   * @template T
   * @param {Promise<T>} promise
   * @param {number | undefined} deadline
   * @param {string} what
   * @param {Scope} [scope] who waits (default: a public call, which close() ends)
   * @returns {Promise<{value: T} | null>}
   */
  async #until(promise, deadline, what, scope = this.#calls) {
    try {
      return await within(Promise.race([promise, scope.ended]), remaining(deadline));
    } catch (err) {
      if (err === SHUTDOWN) scope.check(what);
      throw err;
    }
  }

  /**
   * Run one public call: any failure that is not already ours becomes a TricksError.
   * @template T
   * @param {string} what
   * @param {() => Promise<T>} call
   * @returns {Promise<T>}
   */
  async #call(what, call) {
    try {
      return await call();
    } catch (err) {
      if (err instanceof TricksError) throw err;
      if (err === SHUTDOWN) this.#checkOpen(what);
      const denied = permissionViolation(err);
      if (denied) throw this.#refused(denied, err);
      if (/closed|draining/i.test(errorName(err))) this.#checkOpen(what);
      throw new TricksError(`cannot ${what}: ${describe(err)}`, { cause: err });
    }
  }

  /**
   * The error for a subject the server refused: final at once (PROTOCOL.md 8).
   * @param {{subject: string}} denied
   * @param {unknown} [cause]
   */
  #refused(denied, cause) {
    return new PermissionDenied(
      `NATS refused ${denied.subject}: these credentials do not reach experiment ` +
        `${JSON.stringify(this.config.experiment)} (permissions violation)`,
      { cause },
    );
  }

  /** The pod's name, `<tag>-<pod_id>`. */
  get pod() {
    return `${this.config.tag}-${this.config.podId}`;
  }

  /** What JSON.stringify shows of a driver: its configuration, without the password. */
  toJSON() {
    return { pod: this.pod, config: this.config, closed: this.#closing || this.#gone };
  }

  /**
   * Connect with `config` (default: from the environment). A refused or unreachable server
   * is tried again for `recoveryMs` (a restarting server comes back within it); refused
   * credentials are final at once.
   * @param {Config} [config]
   * @param {{requestTimeoutMs?: number, recoveryMs?: number, bufferSamples?: number}} [tuning]
   *   one request's timeout (default 2000), the ride-out budget of connecting and of every
   *   call (default 20000), the samples record() keeps waiting at most (default 100000)
   * @returns {Promise<Driver>}
   * @throws {ConfigError} no `config` and an incomplete environment
   * @throws {NatsUnavailable} unreachable for `recoveryMs`, or the credentials refused
   * @throws {TricksError} a `bufferSamples` that is not an integer > 0
   */
  static async connect(config, tuning = {}) {
    const c = config ?? configFromEnv();
    const { requestTimeoutMs, recoveryMs = RECOVERY_MS, bufferSamples } = tuning ?? {};
    if (bufferSamples !== undefined && !(Number.isInteger(bufferSamples) && bufferSamples > 0)) {
      throw new TricksError(`bufferSamples must be an integer > 0, got ${bufferSamples}`);
    }
    /** @type {import("@nats-io/transport-node").NodeConnectionOptions} */
    const options = {
      servers: [c.natsUrl],
      name: `tricks-${c.experiment}-${c.tag}-${c.podId}`,
      inboxPrefix: names.inboxPrefix(c.experiment),
      timeout: CONNECT_TIMEOUT_MS,
      // once connected, reconnect forever: a restarted server comes back on the same port
      reconnect: true,
      maxReconnectAttempts: -1,
      reconnectTimeWait: 200,
    };
    if (c.natsUser) {
      // An authenticator, not `pass`: the password stays out of the connection's options.
      const password = c.natsPassword ?? "";
      options.authenticator = usernamePasswordAuthenticator(c.natsUser, () => password);
    }
    const deadline = Date.now() + recoveryMs;
    let wait = 50;
    for (;;) {
      try {
        const driver = new Driver(await connect(options), c);
        if (requestTimeoutMs !== undefined) driver.requestTimeoutMs = requestTimeoutMs;
        driver.recoveryMs = recoveryMs;
        if (bufferSamples !== undefined) driver.bufferSamples = bufferSamples;
        return driver;
      } catch (err) {
        const final = isAuthorization(err) || errorName(err) === "InvalidArgumentError";
        if (final || Date.now() + wait >= deadline) {
          throw new NatsUnavailable(`cannot reach NATS at ${c.natsUrl}: ${describe(err)}`, {
            cause: err,
          });
        }
      }
      await pause(wait); // a backoff between attempts, not a wait for an event
      wait = Math.min(wait * 2, 1000);
    }
  }

  /**
   * Send the samples still buffered (for 10 s at most), then drain and close the connection.
   * Calls still pending (a waitEvent, a blocking discover) fail at once with a TricksError.
   * Never fails itself; calling it again is harmless.
   * @returns {Promise<void>}
   */
  async close() {
    if (!this.#closing) {
      this.#closing = true;
      this.#shut();
      this.#endSubscriptions();
      sigterm.remove(this);
      if (!this.nc.isClosed()) {
        const sent = await within(this.#flush(), CLOSE_FLUSH_MS / 1000);
        if (sent === null) this.#stopSender(`close() gave up after ${CLOSE_FLUSH_MS / 1000}s`);
      }
      this.#stopSender(); // nothing more to send: this also ends the timer
      await this.#sender;
      if (!this.nc.isClosed()) {
        // Drain (pending replies are delivered) while connected, for a moment at most: a
        // server that is away must not hold close() up.
        const drained = this.#connected
          ? await within(this.nc.drain().then(() => true, () => false), REQUEST_TIMEOUT_MS / 1000)
          : null;
        if (!drained?.value) await this.nc.close().catch(() => {});
      }
    }
    await this.#statusLoop;
    this.#listeners.clear();
  }

  /**
   * A NATS request that rides out a restarting server (PROTOCOL.md 6): retried on a timeout,
   * a dropped connection and "no responders" (unless the experiment is gone), for
   * `recoveryMs` in all; the same body and headers every time, so a retried registration
   * keeps its message id. A permissions violation is final at once.
   * @param {string} subject
   * @param {string | Uint8Array} body
   * @param {string} what for the error message
   * @param {import("@nats-io/transport-node").MsgHdrs} [hdrs]
   * @param {Scope} [scope] who asks (default: a public call, which close() ends)
   */
  async #request(subject, body, what, hdrs, scope = this.#calls) {
    scope.check(what);
    // One reply subject for every attempt of this call: an answer to an earlier attempt (a
    // busy coordinator answering after one attempt's timeout) still ends the call.
    const inbox = `${names.inboxPrefix(this.config.experiment)}.${randomBytes(12).toString("hex")}`;
    const sub = this.nc.subscribe(inbox);
    const replies = sub[Symbol.asyncIterator]();
    const next = () => {
      const p = replies.next();
      p.catch(() => {}); // seen by the attempt that awaits it
      return p;
    };
    let answer = next();
    try {
      return await this.#attempts(subject, body, what, hdrs, inbox, () => answer, () => {
        answer = next();
      }, scope);
    } finally {
      unsubscribe(sub);
    }
  }

  /**
   * The retry loop of `#request` (PROTOCOL.md 6).
   * @param {string} subject
   * @param {string | Uint8Array} body
   * @param {string} what
   * @param {import("@nats-io/transport-node").MsgHdrs | undefined} hdrs
   * @param {string} inbox
   * @param {() => Promise<IteratorResult<import("@nats-io/transport-node").Msg>>} answer
   * @param {() => void} renew
   * @param {Scope} scope
   */
  async #attempts(subject, body, what, hdrs, inbox, answer, renew, scope) {
    const first = Date.now();
    let deadline = first + this.recoveryMs;
    let wait = 50;
    /** @type {unknown} */
    let last;
    for (;;) {
      scope.check(what);
      try {
        this.nc.publish(subject, body, { reply: inbox, headers: hdrs });
        const reply = scope.abort ? Promise.race([answer(), scope.ended]) : answer();
        const got = await within(reply, this.requestTimeoutMs / 1000);
        if (got === null) {
          throw Object.assign(new Error("request timed out"), { name: "TimeoutError" });
        }
        if (got.value.done) {
          scope.check(what);
          throw Object.assign(new Error("the reply subscription ended (disconnected)"), {
            name: "DisconnectError",
          });
        }
        const msg = got.value.value;
        if (msg.headers?.code === 503) {
          renew();
          throw Object.assign(new Error("no responders"), { name: "NoRespondersError" });
        }
        return msg;
      } catch (err) {
        last = err;
        scope.check(what);
        const denied = permissionViolation(err) ??
          (isTimeout(err) ? this.#denied.get(subject) : undefined);
        if (denied) throw this.#refused(denied, err);
        if (!isNoResponders(err) && !isTimeout(err) && !isDisconnection(err)) {
          throw new NatsUnavailable(`cannot ${what}: ${describe(err)}`, { cause: err });
        }
        if (!isDisconnection(err)) {
          const there = await this.#experimentThere(what, scope);
          if (there === false) {
            throw new TricksError(
              `experiment ${JSON.stringify(this.config.experiment)} is not running on this ` +
                "NATS (no counts bucket)",
              { cause: err },
            );
          }
          if (there) {
            // NATS answers: only the coordinator is slow (pods starting): keep waiting for it.
            deadline = Math.min(
              first + PATIENCE_MS,
              Math.max(deadline, Date.now() + this.recoveryMs),
            );
          }
        }
      }
      if (Date.now() + wait >= deadline) {
        throw new NatsUnavailable(
          `cannot ${what}: NATS did not answer for ${this.recoveryMs / 1000}s ` +
            `(${describe(last)})`,
          { cause: last },
        );
      }
      // a backoff between attempts, not a wait for an event; cut short by close()
      await this.#until(pause(wait), undefined, what, scope);
      wait = Math.min(wait * 2, 1000);
    }
  }

  /**
   * Whether JetStream has the experiment's counts: true, false (it answered 404), or
   * undefined when it does not answer (a restart in progress).
   * @param {string} what
   * @param {Scope} scope
   * @returns {Promise<boolean | undefined>}
   */
  async #experimentThere(what, scope) {
    const subject = `$JS.API.STREAM.INFO.${names.countsStream(this.config.experiment)}`;
    try {
      const asked = this.nc.request(subject, Empty, { timeout: this.requestTimeoutMs });
      if (scope.abort) asked.catch(() => {}); // the race below may leave it behind
      const reply = await (scope.abort ? Promise.race([asked, scope.ended]) : asked);
      /** @type {{error?: {code?: number}}} */
      const info = reply.json();
      if (!info.error) return true;
      return info.error.code === 404 ? false : undefined;
    } catch (err) {
      const denied = permissionViolation(err);
      if (denied) throw this.#refused(denied, err);
      scope.check(what);
      return undefined; // JetStream itself is not answering yet: a restart in progress
    }
  }

  /**
   * Add one to event `name`, exactly once even when the request is retried.
   * @param {string} name
   * @returns {Promise<number>} the count right after this registration (concurrent
   *   registrations get distinct counts)
   * @throws {TricksError} a bad name, or the coordinator refused it (`<tag>_start`/`_stop`)
   * @throws {NatsUnavailable} NATS or the coordinator silent for `recoveryMs` (20 s)
   * @throws {PermissionDenied} these credentials do not reach the experiment (at once)
   */
  async registerEvent(name) {
    checkName(name, "event name");
    const nonce = randomBytes(8).toString("hex");
    return this.increment(name, names.msgId(this.config.experiment, this.pod, name, nonce));
  }

  /**
   * The registration of PROTOCOL.md 6.1 with a given message id: calls with the same id
   * count once (registerEvent makes a fresh one per call).
   * @param {string} name
   * @param {string} msgId the whole Nats-Msg-Id (`names.msgId(exp, pod, event, nonce)`)
   * @returns {Promise<number>} the count right after the (first) registration with this id
   * @throws {TricksError} a bad name or message id, or a refused registration; and as
   *   registerEvent
   */
  async increment(name, msgId) {
    checkName(name, "event name");
    const what = `register event ${JSON.stringify(name)}`;
    if (typeof msgId !== "string" || !/^[\x21-\x7e]+$/.test(msgId)) {
      throw new TricksError(`${what}: bad message id ${JSON.stringify(msgId)}`);
    }
    return this.#call(what, async () => {
      const h = headers();
      h.set("Nats-Msg-Id", msgId);
      h.set("Tricks-Pod", this.pod);
      const subject = names.eventSubject(this.config.experiment, name);
      const reply = await this.#request(subject, Empty, what, h);
      /** @type {{val?: unknown, error?: {description?: string}} | null} */
      let answer = null;
      try {
        answer = reply.json();
      } catch {
        // not JSON: reported below
      }
      if (answer && typeof answer === "object" && answer.error) {
        throw new TricksError(`${what} refused: ${answer.error.description ?? "?"}`);
      }
      const value = answer && typeof answer === "object" && typeof answer.val === "string"
        ? Number.parseInt(answer.val, 10)
        : Number.NaN;
      if (Number.isNaN(value)) {
        throw new TricksError(
          `${what}: the coordinator's reply is not {"val"} nor {"error"}: ` +
            JSON.stringify(reply.string().slice(0, 100)),
        );
      }
      return value;
    });
  }

  /**
   * Add one message to `topic` (PROTOCOL.md 6.7): kept for the whole run, stored exactly once
   * however often the request is retried; every subscriber gets it, also those that
   * subscribe later.
   * @param {string} topic a name like an event name
   * @param {unknown} data a Uint8Array/Buffer (raw bytes), a string (UTF-8 text), or any other
   *   JSON-able value (sent as JSON, marked `Tricks-Type: json`); at most 1,000,000 bytes
   * @returns {Promise<number>} the message's seq: its place in the run (increasing within a
   *   topic, not consecutive)
   * @throws {TricksError} a bad topic name, data too large or not JSON-able (at once), the
   *   stream refused it (full); and NatsUnavailable, PermissionDenied
   */
  async publish(topic, data) {
    checkName(topic, "topic");
    const nonce = randomBytes(8).toString("hex");
    const msgId = names.topicMsgId(this.config.experiment, this.pod, topic, nonce);
    return this.publishWithId(topic, data, msgId);
  }

  /**
   * The publish of PROTOCOL.md 6.7 with a given message id: calls with the same id store the
   * message once (publish makes a fresh id per call), e.g. to retry a publish that failed.
   * @param {string} topic
   * @param {unknown} data as for publish
   * @param {string} msgId the whole Nats-Msg-Id (`names.topicMsgId(exp, pod, topic, nonce)`)
   * @returns {Promise<number>} the seq of the (first) message stored with this id
   * @throws {TricksError} a bad topic, data or message id; and as publish
   */
  async publishWithId(topic, data, msgId) {
    checkName(topic, "topic");
    const what = `publish on topic ${JSON.stringify(topic)}`;
    if (typeof msgId !== "string" || !/^[\x21-\x7e]+$/.test(msgId)) {
      throw new TricksError(`${what}: bad message id ${JSON.stringify(msgId)}`);
    }
    const { body, isJson } = encodeTopicData(data);
    return this.#call(what, async () => {
      const h = headers();
      h.set("Nats-Msg-Id", msgId);
      h.set("Tricks-Pod", this.pod);
      if (isJson) h.set("Tricks-Type", "json");
      const subject = names.topicSubject(this.config.experiment, topic);
      const deadline = Date.now() + this.recoveryMs;
      let wait = 20;
      for (;;) {
        const reply = await this.#request(subject, body, what, h);
        /** @typedef {{code?: unknown, err_code?: unknown, description?: unknown}} ApiError */
        /** @type {{seq?: unknown, error?: ApiError} | null} */
        let ack = null;
        try {
          ack = reply.json();
        } catch {
          // not JSON: reported below
        }
        const error = ack && typeof ack === "object" ? ack.error : undefined;
        if (error && typeof error === "object") {
          const why = error.description || `error ${error.code}`;
          if (error.err_code !== JS_ID_IN_PROCESS) throw new TricksError(`${what} refused: ${why}`);
          // An earlier attempt with this id is still being applied (a stream whose leader just
          // changed): asking again soon gets its outcome, as a duplicate.
          if (Date.now() + wait >= deadline) throw new NatsUnavailable(`cannot ${what}: ${why}`);
          await this.#until(pause(wait), undefined, what); // a backoff, not a wait for an event
          wait = Math.min(wait * 2, 1000);
          continue;
        }
        const seq = ack && typeof ack === "object" ? ack.seq : undefined;
        if (typeof seq === "number" && Number.isSafeInteger(seq) && seq > 0) return seq;
        throw new TricksError(
          `${what}: the reply is not a JetStream acknowledgement: ` +
            JSON.stringify(reply.string().slice(0, 100)),
        );
      }
    });
  }

  /**
   * Every message of `topic` from the start of the run, in order, each exactly once, across
   * reconnects and server restarts (PROTOCOL.md 6.8). Subscribes at once;
   * `for await (const msg of sub)`, `sub.next({timeout})`, `sub.take(count, {timeout})`,
   * `sub.close()`. A message: `{topic, seq, pod, data, isJson, text(), json()}`.
   * @param {string} topic
   * @returns {Subscription}
   * @throws {TricksError} a bad topic name, or the driver is closed (at once)
   */
  subscribe(topic) {
    checkName(topic, "topic");
    const what = `subscribe to topic ${JSON.stringify(topic)}`;
    this.#checkOpen(what);
    return new Subscription(topic, {
      experiment: this.config.experiment,
      nc: this.nc,
      request: (subject, body, asked) =>
        this.#call(asked, () => this.#request(subject, body, asked)),
      onEnd: (hook) => {
        this.#endHooks.add(hook);
        return () => {
          this.#endHooks.delete(hook);
        };
      },
      checkOpen: (asked) => this.#checkOpen(asked),
      closing: () => this.#closing,
      listen: (listener) => this.#listen(listener),
      failure: (err) => {
        const denied = permissionViolation(err);
        if (denied) return this.#refused(denied, err);
        return new NatsUnavailable(`cannot ${what}: ${describe(err)}`, { cause: err });
      },
    });
  }

  /**
   * The current count of event `name` (0 when never registered), without waiting.
   * @param {string} name
   * @returns {Promise<number>}
   * @throws {TricksError} a bad name; and NatsUnavailable, PermissionDenied
   */
  async count(name) {
    checkName(name, "event name");
    return this.#call(`read event ${JSON.stringify(name)}`, () => this.#count(name));
  }

  /** @param {string} name */
  async #count(name) {
    const exp = this.config.experiment;
    const subject = `$JS.API.DIRECT.GET.${names.countsStream(exp)}.${names.countSubject(exp, name)}`;
    const reply = await this.#request(subject, Empty, `read event ${JSON.stringify(name)}`);
    if (reply.headers?.code === 404) return 0; // never registered
    const value = parseCount(reply.data);
    if (value === null) {
      console.warn(`tricks-nats: ignoring a malformed count of ${JSON.stringify(name)}`);
      return 0;
    }
    return value;
  }

  /**
   * Block until event `name` has been registered at least `value` times.
   * Subscribes to the coordinator's one notification first, then reads the count; a
   * notification is only a hint to read the count again (anyone who may publish there could
   * have sent it), and so is every reconnect (a notification sent while we were away is
   * lost). The subscription is made before this method first yields.
   * @param {string} name
   * @param {number} value
   * @param {{timeout?: number}} [options] timeout in seconds (default: forever)
   * @returns {Promise<number>} the count reached (>= value)
   * @throws {WaitTimeout} `timeout` ran out (the message says the count)
   * @throws {TricksError} a bad name, a non-integer `value`, a bad timeout, or the driver
   *   closed meanwhile; and NatsUnavailable, PermissionDenied
   */
  async waitEvent(name, value, options = {}) {
    checkName(name, "event name");
    if (!Number.isInteger(value)) {
      throw new TricksError(`value must be an integer, got ${value}`);
    }
    const timeout = checkTimeout(options?.timeout);
    return this.#call(`wait for ${JSON.stringify(name)}`, () => this.#wait(name, value, timeout));
  }

  /**
   * `registerEvent(name)` then `waitEvent(name, value)` in one request and one notification
   * (PROTOCOL.md 6.3, "a barrier in one request"): subscribe to the notification, then
   * register on the same connection; the registration's reply is the first count.
   * @param {string} name
   * @param {number} value
   * @param {{timeout?: number}} [options] `timeout`: seconds for the whole call (when it runs
   *   out during the registration, that registration may have been counted)
   * @returns {Promise<number>} the count reached, >= value
   * @throws {WaitTimeout} the timeout ran out; and as registerEvent and waitEvent
   */
  async barrier(name, value, options = {}) {
    checkName(name, "event name");
    if (!Number.isInteger(value)) {
      throw new TricksError(`value must be an integer, got ${value}`);
    }
    const timeout = checkTimeout(options?.timeout);
    const nonce = randomBytes(8).toString("hex");
    const msgId = names.msgId(this.config.experiment, this.pod, name, nonce);
    return this.#call(`barrier on ${JSON.stringify(name)}`, () =>
      this.#wait(name, value, timeout, () => this.increment(name, msgId)),
    );
  }

  /**
   * PROTOCOL.md 6.3.
   * @param {string} name
   * @param {number} value
   * @param {number | undefined} timeout seconds
   * @param {() => Promise<number>} [register] a barrier's registration: sent after the
   *   subscription, on the same connection, its reply is the first read of the count
   * @param {(import("@nats-io/transport-node").Msg | undefined)[]} [notices] gets the
   *   notification that ended the wait (a discover takes a roster from it)
   * @returns {Promise<number>}
   */
  async #wait(name, value, timeout, register, notices) {
    const what = `wait for ${JSON.stringify(name)}`;
    this.#checkOpen(what);
    const deadline = timeout === undefined ? undefined : Date.now() + timeout * 1000;
    const subject = names.reachedSubject(this.config.experiment, name, value);
    const wakeups = new Wakeups();
    /** @type {import("@nats-io/transport-node").Subscription | null} */
    let sub = null;
    const subscribe = () => {
      unsubscribe(sub);
      // one message, then the client drops the interest: the server does too (UNSUB 1)
      sub = this.nc.subscribe(subject, {
        max: 1,
        callback: (err, msg) =>
          wakeups.push(err ? { error: err } : { told: reachedValue(msg, name), msg }),
      });
    };
    const unlisten = this.onReconnect(() => wakeups.push("reconnect"));
    let registered = register === undefined;
    /**
     * Read the count (a barrier's first read registers: its reply is the count); null when
     * the connection dropped meanwhile (a reconnect follows).
     * @param {() => Promise<unknown>} [first] what to do before (the flush)
     * @returns {Promise<number | null | "expired">} "expired": the deadline passed
     */
    const read = async (first) => {
      const seen = this.#disconnects;
      try {
        const got = await this.#until(
          (async () => {
            if (!registered && register) {
              const total = await register();
              registered = true;
              return total;
            }
            await first?.();
            return this.#count(name);
          })(),
          deadline,
          what,
        );
        return got === null ? "expired" : got.value;
      } catch (err) {
        if (this.#lostConnection(err, seen)) return null;
        throw err;
      }
    };
    try {
      subscribe();
      // a barrier registers without a flush: the server handles the SUB first anyway
      let current = await read(register ? undefined : () => this.nc.flush());
      for (;;) {
        if (current === "expired") break;
        if (current !== null && current >= value) return current;
        const got = await this.#until(wakeups.next(), deadline, what);
        if (got === null) break;
        const wakeup = got.value;
        if (typeof wakeup === "object" && "error" in wakeup) {
          const denied = permissionViolation(wakeup.error);
          if (denied) throw this.#refused(denied, wakeup.error);
          throw new NatsUnavailable(`cannot ${what}: ${describe(wakeup.error)}`, {
            cause: wakeup.error,
          });
        }
        if (wakeup === "reconnect") {
          // the client restored the subscription before telling us: read again
          current = await read(() => this.nc.flush());
          continue;
        }
        // A notification: only the coordinator may publish it (PROTOCOL.md 9), so the
        // count its body states ends the wait (whoever could forge it could forge the
        // count itself). A body that states none for this event: read the count; if it is
        // short, subscribe again (the one-shot subscription is spent), read once more.
        if (wakeup.told !== null && wakeup.told >= value) {
          notices?.push(wakeup.msg);
          return wakeup.told;
        }
        current = await read();
        if (current === "expired" || (current !== null && current >= value)) continue;
        subscribe();
        current = await read(() => this.nc.flush());
      }
      this.#checkOpen(what);
      const now = await this.#count(name);
      if (now >= value) return now;
      throw new WaitTimeout(
        `timed out after ${timeout}s waiting for ${JSON.stringify(name)} to reach ${value} ` +
          `(it is ${now})`,
      );
    } finally {
      unlisten();
      unsubscribe(sub);
    }
  }

  /**
   * The running pods of `tag`; with `count`, first wait until at least that many run.
   * Reads the tag's roster (PROTOCOL.md 6.4); with a count it waits on `<tag>_start`
   * between two reads. One deadline for the whole call.
   * @param {string} tag
   * @param {number | null} [count]
   * @param {{timeout?: number}} [options] timeout in seconds (default: forever)
   * @returns {Promise<Peer[]>} sorted by pod id: `{tag, pod_id, ip, name}`
   * @throws {UnknownTag} a tag not in the experiment's tags (TRICKS_TAGS), at once
   * @throws {WaitTimeout} `timeout` ran out before `count` pods ran
   * @throws {TricksError} a bad tag, a `count` that is not an integer >= 0, a bad timeout,
   *   or the driver closed meanwhile; and NatsUnavailable, PermissionDenied
   */
  async discover(tag, count = null, options = {}) {
    checkName(tag, "tag");
    const tags = this.config.tags;
    if (tags && !tags.includes(tag)) {
      const shown = tags.slice(0, 20).join(", ") + (tags.length > 20 ? ", ..." : "");
      throw new UnknownTag(
        `no tag ${JSON.stringify(tag).replaceAll('"', "'")} in experiment ` +
          `${this.config.experiment} (its tags: ${shown})`,
      );
    }
    if (count !== null && count !== undefined && !(Number.isInteger(count) && count >= 0)) {
      throw new TricksError(`count must be an integer >= 0, got ${count}`);
    }
    const timeout = checkTimeout(options?.timeout);
    const what = `discover ${JSON.stringify(tag)}`;
    return this.#call(what, async () => {
      if (count === null || count === undefined) return this.#roster(tag);
      const deadline = timeout === undefined ? undefined : Date.now() + timeout * 1000;
      const started = `${tag}_start`;
      for (;;) {
        const starts = await this.#count(started); // FIRST the count,
        const pods = await this.#roster(tag); // THEN the roster (it has every start counted)
        if (pods.length >= count) return pods;
        /** @type {(import("@nats-io/transport-node").Msg | undefined)[]} */
        const notices = [];
        try {
          const target = starts + (count - pods.length);
          await this.#wait(started, target, remaining(deadline), undefined, notices);
        } catch (err) {
          if (!(err instanceof WaitTimeout)) throw err;
          const now = await this.#roster(tag);
          if (now.length >= count) return now;
          throw new WaitTimeout(
            `timed out after ${timeout}s discovering ${count} pods of ${JSON.stringify(tag)} ` +
              `(${now.length} running)`,
          );
        }
        // once all the tag's pods run, the notification carries the roster: no read
        const carried = notices.length ? carriedRoster(tag, notices[notices.length - 1]) : null;
        if (carried && carried.length >= count) return carried;
      }
    });
  }

  /**
   * The roster of `tag`: its running pods (PROTOCOL.md 6.4, read_roster).
   * @param {string} tag
   * @returns {Promise<Peer[]>}
   */
  async #roster(tag) {
    const exp = this.config.experiment;
    const subject = `$JS.API.DIRECT.GET.${names.podsStream(exp)}.${names.rosterSubject(exp, tag)}`;
    const reply = await this.#request(subject, Empty, `read the pods of ${JSON.stringify(tag)}`);
    if (reply.headers?.code === 404) return []; // no roster yet: no pods
    const op = reply.headers?.get("KV-Operation");
    if (op === "DEL" || op === "PURGE" || reply.data.length === 0) return [];
    const peers = parseRoster(tag, reply.data);
    if (peers === null) {
      console.warn(`tricks-nats: ignoring a malformed roster of ${JSON.stringify(tag)}`);
      return [];
    }
    return peers;
  }

  /**
   * Record a sample: `value` of metric `name` now, with optional labels (PROTOCOL.md 6.6).
   * Never blocks nor waits for the network: the sample joins a buffer that a background
   * sender publishes in batches (4096 samples, or 200 ms after the first, whichever comes
   * first). While `bufferSamples` wait already, the sample is dropped and counted (`dropped`).
   * Bad input fails at once with a TricksError. On a closed driver the sample is dropped
   * (and counted). At the first sample, where the program has no SIGTERM listener, installs
   * one that sends the buffered samples, then exits with 143 (README: "At exit").
   * @param {string} name a metric name (like an event name)
   * @param {number} value a finite number
   * @param {Record<string, string | number> | null} [labels] at most 8; keys like identifiers
   *   (not ts, tag, pod_id, name, value), values strings of at most 200 characters (or numbers)
   * @returns {void}
   * @throws {TricksError} a bad name, value or label (at once; never for a full buffer)
   */
  record(name, value, labels) {
    if (typeof name !== "string" || !NAME_RE.test(name)) checkName(name, "metric name");
    if (typeof value !== "number" || !Number.isFinite(value)) {
      throw new TricksError(
        `cannot record ${name}: the value must be a finite number, got ${describeValue(value)}`,
      );
    }
    const checked = labels === undefined || labels === null ? null : checkLabels(labels);
    const ts = (performance.timeOrigin + performance.now()) / 1000;
    const waiting = this.#buffer.length - this.#head;
    if (waiting >= this.bufferSamples || this.#senderStopped) {
      this.#dropped++;
      return;
    }
    this.#buffer.push(checked === null ? [ts, name, value] : [ts, name, value, checked]);
    if (this.#timer === null) this.#arm();
    if (waiting + 1 >= BATCH_SAMPLES && this.#sender === null) this.#pump();
  }

  /**
   * Declare that metric `name` is meant to be recorded every `ms` milliseconds (a
   * closed-loop client's target rate): the coordinator then corrects its summary for
   * coordinated omission. Sent with the batches.
   * @param {string} name
   * @param {number} ms milliseconds, > 0
   * @returns {void}
   * @throws {TricksError} a bad name, or an `ms` that is not a finite number > 0
   */
  expectInterval(name, ms) {
    checkName(name, "metric name");
    if (typeof ms !== "number" || !Number.isFinite(ms) || !(ms > 0)) {
      throw new TricksError(
        `interval of ${name} must be a number of ms > 0, got ${describeValue(ms)}`,
      );
    }
    if (this.#intervals.get(name) === ms || this.#senderStopped) return;
    this.#intervals.set(name, ms);
    this.#intervalsJson = `,"intervals":${JSON.stringify(Object.fromEntries(this.#intervals))}`;
    this.#intervalsVersion++;
    if (this.#timer === null) this.#arm();
  }

  /**
   * Samples dropped so far (a full buffer, a batch refused or not taken); cumulative.
   * @returns {number}
   */
  get dropped() {
    return this.#dropped;
  }

  /**
   * Send everything recorded so far; resolves once the stream has stored it. A sample that
   * could not be stored (a refused batch, NATS away for 20 s, a closed driver) is counted in
   * `dropped` instead: flush never fails.
   * @returns {Promise<void>}
   */
  async flush() {
    return this.#flush();
  }

  /** @returns {Promise<void>} resolves when what was recorded so far is stored (or lost) */
  #flush() {
    const target = this.#taken + (this.#buffer.length - this.#head);
    /** @type {Promise<void>} */
    const done = new Promise((resolve) => {
      this.#flushes.push({ target, batch: 0, resolve });
    });
    this.#wantUntil = Math.max(this.#wantUntil, target);
    this.#settle();
    this.#pump();
    return done;
  }

  /** The timer of the next batch. */
  #arm() {
    if (!this.#watched) {
      this.#watched = true; // there is something to send: offer it to the SIGTERM handler
      if (!this.#closing && !this.#gone) sigterm.add(this);
    }
    this.#timer = setTimeout(() => {
      this.#timer = null;
      this.#wantUntil = Math.max(this.#wantUntil, this.#taken + this.#buffer.length - this.#head);
      this.#pump();
    }, BATCH_INTERVAL_MS);
    this.#timer.unref(); // it never keeps the process alive
  }

  /** Is a batch to be sent now? */
  #due() {
    if (this.#senderStopped) return false;
    const waiting = this.#buffer.length - this.#head;
    return waiting >= BATCH_SAMPLES || (waiting > 0 && this.#taken < this.#wantUntil) ||
      this.#formed < this.#needFormed;
  }

  /** Start the sender, unless it runs or there is nothing to send. One batch in flight. */
  #pump() {
    if (this.#sender !== null || !this.#due()) return;
    this.#sender = (async () => {
      try {
        await null; // not inside record(): the sender runs once the caller yields
        while (this.#due()) await this.#sendBatch();
      } catch (err) {
        // #sendBatch handles every failure of NATS: this is a bug, not to end the program
        console.warn(`tricks-nats: the metrics sender stopped: ${describe(err)}`);
      } finally {
        this.#sender = null;
      }
    })();
  }

  /**
   * Take the next batch from the buffer: as many samples as fit in BATCH_BYTES, in order.
   * @returns {{body: string, count: number, dropped: number}}
   */
  #takeBatch() {
    const dropped = this.#dropped;
    const tail = `],"dropped":${dropped}${this.#intervalsJson}}`;
    let size = '{"samples":['.length + tail.length;
    /** @type {string[]} */
    const parts = [];
    const buffer = this.#buffer;
    let i = this.#head;
    for (; i < buffer.length; i++) {
      const s = buffer[i];
      // names are ASCII (NAME_RE), numbers print as JSON does: only labels need encoding
      const text = s.length === 3
        ? `[${s[0]},"${s[1]}",${s[2]}]`
        : `[${s[0]},"${s[1]}",${s[2]},${JSON.stringify(s[3])}]`;
      const bytes = s.length === 3 ? text.length : Buffer.byteLength(text);
      if (parts.length > 0 && size + bytes + 1 >= BATCH_BYTES) break;
      size += bytes + (parts.length > 0 ? 1 : 0);
      parts.push(text);
    }
    const count = i - this.#head;
    this.#head = i;
    if (this.#head === buffer.length) {
      this.#buffer = [];
      this.#head = 0;
    } else if (this.#head >= BATCH_SAMPLES && this.#head * 2 >= buffer.length) {
      this.#buffer = buffer.slice(this.#head);
      this.#head = 0;
    }
    this.#taken += count;
    this.#formed++;
    return { body: `{"samples":[${parts.join(",")}${tail}`, count, dropped };
  }

  /**
   * Send one batch (PROTOCOL.md 6.6): a request like every other, retried the same way with
   * the same message id; the stream's error reply, or NATS away for the whole budget, loses
   * the batch's samples (counted in `dropped`).
   */
  async #sendBatch() {
    const what = "send samples";
    const version = this.#intervalsVersion;
    const { body, count, dropped } = this.#takeBatch();
    const h = headers();
    const nonce = randomBytes(8).toString("hex");
    h.set("Nats-Msg-Id", names.metricsMsgId(this.config.experiment, this.pod, nonce));
    let why = "";
    try {
      const reply = await this.#request(this.#metricsSubject, body, what, h, this.#sending);
      /** @type {{seq?: unknown, error?: {description?: unknown}} | null} */
      let ack = null;
      try {
        ack = reply.json();
      } catch {
        // not JSON: reported below
      }
      if (ack && typeof ack === "object" && !ack.error && typeof ack.seq === "number") {
        this.#reportedDropped = dropped;
        this.#reportedIntervals = version;
      } else {
        why = ack?.error
          ? `the stream refused a batch: ${ack.error.description ?? "?"}`
          : `unexpected reply to a batch: ${JSON.stringify(reply.string().slice(0, 100))}`;
      }
    } catch (err) {
      why = describe(err);
    }
    if (why) this.#lost(count, why);
    this.#settled += count;
    this.#finished++;
    this.#settle();
  }

  /**
   * `count` samples will never reach the stream: count them; say so once.
   * @param {number} count
   * @param {string} why
   */
  #lost(count, why) {
    this.#dropped += count;
    if (count > 0 && !this.#warnedLoss) {
      this.#warnedLoss = true;
      console.warn(
        `tricks-nats: ${count} samples lost (${why}); counted as dropped, ` +
          "further losses are only counted",
      );
    }
  }

  /** Resolve the flushes that are done. */
  #settle() {
    const pending = this.#flushes;
    this.#flushes = [];
    for (const flush of pending) {
      if (!this.#senderStopped) {
        if (this.#settled < flush.target) {
          this.#flushes.push(flush);
          continue;
        }
        if (flush.batch === 0) {
          const unreported = this.#dropped !== this.#reportedDropped ||
            this.#intervalsVersion !== this.#reportedIntervals;
          if (unreported) {
            // the samples are in, not the latest `dropped` or intervals: one more batch
            flush.batch = this.#formed + 1;
            this.#needFormed = Math.max(this.#needFormed, flush.batch);
            this.#flushes.push(flush);
            continue;
          }
        } else if (this.#finished < flush.batch) {
          this.#flushes.push(flush);
          continue;
        }
      }
      flush.resolve();
    }
  }

  /**
   * Send nothing more: what still waits is lost (counted); pending flushes resolve.
   * @param {string} [why]
   */
  #stopSender(why = "the driver is closed") {
    if (this.#senderStopped) return;
    this.#senderStopped = true;
    this.#abortSender();
    if (this.#timer !== null) clearTimeout(this.#timer);
    this.#timer = null;
    const waiting = this.#buffer.length - this.#head;
    this.#buffer = [];
    this.#head = 0;
    this.#taken += waiting;
    this.#settled += waiting;
    this.#lost(waiting, why);
    this.#settle();
  }
}

/**
 * The count a notification says `event` reached (`{"event", "value"}`), or null when its body
 * is not one for this event.
 * @param {import("@nats-io/transport-node").Msg | undefined} msg
 * @param {string} event
 * @returns {number | null}
 */
export function reachedValue(msg, event) {
  try {
    const body = msg?.json();
    if (body && typeof body === "object" && body.event === event) {
      const value = body.value;
      if (Number.isSafeInteger(value) && value >= 0) return value;
    }
  } catch {
    // not JSON: states nothing
  }
  return null;
}

/**
 * A counter body `{"val":"<n>"}`, or null for anything else.
 * @param {Uint8Array} data
 * @returns {number | null}
 */
export function parseCount(data) {
  try {
    const body = JSON.parse(new TextDecoder().decode(data));
    if (typeof body?.val !== "string" || !/^-?\d+$/.test(body.val)) return null;
    return Number.parseInt(body.val, 10);
  } catch {
    return null;
  }
}

/**
 * A roster body `{"tag": ..., "pods": [{"pod_id": <n>, "ip": "..."}, ...]}` as peers of `tag`
 * sorted by pod id, or null for anything else. Unknown fields are ignored.
 * @param {string} tag
 * @param {Uint8Array} data
 * @returns {Peer[] | null}
 */
export function parseRoster(tag, data) {
  /** @type {unknown} */
  let body;
  try {
    body = JSON.parse(new TextDecoder().decode(data));
  } catch {
    return null;
  }
  return rosterPeers(tag, body);
}

/**
 * The roster a `<tag>_start` notification carries once all the tag's pods run (PROTOCOL.md
 * 6.4), or null when it carries none.
 * @param {string} tag
 * @param {import("@nats-io/transport-node").Msg | undefined} msg
 * @returns {Peer[] | null}
 */
export function carriedRoster(tag, msg) {
  try {
    const body = msg?.json();
    if (!body || typeof body !== "object" || body.event !== `${tag}_start`) return null;
    if (!body.roster || body.roster.tag !== tag) return null;
    return rosterPeers(tag, body.roster);
  } catch {
    return null;
  }
}

/**
 * A roster's pods as Peers sorted by pod id, or null when it is not a roster.
 * @param {string} tag
 * @param {unknown} body
 * @returns {Peer[] | null}
 */
function rosterPeers(tag, body) {
  const pods = /** @type {{pods?: unknown} | null} */ (body)?.pods;
  if (typeof body !== "object" || body === null || !Array.isArray(pods)) return null;
  /** @type {Peer[]} */
  const peers = [];
  for (const pod of pods) {
    const { pod_id: podId, ip = "" } = pod ?? {};
    if (!Number.isInteger(podId) || typeof ip !== "string") return null;
    peers.push({ tag, pod_id: podId, ip, name: `${tag}-${podId}` });
  }
  return peers.sort((a, b) => a.pod_id - b.pod_id);
}
