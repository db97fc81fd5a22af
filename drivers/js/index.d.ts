// Types of the tricks-nats JavaScript driver (src/index.js); testing/types-check.ts makes tsc
// prove that the implementation matches them.

import type { Msg, NatsConnection } from "@nats-io/transport-node";

/** The protocol version this driver speaks (drivers/PROTOCOL.md). */
export declare const PROTOCOL_VERSION: "2" | string;
/** Tags, event and metric names: letters, digits, '-' and '_'. */
export declare const NAME_RE: RegExp;
/** Label keys of a sample: a letter or '_', then up to 31 letters, digits or '_'. */
export declare const LABEL_RE: RegExp;

/** Base of every error the driver raises on purpose; no call fails with anything else. */
export declare class TricksError extends Error {
  constructor(message: string, options?: ErrorOptions);
}
/** The pod's environment lacks a variable, or holds a bad value (shell exit code 2). */
export declare class ConfigError extends TricksError {}
/** NATS unreachable, credentials refused, or no answer (shell exit code 3). */
export declare class NatsUnavailable extends TricksError {}
/** A wait or a blocking discover ran out of time (shell exit code 1). */
export declare class WaitTimeout extends TricksError {}
/** NATS refused a subject to these credentials (permissions violation); final at once (exit 1). */
export declare class PermissionDenied extends TricksError {}
/** `discover` of a tag the experiment does not have (TRICKS_TAGS): a typo, said at once. */
export declare class UnknownTag extends TricksError {}

/**
 * A pod's identity and where its NATS is, read from the environment. In the configs that
 * configFromEnv and Driver make, `natsPassword` is non-enumerable: util.inspect and
 * JSON.stringify do not show it, and a spread (`{...config}`) does not copy it.
 */
export interface Config {
  tag: string;
  replicas: number;
  podId: number;
  experiment: string;
  podIp: string;
  natsUrl: string;
  natsUser: string | undefined;
  natsPassword: string | undefined;
  /** The experiment's tags (TRICKS_TAGS); absent: discover checks none. */
  tags?: string[];
}

/** One running pod, as its tag's roster lists it. */
export interface Peer {
  tag: string;
  pod_id: number;
  ip: string;
  name: string;
}

/**
 * Labels of a sample: at most 8; keys match LABEL_RE and are none of ts, tag, pod_id, name,
 * value; values are strings of at most 200 characters (numbers are turned into strings).
 */
export type Labels = Record<string, string | number>;

/** Timeouts are in seconds; absent means wait forever. */
export interface WaitOptions {
  timeout?: number;
}

/** A topic message's data holds at most this many bytes (1,000,000). */
export declare const MAX_TOPIC_BYTES: number;

/** One message of a topic, as a subscription delivers it (PROTOCOL.md 6.8). */
export interface TopicMessage {
  readonly topic: string;
  /** Its place in the run's topics stream: increasing within a topic, not consecutive. */
  readonly seq: number;
  /** The publisher, as it says (`<tag>-<pod_id>`; pods share credentials: not proven). */
  readonly pod: string;
  /** The data, as published (JSON and text as their UTF-8 bytes). */
  readonly data: Uint8Array;
  /** Whether the publisher marked the data as JSON (`Tricks-Type: json`). */
  readonly isJson: boolean;
  /** The data as text (UTF-8; bytes that are not become U+FFFD). */
  text(): string;
  /**
   * The data decoded as JSON.
   * @throws {TricksError} the data is not JSON
   */
  json(): any;
}

/**
 * Every message of one topic from the start of the run, in order, each exactly once, across
 * reconnects and server restarts: `for await (const msg of sub)` (ends when the subscription
 * or its driver is closed; `break` leaves it open), `next`, `take`. Calls take turns (a
 * call's timeout counts from the call: one that runs out before its turn takes nothing).
 */
export interface Subscription extends AsyncIterable<TopicMessage> {
  readonly topic: string;
  /**
   * Bytes of republished messages kept at most while no call takes them (default 64 MiB);
   * past it they are dropped and read from the stream instead: nothing is lost.
   */
  bufferBytes: number;
  /**
   * The next message, waiting for one to be published (`options.timeout`: seconds; absent:
   * forever).
   * @throws {WaitTimeout} the timeout ran out first
   * @throws {TricksError} the subscription or its driver is closed
   */
  next(options?: WaitOptions): Promise<TopicMessage>;
  /**
   * The next `count` messages; `options.timeout` bounds the whole call.
   * @throws {WaitTimeout} the timeout ran out first (the message says how many came; they
   *   stay with the subscription: the next call returns them first)
   */
  take(count: number, options?: WaitOptions): Promise<TopicMessage[]>;
  /** Stop listening; pending calls fail with a TricksError. Never fails; twice is harmless. */
  close(): Promise<void>;
}

