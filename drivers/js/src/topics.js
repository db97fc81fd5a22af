// Topics: data exchange between pods (PROTOCOL.md 6.7 publish, 6.8 subscribe).
//
// A topic keeps every message published on it for the whole run, in the run's topics stream
// `tricks-<exp>-topics`. A publish is a request on `tricks.<exp>.topic.<topic>` (the reply is
// the stream's acknowledgement) under a message id kept across its retries: stored once. The
// stream republishes each message it stores on `tricks.<exp>.stored.<topic>` (only the server
// may publish there) with `Nats-Sequence` and `Nats-Last-Sequence` (the previous message of the
// same topic), so a subscriber delivers a republished message at once when it follows the last
// one it delivered, and otherwise reads what it missed from the stream's leader
// (`$JS.API.STREAM.MSG.GET`, `next_by_subj`): in order, each once, from the start of the run,
// and again after a reconnect. No consumer (pods may create none: PROTOCOL.md 9).
//
// The Driver (index.js) owns the requests; this module holds the encoding of a message, the
// messages and the Subscription, which gets what it needs from the driver as a SubscriptionContext.

import { TricksError, WaitTimeout } from "./index.js";

/** JetStream's err_code for a message get that found nothing (code 404, "no message found"). */
const NO_MESSAGE = 10037;

/** A topic message's data holds at most this many bytes (`MAX_TOPIC_BYTES`). */
export const MAX_TOPIC_BYTES = 1_000_000;
/** Republished messages a subscription buffers at most (bytes) before it reads instead. */
export const BUFFER_BYTES = 64 << 20;
/** JetStream: "duplicate message id is in process" (a stream whose leader just changed). */
export const JS_ID_IN_PROCESS = 10158;

const POD_HEADER = "Tricks-Pod";
const TYPE_HEADER = "Tricks-Type";
const JSON_TYPE = "json";

/**
 * A publish's body and whether it is JSON: bytes as they are (a Uint8Array, Buffer, any other
 * ArrayBuffer view or an ArrayBuffer), a string as UTF-8, any other value as JSON.
 * @param {unknown} data
 * @returns {{body: Uint8Array, isJson: boolean}}
 * @throws {TricksError} a value JSON cannot hold, or more than MAX_TOPIC_BYTES bytes
 */
export function encodeTopicData(data) {
  /** @type {Uint8Array} */
  let body;
  let isJson = false;
  if (ArrayBuffer.isView(data)) {
    // a copy (once its size is checked): every retry sends the same bytes, whatever the
    // caller does with its buffer meanwhile
    body = checkSize(new Uint8Array(data.buffer, data.byteOffset, data.byteLength)).slice();
  } else if (data instanceof ArrayBuffer) {
    body = checkSize(new Uint8Array(data)).slice();
  } else if (typeof data === "string") {
    body = new TextEncoder().encode(data);
  } else {
    /** @type {string | undefined} */
    let text;
    try {
      text = JSON.stringify(data);
    } catch (err) {
      throw new TricksError(
        `cannot publish ${describeType(data)}: ${err instanceof Error ? err.message : err}`,
      );
    }
    if (typeof text !== "string") {
      throw new TricksError(`cannot publish ${describeType(data)}: not a JSON value`);
    }
    body = new TextEncoder().encode(text);
    isJson = true;
  }
  return { body: checkSize(body), isJson };
}

/**
 * @param {Uint8Array} body
 * @returns {Uint8Array} `body`, when it holds at most MAX_TOPIC_BYTES bytes
 */
function checkSize(body) {
  if (body.length > MAX_TOPIC_BYTES) {
    throw new TricksError(
      `a topic message holds at most ${MAX_TOPIC_BYTES.toLocaleString("en-US")} bytes, ` +
        `got ${body.length.toLocaleString("en-US")}`,
    );
  }
  return body;
}

/** @param {unknown} value */
function describeType(value) {
  if (value === null) return "null";
  if (typeof value === "object") return value.constructor?.name ?? "an object";
  return typeof value;
}

/**
 * `NATS/1.0\r\nKey: Value\r\n...` as a map (the status line skipped; the first value of a key).
 * @param {Uint8Array} block
 * @returns {Map<string, string>}
 */
export function parseHeaderBlock(block) {
  /** @type {Map<string, string>} */
  const headers = new Map();
  const lines = new TextDecoder().decode(block).split("\r\n");
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(":");
    if (colon <= 0) continue;
    const key = line.slice(0, colon).trim();
    if (!headers.has(key)) headers.set(key, line.slice(colon + 1).trim());
  }
  return headers;
}

