// record(), flush(), expectInterval() (PROTOCOL.md 6.6) against a real nats-server and the
// experiment's metrics stream (tests/conformance/fixture.py creates it; its `samples` command
// shows every batch the stream holds). The synchronisation is the driver's own flush(), the
// stream's content and the server's restart, never a timer; timeouts are only a safety net.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { after, before, describe, test } from "node:test";

import { configFromEnv, Driver, names, TricksError } from "../src/index.js";
import { reconnected, startExperiment, startProxy } from "../testing/harness.js";

const SAFETY = { timeout: 60_000 };
const DRIVER_URL = new URL("../src/index.js", import.meta.url).href;

/** @param {string} text */
const escape = (text) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** The key of a sample that must be stored once: its time, name and value. @param {any[]} s */
const key = (s) => JSON.stringify(s.slice(0, 3));

describe("record", () => {
  /** @type {Awaited<ReturnType<typeof startExperiment>>} */
  let ex;
  /** @type {Driver[]} */
  const open = [];
  /**
   * @param {string} tag @param {number} podId @param {string} [url] another way to the server
   * @param {import("../index.js").Tuning} [tuning]
   */
  const driver = async (tag, podId, url, tuning = {}) => {
    const env = ex.env(tag, podId, 4);
    const d = await Driver.connect(
      configFromEnv(url ? { ...env, TRICKS_NATS_URL: url } : env),
      tuning,
    );
    open.push(d);
    return d;
  };
  /**
   * The batches stored from pod `pod`, in order.
   * @param {string} pod
   */
  const batchesOf = async (pod) =>
    (await ex.samples()).filter((b) => b.subject === names.metricsSubject(ex.exp, pod));
  /**
   * Every sample stored from `pod`, in order.
   * @param {string} pod
   * @returns {Promise<any[][]>}
   */
  const samplesOf = async (pod) => (await batchesOf(pod)).flatMap((b) => b.batch.samples);

  before(async () => {
    ex = await startExperiment("jsrecord");
  });
  after(async () => {
    await Promise.all(open.map((d) => d.close()));
    await ex?.close();
  });

  test("samples arrive once, in order, with their subject, message id and body", SAFETY,
    async () => {
      const d = await driver("rec", 0);
      const start = Date.now() / 1000;
      /** @type {any[][]} */
      const expected = [];
      for (let i = 0; i < 50; i++) {
        assert.equal(d.record("latency_ms", i + 0.5), undefined);
        expected.push(["latency_ms", i + 0.5]);
      }
      d.record("size", 7, { op: "get", shard: 3 }); // a number label becomes a string
      expected.push(["size", 7, { op: "get", shard: "3" }]);
      d.record("size", -1.25, {}); // no labels: no fourth element
      expected.push(["size", -1.25]);
      d.record("size", 1e-7, null);
      expected.push(["size", 1e-7]);
      await d.flush();
      const end = Date.now() / 1000;

      const batches = await batchesOf("rec-0");
      assert.ok(batches.length >= 1);
      const idShape = new RegExp(`^${escape(ex.exp)}\\.rec-0\\.metrics\\.[0-9a-f]{16}$`);
      for (const { subject, msg_id: id, batch } of batches) {
        assert.equal(subject, `tricks.${ex.exp}.metrics.rec-0`);
        assert.match(String(id), idShape);
        assert.equal(batch.dropped ?? 0, 0);
        assert.equal(batch.intervals, undefined);
      }
      assert.equal(new Set(batches.map((b) => b.msg_id)).size, batches.length);
      const samples = batches.flatMap((b) => b.batch.samples);
      assert.deepEqual(samples.map(([, ...rest]) => rest), expected);
      const times = samples.map(([ts]) => ts);
      for (const [i, ts] of times.entries()) {
        assert.equal(typeof ts, "number");
        assert.ok(i === 0 || ts >= times[i - 1], "in the order recorded");
        // seconds since the epoch (a clock check, not a timing verdict: 1 min of slack)
        assert.ok(ts > start - 60 && ts < end + 60, `${ts} not in [${start}, ${end}]`);
      }
      assert.ok(times.some((ts) => !Number.isInteger(ts * 1000)), "sub-millisecond times");
      assert.equal(d.dropped, 0);
    });

  test("bad input is refused at once with a TricksError, and nothing is sent", SAFETY,
    async () => {
      const d = await driver("bad", 0);
      const long = "x".repeat(201);
      /** @type {[unknown, unknown, unknown][]} */
      const cases = [
        ["", 1, undefined],
        ["a.b", 1, undefined],
        ["a b", 1, undefined],
        ["x".repeat(101), 1, undefined],
        [7, 1, undefined],
        ["ok", Number.NaN, undefined],
        ["ok", Number.POSITIVE_INFINITY, undefined],
        ["ok", Number.NEGATIVE_INFINITY, undefined],
        ["ok", true, undefined],
        ["ok", "1", undefined],
        ["ok", null, undefined],
        ["ok", undefined, undefined],
        ["ok", 1n, undefined],
        ["ok", 1, "op=get"],
        ["ok", 1, ["get"]],
        ["ok", 1, Object.fromEntries([..."abcdefghi"].map((k) => [k, "v"]))], // 9 labels
        ["ok", 1, { "1a": "v" }],
        ["ok", 1, { "a-b": "v" }],
        ["ok", 1, { [`a${"b".repeat(32)}`]: "v" }], // 33 characters
        ["ok", 1, { ts: "v" }],
        ["ok", 1, { tag: "v" }],
        ["ok", 1, { pod_id: "v" }],
        ["ok", 1, { name: "v" }],
        ["ok", 1, { value: "v" }],
        ["ok", 1, { op: long }],
        ["ok", 1, { op: true }],
        ["ok", 1, { op: null }],
        ["ok", 1, { op: { nested: "v" } }],
        ["ok", 1, { op: Number.NaN }],
      ];
      // untyped, as from plain JavaScript
      const record = /** @type {(...args: unknown[]) => void} */ (d.record.bind(d));
      const expectInterval = /** @type {(...args: unknown[]) => void} */ (d.expectInterval.bind(d));
      for (const [name, value, labels] of cases) {
        assert.throws(
          () => record(name, value, labels),
          (err) => err instanceof TricksError && err.constructor === TricksError,
          `record(${String(name).slice(0, 20)}, ${String(value)}, ${JSON.stringify(labels)})`,
        );
      }
      const intervals = [["a.b", 10], ["ok", 0], ["ok", -1], ["ok", Number.NaN], ["ok", "10"]];
      for (const [name, ms] of intervals) {
        assert.throws(() => expectInterval(name, ms), TricksError);
      }
      // the limits themselves are fine: 8 labels, 32-character keys, 200-character values
      const edge = Object.fromEntries(
        [..."abcdefg"].map((k) => [k, "v"]).concat([[`_${"k".repeat(31)}`, "é".repeat(200)]]),
      );
      d.record("x".repeat(100), 0, edge);
      await d.flush();
      assert.deepEqual((await samplesOf("bad-0")).map(([, ...rest]) => rest), [
        ["x".repeat(100), 0, edge],
      ]);
      assert.equal(d.dropped, 0);
      await d.close();
      // closed: still checked, then dropped and counted (a late sample never throws)
      assert.throws(() => record("late", Number.NaN), TricksError);
      assert.equal(d.record("late", 1), undefined);
      d.expectInterval("late", 10);
      await d.flush();
      assert.equal(d.dropped, 1);
      assert.equal((await samplesOf("bad-0")).length, 1);
    });

  test("a full buffer drops samples and counts them in the batches' dropped", SAFETY,
    async () => {
      const d = await driver("full", 0, undefined, { bufferSamples: 10 });
      for (let i = 0; i < 25; i++) d.record("n", i); // synchronous: nothing is sent meanwhile
      assert.equal(d.dropped, 15);
      await d.flush();
      d.record("n", 25);
      await d.flush();
      const batches = await batchesOf("full-0");
      assert.deepEqual(batches.flatMap((b) => b.batch.samples).map((s) => s[2]), [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 25,
      ]);
      for (const b of batches) assert.equal(b.batch.dropped, 15); // cumulative, in every batch
      assert.equal(d.dropped, 15);
      await assert.rejects(
        Driver.connect(configFromEnv(ex.env("full", 1)), { bufferSamples: 0 }),
        TricksError,
      );
    });

  test("a batch the stream refuses is dropped and counted, not retried", SAFETY, async () => {
    const admin = await ex.admin();
    const stream = names.metricsStream(ex.exp);
    /** @param {Record<string, unknown>} change */
    const update = async (change) => {
      const info = (await admin.request(`$JS.API.STREAM.INFO.${stream}`)).json();
      const reply = (await admin.request(
        `$JS.API.STREAM.UPDATE.${stream}`,
        JSON.stringify({ ...info.config, ...change }),
      )).json();
      assert.equal(reply.error, undefined, JSON.stringify(reply.error));
    };
    /** @type {Map<string, number>} every publish of the pod, by message id */
    const published = new Map();
    const sub = admin.subscribe(names.metricsSubject(ex.exp, "refused-0"), {
      callback: (_err, msg) => {
        const id = String(msg.headers?.get("Nats-Msg-Id"));
        published.set(id, (published.get(id) ?? 0) + 1);
      },
    });
    try {
      await admin.flush();
      const d = await driver("refused", 0);
      await admin.request(names.metricsSubject(ex.exp, "filler-0"), '{"samples":[]}');
      const info = (await admin.request(`$JS.API.STREAM.INFO.${stream}`)).json();
      await update({ max_msgs: info.state.messages }); // full: new batches are refused
      const before = (await ex.samples()).length;
      for (let i = 0; i < 3; i++) d.record("lost", i);
      await d.flush(); // resolves: the samples are lost, and counted
      assert.equal(d.dropped, 3);
      await admin.flush(); // every publish of the pod has reached us
      assert.ok(published.size >= 1);
      for (const [id, times] of published) assert.equal(times, 1, `${id} sent ${times} times`);
      assert.equal((await ex.samples()).length, before);

      await update({ max_msgs: -1 });
      d.record("kept", 1);
      await d.flush();
      const batches = await batchesOf("refused-0");
      assert.deepEqual(batches.flatMap((b) => b.batch.samples).map((s) => s[1]), ["kept"]);
      assert.equal(batches.at(-1)?.batch.dropped, 3);
    } finally {
      sub.unsubscribe();
      await update({ max_msgs: -1 });
      await admin.close();
    }
  });

  test("close() sends everything recorded just before it", SAFETY, async () => {
    const d = await Driver.connect(configFromEnv(ex.env("closing", 0))); // closed here
    for (let i = 0; i < 5000; i++) d.record("v", i, i % 2 ? { odd: "yes" } : undefined);
    await d.close();
    const samples = await samplesOf("closing-0");
    assert.deepEqual(samples.map((s) => s[2]), Array.from({ length: 5000 }, (_, i) => i));
    assert.deepEqual(samples[1][3], { odd: "yes" });
    assert.equal(samples[0].length, 3);
  });

  test("a large buffer is split into batches under 256 KiB", SAFETY, async () => {
    const d = await driver("big", 0);
    const labels = Object.fromEntries([..."abcdefgh"].map((k) => [k, "é".repeat(200)]));
    for (let i = 0; i < 250; i++) d.record("wide", i, labels); // about 830 KB of JSON
    await d.flush();
    const batches = await batchesOf("big-0");
    assert.ok(batches.length >= 4, `${batches.length} batches`);
    for (const b of batches) {
      const bytes = Buffer.byteLength(JSON.stringify(b.batch));
      assert.ok(bytes < 256 * 1024, `a batch of ${bytes} bytes`);
    }
    const samples = batches.flatMap((b) => b.batch.samples);
    assert.deepEqual(samples.map((s) => s[2]), Array.from({ length: 250 }, (_, i) => i));
    assert.deepEqual(samples[249][3], labels);
  });

  test("flush() resolves once the stream holds everything recorded before it", SAFETY,
    async () => {
      const d = await driver("flush", 0);
      await d.flush(); // nothing recorded: nothing sent
      assert.deepEqual(await batchesOf("flush-0"), []);
      for (let i = 0; i < 20_000; i++) d.record("many", i); // several batches
      const first = d.flush();
      d.record("many", 20_000);
      const second = d.flush();
      await first;
      assert.ok((await samplesOf("flush-0")).length >= 20_000);
      await second;
      const values = (await samplesOf("flush-0")).map((s) => s[2]);
      assert.deepEqual(values, Array.from({ length: 20_001 }, (_, i) => i));
    });

  test("the sender sends on its own, without flush()", SAFETY, async () => {
    const admin = await ex.admin();
    try {
      const sub = admin.subscribe(names.metricsSubject(ex.exp, "auto-0"), { max: 1 });
      await admin.flush();
      const d = await driver("auto", 0);
      d.record("tick", 1);
      for await (const msg of sub) {
        assert.deepEqual(msg.json().samples.map((/** @type {any[]} */ s) => s[2]), [1]);
      }
    } finally {
      await admin.close();
    }
  });

  test("expectInterval() is sent with the batches", SAFETY, async () => {
    const d = await driver("interval", 0);
    d.expectInterval("rtt_ms", 10);
    await d.flush(); // no sample yet: a batch for the interval alone
    d.record("rtt_ms", 11.5);
    d.expectInterval("other", 2.5);
    await d.flush();
    const batches = (await batchesOf("interval-0")).map((b) => b.batch);
    assert.deepEqual(batches, [
      { samples: [], dropped: 0, intervals: { rtt_ms: 10 } },
      { samples: [[batches[1].samples[0][0], "rtt_ms", 11.5]], dropped: 0,
        intervals: { rtt_ms: 10, other: 2.5 } },
    ]);
  });

  test("exactly once while the server is away and restarts (retries)", SAFETY, async () => {
    const proxy = await startProxy(ex.server.port);
    try {
      // A request timeout far shorter than the outage: every batch is sent several times.
      const d = await driver("away", 0, proxy.url, { requestTimeoutMs: 100 });
      for (let i = 0; i < 100; i++) d.record("r", i);
      await d.flush();
      proxy.hold(); // the pod is cut off from here on
      for (let i = 100; i < 5000; i++) d.record("r", i, { phase: "away" });
      const pending = d.flush();
      await ex.restartServer();
      const back = reconnected(d);
      proxy.release();
      await back;
      await pending;
      for (let i = 5000; i < 5100; i++) d.record("r", i);
      await d.close();
      const samples = await samplesOf("away-0");
      const keys = samples.map(key);
      assert.equal(new Set(keys).size, keys.length, "a sample stored twice");
      assert.deepEqual(samples.map((s) => s[2]), Array.from({ length: 5100 }, (_, i) => i));
      assert.equal(d.dropped, 0);
    } finally {
      await proxy.close();
    }
  });

  test("a batch stored whose ack comes late is sent again with its id, stored once", SAFETY,
    async () => {
      const proxy = await startProxy(ex.server.port);
      const admin = await ex.admin();
      try {
        /** @type {Map<string, number>} */
        const sent = new Map();
        /** @type {() => void} */
        let sentTwice = () => {};
        const retried = new Promise((resolve) => {
          sentTwice = () => resolve(undefined);
        });
        admin.subscribe(names.metricsSubject(ex.exp, "deaf-0"), {
          callback: (_err, msg) => {
            const id = String(msg.headers?.get("Nats-Msg-Id"));
            sent.set(id, (sent.get(id) ?? 0) + 1);
            if (sent.get(id) === 2) sentTwice();
          },
        });
        await admin.flush();
        const d = await driver("deaf", 0, proxy.url, { requestTimeoutMs: 100 });
        proxy.deafen(); // the stream's acks are kept back from here on
        for (let i = 0; i < 100; i++) d.record("d", i);
        const pending = d.flush();
        await retried; // the batch reached the stream, and again: no ack came in time
        proxy.hear();
        await pending;
        d.record("d", 100);
        await d.flush();
        const batches = await batchesOf("deaf-0");
        assert.equal(new Set(batches.map((b) => b.msg_id)).size, batches.length);
        const values = batches.flatMap((b) => b.batch.samples).map((s) => s[2]);
        assert.deepEqual(values, Array.from({ length: 101 }, (_, i) => i));
        assert.equal(d.dropped, 0);
      } finally {
        await admin.close();
        await proxy.close();
      }
    });

  test("exactly once across a server restart: record, restart, record, close", SAFETY,
    async () => {
      // closed here; a short request timeout: a batch sent as the server dies is soon resent
      const tuning = { requestTimeoutMs: 250 };
      const d = await Driver.connect(configFromEnv(ex.env("restart", 0)), tuning);
      for (let i = 0; i < 3000; i++) d.record("s", i); // one batch may be in flight at the kill
      const back = reconnected(d);
      await ex.restartServer();
      await back;
      for (let i = 3000; i < 6000; i++) d.record("s", i);
      await d.close();
      const samples = await samplesOf("restart-0");
      const counts = new Map();
      for (const k of samples.map(key)) counts.set(k, (counts.get(k) ?? 0) + 1);
      assert.deepEqual([...counts.values()].filter((n) => n !== 1), []);
      assert.deepEqual(samples.map((s) => s[2]), Array.from({ length: 6000 }, (_, i) => i));
      assert.equal(d.dropped, 0);
    });

  describe("SIGTERM", () => {
    /**
     * Run `body` in a Node process of pod `<tag>-0` (`Driver` imported); its exit code and output.
     * @param {string} tag @param {string} body
     * @returns {Promise<{code: number | null, out: string}>}
     */
    const pod = (tag, body) =>
      new Promise((resolve, reject) => {
        const code = `import { Driver } from ${JSON.stringify(DRIVER_URL)};\n${body}`;
        const child = spawn(process.execPath, ["--input-type=module", "-e", code], {
          env: { ...process.env, ...ex.env(tag, 0) },
          stdio: ["ignore", "pipe", "inherit"],
        });
        let out = "";
        child.stdout.on("data", (chunk) => {
          out += chunk;
        });
        child.on("error", reject);
        child.on("exit", (status) => resolve({ code: status, out }));
      });

    test("the handler comes with the first sample where the program has none, goes on close",
      SAFETY, async () => {
        const { code, out } = await pod("hooks", `
          const n = () => process.listenerCount("SIGTERM");
          const seen = [];
          const a = await Driver.connect();
          const b = await Driver.connect();
          const quiet = await Driver.connect();
          seen.push(n()); // 0: connecting changes nothing
          a.record("x", 1);
          b.expectInterval("x", 10);
          seen.push(n()); // 1: one handler for both
          await a.close();
          seen.push(n()); // 1: b still has samples
          await b.close();
          seen.push(n()); // 0
          await quiet.close();
          process.on("SIGTERM", () => {});
          const c = await Driver.connect();
          c.record("x", 1);
          seen.push(n()); // 1: the program's own, alone
          await c.close();
          seen.push(n()); // 1
          console.log(JSON.stringify(seen));
        `);
        assert.equal(code, 0);
        assert.deepEqual(JSON.parse(out), [0, 1, 1, 0, 1, 1]);
      });

    test("alone, it sends the samples and exits with 143", SAFETY, async () => {
      const { code } = await pod("term", `
        const d = await Driver.connect();
        for (let i = 0; i < 1000; i++) d.record("bye", i);
        process.kill(process.pid, "SIGTERM");
      `);
      assert.equal(code, 143);
      const values = (await samplesOf("term-0")).map((s) => s[2]);
      assert.deepEqual(values, Array.from({ length: 1000 }, (_, i) => i));
    });

    test("a handler the program adds later decides the exit; the samples are sent", SAFETY,
      async () => {
        const { code, out } = await pod("own", `
          const d = await Driver.connect();
          for (let i = 0; i < 1000; i++) d.record("bye", i); // the driver's handler is in
          process.on("SIGTERM", async () => {
            d.record("bye", 1000);
            await d.close();
            process.exit(0);
          });
          console.log(process.listenerCount("SIGTERM"));
          process.kill(process.pid, "SIGTERM");
        `);
        assert.equal(out.trim(), "2");
        assert.equal(code, 0);
        const values = (await samplesOf("own-0")).map((s) => s[2]);
        assert.deepEqual(values, Array.from({ length: 1001 }, (_, i) => i));
      });
  });
});