/** Read TAG, REPLICAS, POD_ID, EXP_ID, POD_IP, TRICKS_NATS_URL, ... (PROTOCOL.md section 1). */
export declare function configFromEnv(env?: Record<string, string | undefined>): Config;

/** A counter body `{"val":"<n>"}`, or null. */
export declare function parseCount(data: Uint8Array): number | null;

/** A roster body `{"tag", "pods": [{"pod_id", "ip"}]}` as peers sorted by pod id, or null. */
export declare function parseRoster(tag: string, data: Uint8Array): Peer[] | null;
/** The roster a `<tag>_start` notification carries once all the tag's pods run, or null. */
export declare function carriedRoster(tag: string, msg: Msg | undefined): Peer[] | null;
/** The count a notification says `event` reached, or null when its body states none. */
export declare function reachedValue(msg: Msg | undefined, event: string): number | null;

/** Subject and bucket names of one experiment (PROTOCOL.md section 4). */
export declare const names: {
  countsBucket(exp: string): string;
  podsBucket(exp: string): string;
  countsStream(exp: string): string;
  podsStream(exp: string): string;
  countSubject(exp: string, event: string): string;
  eventSubject(exp: string, event: string): string;
  rosterSubject(exp: string, tag: string): string;
  reachedSubject(exp: string, event: string, value: number): string;
  inboxPrefix(exp: string): string;
  msgId(exp: string, pod: string, event: string, nonce: string): string;
  /** `tricks.<exp>.metrics.<pod>`: a pod's metrics batches (`pod`: `<tag>-<pod_id>`). */
  metricsSubject(exp: string, pod: string): string;
  /** `tricks-<exp>-metrics`: the stream that stores them. */
  metricsStream(exp: string): string;
  /** `<exp>.<pod>.metrics.<nonce>`: a batch's Nats-Msg-Id, the same on its retries. */
  metricsMsgId(exp: string, pod: string, nonce: string): string;
  /** `tricks.<exp>.topic.<topic>`: pods publish a topic's messages here (a request). */
  topicSubject(exp: string, topic: string): string;
  /** `tricks.<exp>.stored.<topic>`: the topics stream republishes what it stores here. */
  storedSubject(exp: string, topic: string): string;
  /** `tricks-<exp>-topics`: the stream that keeps every topic's messages for the run. */
  topicsStream(exp: string): string;
  /** `<exp>.<pod>.topic.<topic>.<nonce>`: a publish's Nats-Msg-Id, the same on its retries. */
  topicMsgId(exp: string, pod: string, topic: string, nonce: string): string;
};

/** Ride-out tuning of Driver.connect (milliseconds). */
export interface Tuning {
  /** One request's timeout (default 2000). */
  requestTimeoutMs?: number;
  /** How long connecting and every call retry while NATS restarts (default 20000). */
  recoveryMs?: number;
  /** Samples record() keeps waiting to be sent at most; more are dropped (default 100000). */
  bufferSamples?: number;
}