/** One message of a topic, as a subscription delivers it. */
export class TopicMessage {
  /**
   * @param {string} topic
   * @param {number} seq its place in the run's topics stream (increasing within a topic)
   * @param {string} pod the publisher, as it says (`<tag>-<pod_id>`; not proven)
   * @param {Uint8Array} data
   * @param {boolean} isJson whether the publisher marked the data as JSON
   */
  constructor(topic, seq, pod, data, isJson) {
    /** The topic. */
    this.topic = topic;
    /** Its place in the run's topics stream: increasing within a topic, not consecutive. */
    this.seq = seq;
    /** The publisher, as it says (`<tag>-<pod_id>`; pods share credentials: not proven). */
    this.pod = pod;
    /** The data, as published. */
    this.data = data;
    /** Whether the publisher marked the data as JSON (`Tricks-Type: json`). */
    this.isJson = isJson;
  }

  /** The data as text (UTF-8; bytes that are not become U+FFFD). @returns {string} */
  text() {
    return new TextDecoder().decode(this.data);
  }

  /**
   * The data decoded as JSON.
   * @returns {any}
   * @throws {TricksError} the data is not JSON
   */
  json() {
    try {
      return JSON.parse(this.text());
    } catch (err) {
      throw new TricksError(
        `message ${this.seq} of ${JSON.stringify(this.topic)} is not JSON: ` +
          `${err instanceof Error ? err.message : err}`,
      );
    }
  }
}

/**
 * What a Subscription needs of its driver.
 * @typedef {object} SubscriptionContext
 * @property {string} experiment
 * @property {import("@nats-io/transport-node").NatsConnection} nc
 * @property {(subject: string, body: string, what: string) =>
 *   Promise<import("@nats-io/transport-node").Msg>} request a request with section 6's
 *   retries, failing only with TricksError
 * @property {(hook: () => void) => () => void} onEnd call `hook` once the driver closes or
 *   its connection is gone, until the returned function is called
 * @property {(what: string) => void} checkOpen throws once the driver is closed or gone
 * @property {() => boolean} closing close() was called on the driver
 * @property {(listener: (type: string) => void) => () => void} listen the connection's
 *   status events ("reconnect", "close", ...) until the returned function is called
 * @property {(err: unknown) => TricksError} failure the driver's error for a NATS error
 */

/**
 * A republished message, checked, waiting to be handled.
 * @typedef {object} Republished
 * @property {number} seq
 * @property {number} prev
 * @property {string} pod
 * @property {Uint8Array} data
 * @property {boolean} isJson
 */

/** In the queue: read from the stream (after a reconnect, or an overflow). */
const RESET = Symbol("reset");
/** Rejection of a waiting call: the subscription or its driver closed. */
const CLOSED = new Error("closed");

/**
 * Wait for `promise`, at most until `deadline` (a Date.now() value; undefined: forever).
 * @template T
 * @param {Promise<T>} promise
 * @param {number | undefined} deadline
 * @returns {Promise<{value: T} | null>} null: the deadline passed first
 */