export declare class Driver {
  constructor(nc: NatsConnection, config: Config);
  /**
   * Connect with `config`, by default read from the environment. A refused or unreachable
   * server is tried again for `recoveryMs`; refused credentials fail at once.
   * @throws {ConfigError} no `config` and an incomplete environment
   * @throws {NatsUnavailable} unreachable for `recoveryMs`, or the credentials refused
   */
  static connect(config?: Config, tuning?: Tuning): Promise<Driver>;
  /** One request's timeout in ms (default 2000); a call retries past it while NATS restarts. */
  requestTimeoutMs: number;
  /** How long a call retries unanswered requests, in ms, before NatsUnavailable (20000). */
  recoveryMs: number;
  /** Samples that may wait to be sent (default 100000); record() drops and counts more. */
  bufferSamples: number;
  /** The pod's configuration (a copy whose password is non-enumerable). */
  readonly config: Config;
  /** The NATS connection, for what the driver does not cover. */
  readonly nc: NatsConnection;
  /** `<tag>-<pod_id>` */
  get pod(): string;
  /** What JSON.stringify shows: the pod, its configuration (no password), closed or not. */
  toJSON(): { pod: string; config: Config; closed: boolean };
  /**
   * Running pods of `tag` (sorted by pod id); with `count`, block until that many run
   * (`options.timeout`: seconds for the whole call; absent: forever).
   * @throws {UnknownTag} a tag not in TRICKS_TAGS (at once)
   * @throws {WaitTimeout} the timeout ran out first
   */
  discover(tag: string, count?: number | null, options?: WaitOptions): Promise<Peer[]>;
  /**
   * +1 on event `name` (a request to the coordinator), exactly once; the count right after.
   * @throws {TricksError} a bad name, or a registration the coordinator refused
   */
  registerEvent(name: string): Promise<number>;
  /**
   * The registration with a given Nats-Msg-Id (`names.msgId(...)`): calls with the same id
   * count once; the count right after the first of them.
   */
  increment(name: string, msgId: string): Promise<number>;
  /**
   * Block until event `name` has been registered at least `value` times (the count, read
   * after each notification, decides: a notification alone releases nothing). Resolves to
   * the count reached (>= value); `options.timeout`: seconds (absent: forever).
   * @throws {WaitTimeout} the timeout ran out first
   */
  waitEvent(name: string, value: number, options?: WaitOptions): Promise<number>;
  /**
   * registerEvent(name) then waitEvent(name, value) in one request and one notification:
   * the cheapest barrier. `timeout` (seconds) bounds the whole call.
   */
  barrier(name: string, value: number, options?: WaitOptions): Promise<number>;
  /** The current count of event `name` (0 when never registered). */
  count(name: string): Promise<number>;
  /**
   * Call `listener` after every reconnect (the server may have restarted; waitEvent and
   * discover catch up on their own). Returns a function that stops it.
   */
  onReconnect(listener: () => void): () => void;
  /**
   * Record a sample of metric `name` (an event-like name) now: `value` a finite number,
   * optional labels. Never blocks: the sample is buffered and sent in batches in the
   * background (4096 samples or 200 ms); with `bufferSamples` waiting, or on a closed
   * driver, it is dropped and counted. Bad input throws a TricksError at once. At the first
   * sample, where the program has no SIGTERM listener, installs one that closes the drivers
   * with samples (sending them) and exits with 143; removed when the last of them closes.
   */
  record(name: string, value: number, labels?: Labels | null): void;
  /**
   * Declare that `name` is meant to be recorded every `ms` milliseconds (a closed-loop
   * target rate), for coordinated-omission correction; sent with the batches.
   */
  expectInterval(name: string, ms: number): void;
  /**
   * Send everything recorded so far; resolves once the stream stored it. What could not be
   * stored is counted in `dropped`: flush never fails.
   */
  flush(): Promise<void>;
  /** Samples dropped so far (a full buffer, a batch refused or not taken); cumulative. */
  readonly dropped: number;
  /**
   * Add one message to `topic`, kept for the whole run and stored exactly once (its retries
   * carry one message id); every subscriber gets it, also those that subscribe later. `data`:
   * a Uint8Array/Buffer (raw bytes), a string (UTF-8 text) or any other JSON-able value
   * (sent as JSON, `isJson` for subscribers); at most 1,000,000 bytes. Resolves to the
   * message's seq (increasing within a topic).
   * @throws {TricksError} a bad topic, data too large or not JSON-able (at once), the stream
   *   refused it (full)
   */
  publish(topic: string, data: unknown): Promise<number>;
  /**
   * The publish with a given Nats-Msg-Id (`names.topicMsgId(...)`): calls with the same id
   * store the message once (to retry a publish that failed); the seq of the first.
   */
  publishWithId(topic: string, data: unknown, msgId: string): Promise<number>;
  /**
   * Every message of `topic` from the start of the run, in order, each exactly once, across
   * reconnects and server restarts. Subscribes at once.
   * @throws {TricksError} a bad topic name, or the driver is closed (at once)
   */
  subscribe(topic: string): Subscription;
  /**
   * Send the buffered samples (10 s at most), then drain and close the connection; pending
   * calls (a waitEvent, a blocking discover, a subscription's next) fail at once with a
   * TricksError, and subscriptions' iterations end. Never fails;
   * calling it again is harmless.
   */
  close(): Promise<void>;
}