async function until(promise, deadline) {
  if (deadline === undefined) return { value: await promise };
  /** @type {NodeJS.Timeout | undefined} */
  let timer;
  const expired = new Promise((resolve) => {
    timer = setTimeout(() => resolve(null), Math.max(0, deadline - Date.now()));
  });
  try {
    return /** @type {{value: T} | null} */ (
      await Promise.race([promise.then((value) => ({ value })), expired])
    );
  } finally {
    clearTimeout(timer);
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
 * Every message of one topic from the start of the run, in order, each once, across
 * reconnects and server restarts (PROTOCOL.md 6.8). Made by `driver.subscribe(topic)`, which
 * subscribes at once. Calls take turns (one reader at a time, in the order called).
 */
export class Subscription {
  /**
   * @param {string} topic
   * @param {SubscriptionContext} ctx
   */
  constructor(topic, ctx) {
    /** The topic. */
    this.topic = topic;
    /**
     * Bytes of republished messages kept at most while no call takes them; past it they are
     * dropped and read from the stream instead (nothing is lost). Default 64 MiB.
     */
    this.bufferBytes = BUFFER_BYTES;
    this.#ctx = ctx;
    this.#what = `read topic ${JSON.stringify(topic)}`;
    const exp = ctx.experiment;
    this.#readSubject = `$JS.API.STREAM.MSG.GET.tricks-${exp}-topics`;
    this.#topicSubject = `tricks.${exp}.topic.${topic}`;
    // 1. Subscribe first: whatever is stored after this SUB reaches it, whatever was stored
    // before, the reads (sent after it, on the same connection).
    this.#sub = ctx.nc.subscribe(`tricks.${exp}.stored.${topic}`, {
      callback: (err, msg) => (err ? this.#failed(err) : this.#republished(msg)),
    });
    this.#unlisten = ctx.listen((type) => {
      if (type === "reconnect") this.#push(RESET); // republished messages may have been lost
      else if (type === "close") this.#stop();
    });
    this.#unhook = ctx.onEnd(() => this.#stop());
  }

  /** @type {SubscriptionContext} */
  #ctx;
  #what = "";
  #readSubject = "";
  #topicSubject = "";
  /** @type {import("@nats-io/transport-node").Subscription | null} */
  #sub = null;
  /** @type {() => void} */
  #unlisten = () => {};
  /** @type {() => void} */
  #unhook = () => {};
  /** The sequence delivered last (0: none yet). */
  #last = 0;
  /** Read from the stream before taking republished messages. */
  #behind = true;
  /** @type {(Republished | typeof RESET)[]} republished messages (and resets), from #head */
  #queue = [];
  #head = 0;
  /** Bytes of data in the queue. */
  #queued = 0;
  /** Republished messages are being dropped (a RESET is queued). */
  #overflow = false;
  /** @type {(() => void) | null} the producer waiting for the queue */
  #waiting = null;
  #closed = false;
  /** @type {Set<() => void>} each ends one waiting call (this or the driver closed) */
  #stops = new Set();
  /** @type {TricksError | null} the subscription itself failed (a permissions violation) */
  #error = null;
  /** @type {Promise<TopicMessage> | null} the next message, being produced */
  #pending = null;
  /** @type {TopicMessage[]} taken by a call that timed out: the next calls get them first */
  #ready = [];
  /** @type {Promise<unknown>} the calls take turns */
  #turn = Promise.resolve();

  /** @param {Error} err */
  #failed(err) {
    this.#error ??= this.#ctx.failure(err);
    this.#signal();
  }

  /** @param {import("@nats-io/transport-node").Msg} msg */
  #republished(msg) {
    if (this.#closed) return;
    // (a missing header reads as "": not a number, never 0)
    const integer = (/** @type {string} */ name) => {
      const text = msg.headers?.get(name)?.trim() ?? "";
      return /^\d{1,15}$/.test(text) ? Number(text) : Number.NaN;
    };
    const seq = integer("Nats-Sequence");
    const prev = integer("Nats-Last-Sequence");
    if (!(seq > 0 && prev >= 0)) {
      console.warn(
        `tricks-nats: ignoring a republished message without sequences on ${msg.subject}`,
      );
      return;
    }
    const size = msg.data.length;
    if (this.#overflow || this.#queued + size > this.bufferBytes) {
      if (!this.#overflow) {
        this.#overflow = true; // drop from here on; the reads will deliver them
        this.#push(RESET);
      }
      return;
    }
    this.#queued += size;
    this.#push({
      seq,
      prev,
      pod: msg.headers?.get(POD_HEADER) ?? "",
      data: msg.data.slice(), // a copy: the client's buffer is not ours to keep
      isJson: msg.headers?.get(TYPE_HEADER) === JSON_TYPE,
    });
  }

  /** @param {Republished | typeof RESET} item */
  #push(item) {
    this.#queue.push(item);
    this.#signal();
  }

  #signal() {
    const waiting = this.#waiting;
    this.#waiting = null;
    waiting?.();
  }

  /** This subscription or its driver closed: the waiting calls end at once. */
  #stop() {
    for (const stop of [...this.#stops]) stop();
    this.#signal();
  }

  /** @returns {Republished | typeof RESET | undefined} */
  #shift() {
    if (this.#head >= this.#queue.length) return undefined;
    const item = this.#queue[this.#head++];
    if (this.#head === this.#queue.length) {
      this.#queue = [];
      this.#head = 0;
    } else if (this.#head >= 1024 && this.#head * 2 >= this.#queue.length) {
      this.#queue = this.#queue.slice(this.#head);
      this.#head = 0;
    }
    return item;
  }

  /** Throw when this subscription, or its driver, cannot deliver any more. */
  #check() {
    if (this.#closed) {
      throw new TricksError(`the subscription to ${JSON.stringify(this.topic)} is closed`);
    }
    if (this.#error) throw this.#error;
    this.#ctx.checkOpen(this.#what);
  }

  /**
   * PROTOCOL.md 6.8: the next message, from the reads while behind, else from the
   * republished messages. One at a time (the calls take turns; a producer that outlives its
   * caller's timeout is kept for the next call, so nothing delivered is lost).
   * @returns {Promise<TopicMessage>}
   */
  async #produce() {
    for (;;) {
      this.#check();
      if (this.#behind) {
        const found = await this.#readAfter(this.#last);
        this.#check();
        if (found === null) {
          this.#behind = false; // up to date: what is stored later is republished to us
          continue;
        }
        this.#last = found.seq;
        return found;
      }
      const item = this.#shift();
      if (item === undefined) {
        await new Promise((resolve) => {
          this.#waiting = () => resolve(null);
        });
        continue;
      }
      if (item === RESET) {
        this.#overflow = false;
        this.#behind = true;
        continue;
      }
      this.#queued -= item.data.length;
      if (item.seq <= this.#last) continue; // delivered already (by a read)
      if (item.prev !== this.#last) {
        this.#behind = true; // one was missed: the reads deliver it, then this one
        continue;
      }
      this.#last = item.seq;
      return new TopicMessage(this.topic, item.seq, item.pod, item.data, item.isJson);
    }
  }

  /**
   * The topic's first message after `last`, from the stream's leader; null: none yet.
   * @param {number} last
   * @returns {Promise<TopicMessage | null>}
   */
  async #readAfter(last) {
    const what = this.#what;
    const body = JSON.stringify({ seq: last + 1, next_by_subj: this.#topicSubject });
    const reply = await this.#ctx.request(this.#readSubject, body, what);
    /** @type {any} */
    let answer = null;
    try {
      answer = reply.json();
    } catch {
      // not JSON: reported below
    }
    const shown = () => JSON.stringify(reply.string().slice(0, 100));
    if (answer === null || typeof answer !== "object") {
      throw new TricksError(`cannot ${what}: not a stream message: ${shown()}`);
    }
    if (answer.error) {
      // "no message found" after `last`: up to date (a missing stream is another 404)
      if (answer.error.err_code === NO_MESSAGE) return null;
      throw new TricksError(
        `cannot ${what}: ${answer.error.description ?? `error ${answer.error.code}`}`,
      );
    }
    const got = answer.message;
    if (!got || !Number.isSafeInteger(got.seq) || got.seq <= last) {
      throw new TricksError(`cannot ${what}: no message in ${shown()}`);
    }
    // `data` is left out of the reply for an empty body
    const text = typeof got.data === "string" ? got.data : "";
    const data = new Uint8Array(Buffer.from(text, "base64"));
    const headers = typeof got.hdrs === "string" && got.hdrs
      ? parseHeaderBlock(Buffer.from(got.hdrs, "base64"))
      : new Map();
    return new TopicMessage(
      this.topic,
      got.seq,
      headers.get(POD_HEADER) ?? "",
      data,
      headers.get(TYPE_HEADER) === JSON_TYPE,
    );
  }

  /**
   * One message, within this call's turn.
   * @param {number | undefined} deadline a Date.now() value; undefined: forever
   * @returns {Promise<TopicMessage | null>} null: the deadline passed first
   */
  async #one(deadline) {
    const ready = this.#ready.shift();
    if (ready) return ready;
    this.#check();
    if (this.#pending === null) {
      const pending = this.#produce();
      pending.catch(() => {}); // seen by whoever awaits it; none may once a call gave up
      this.#pending = pending;
    }
    const pending = this.#pending;
    // A fresh promise per call, not one raced by every call: settled or dropped, it is gone
    // (racing one long-lived promise would keep a reaction per call until the end).
    /** @type {() => void} */
    let stop = () => {};
    /** @type {Promise<never>} */
    const stopped = new Promise((_, reject) => {
      stop = () => reject(CLOSED);
    });
    this.#stops.add(stop);
    try {
      const got = await until(Promise.race([pending, stopped]), deadline);
      if (got !== null && this.#pending === pending) this.#pending = null;
      return got === null ? null : got.value;
    } catch (err) {
      if (this.#pending === pending) this.#pending = null;
      if (!(err instanceof TricksError)) this.#check();
      if (err instanceof TricksError) throw err;
      throw new TricksError(`cannot ${this.#what}: ${err instanceof Error ? err.message : err}`);
    } finally {
      this.#stops.delete(stop);
    }
  }

  /**
   * Run `call` in turn after the calls made before it. A call whose deadline passes before
   * its turn came gives up (`expired()` is thrown) and never runs: it takes nothing.
   * @template T
   * @param {() => Promise<T>} call
   * @param {number | undefined} deadline a Date.now() value; undefined: forever
   * @param {() => Error} expired
   * @returns {Promise<T>}
   */
  async #inTurn(call, deadline, expired) {
    const prior = this.#turn;
    let gaveUp = false;
    let started = false;
    const run = prior.then(() => {
      if (gaveUp) return null;
      started = true;
      return call();
    });
    this.#turn = run.catch(() => {});
    if (deadline !== undefined && (await until(prior, deadline)) === null && !started) {
      gaveUp = true;
      throw expired();
    }
    return /** @type {T} */ (await run);
  }

  /**
   * The next message (waiting for one to be published).
   * @param {{timeout?: number}} [options] timeout in seconds (default: forever)
   * @returns {Promise<TopicMessage>}
   * @throws {WaitTimeout} the timeout ran out first
   * @throws {TricksError} the subscription or the driver is closed, a bad timeout; and
   *   NatsUnavailable, PermissionDenied
   */
  async next(options = {}) {
    const timeout = checkTimeout(options?.timeout);
    const deadline = timeout === undefined ? undefined : Date.now() + timeout * 1000;
    const expired = () =>
      new WaitTimeout(
        `timed out after ${timeout}s waiting for a message on ${JSON.stringify(this.topic)} ` +
          `(after seq ${this.#last})`,
      );
    return this.#inTurn(async () => {
      const got = await this.#one(deadline);
      if (got === null) throw expired();
      return got;
    }, deadline, expired);
  }

  /**
   * The next `count` messages. `timeout` bounds the whole call; when it runs out, the
   * messages that came stay with the subscription (the next call returns them first).
   * @param {number} count an integer >= 0
   * @param {{timeout?: number}} [options] timeout in seconds (default: forever)
   * @returns {Promise<TopicMessage[]>}
   * @throws {WaitTimeout} the timeout ran out first (the message says how many came)
   * @throws {TricksError} a bad count or timeout, the subscription or the driver closed; and
   *   NatsUnavailable, PermissionDenied
   */
  async take(count, options = {}) {
    if (!(Number.isInteger(count) && count >= 0)) {
      throw new TricksError(`count must be an integer >= 0, got ${count}`);
    }
    const timeout = checkTimeout(options?.timeout);
    const deadline = timeout === undefined ? undefined : Date.now() + timeout * 1000;
    const expired = (/** @type {number} */ came) =>
      new WaitTimeout(
        `timed out after ${timeout}s waiting for ${count} messages on ` +
          `${JSON.stringify(this.topic)} (${came} came)`,
      );
    return this.#inTurn(async () => {
      /** @type {TopicMessage[]} */
      const got = [];
      try {
        while (got.length < count) {
          const one = await this.#one(deadline);
          if (one === null) throw expired(got.length);
          got.push(one);
        }
      } catch (err) {
        this.#ready.unshift(...got); // not lost: the next call gets them first
        throw err;
      }
      return got;
    }, deadline, () => expired(0));
  }

  /**
   * Stop listening. Calls waiting for a message fail with a TricksError (an iteration ends);
   * later calls too. Never fails; closing twice is harmless.
   * @returns {Promise<void>}
   */
  async close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#unlisten();
    this.#unhook();
    try {
      this.#sub?.unsubscribe();
    } catch {
      // the connection is gone, and the interest with it
    }
    this.#sub = null;
    this.#queue = [];
    this.#head = 0;
    this.#queued = 0;
    this.#ready = [];
    this.#stop();
  }

  /**
   * `for await (const msg of sub)`: every message, until the subscription or its driver is
   * closed (then the loop ends); other failures are thrown. Leaving the loop (`break`) leaves
   * the subscription open.
   * @returns {AsyncIterator<TopicMessage>}
   */
  [Symbol.asyncIterator]() {
    return {
      next: async () => {
        try {
          return { value: await this.next(), done: false };
        } catch (err) {
          if (this.#closed || this.#ctx.closing()) return { value: undefined, done: true };
          throw err;
        }
      },
      return: async () => ({ value: undefined, done: true }),
    };
  }
}
