// Topics (PROTOCOL.md 6.7 publish, 6.8 subscribe) against a real nats-server with the pod
// permissions and the experiment's streams (tests/conformance/fixture.py). Verdicts come from
// what the stream holds and what the subscriptions deliver, never from timing; the timeouts
// below are a safety net only (a loaded machine is slow, not wrong).

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, describe, test } from "node:test";

import { headers } from "@nats-io/transport-node";

import {
  configFromEnv,
  Driver,
  MAX_TOPIC_BYTES,
  names,
  NatsUnavailable,
  TricksError,
  WaitTimeout,
} from "../src/index.js";
import { reconnected, startExperiment, startProxy } from "../testing/harness.js";

const SAFETY = { timeout: 90_000 };
/** Seconds a take may wait: only a safety net. */
const LONG = { timeout: 60 };

/** @param {{seq: number}[]} messages */
const seqs = (messages) => messages.map((m) => m.seq);

/** @param {number[]} list */
function strictlyIncreasing(list) {
  return list.every((n, i) => i === 0 || n > list[i - 1]);
}

describe("topics", () => {
  /** @type {Awaited<ReturnType<typeof startExperiment>>} */
  let ex;
  /** @type {Driver[]} */
  const open = [];
  /** @param {string} tag @param {number} podId @param {string} [url] another way to the server */
  const driver = async (tag, podId, url) => {
    const env = ex.env(tag, podId, 4);
    const d = await Driver.connect(configFromEnv(url ? { ...env, TRICKS_NATS_URL: url } : env));
    open.push(d);
    return d;
  };

  before(async () => {
    ex = await startExperiment("jstopics");
  });
  after(async () => {
    await Promise.all(open.map((d) => d.close()));
    await ex?.close();
  });

  test("publish, then subscribe: every message from the start, in order", SAFETY, async () => {
    const pub = await driver("p", 0);
    const published = [];
    for (let i = 0; i < 5; i++) published.push(await pub.publish("history", `m${i}`));
    assert.ok(strictlyIncreasing(published), `${published}`);
    const sub = (await driver("s", 0)).subscribe("history");
    const got = await sub.take(5, LONG);
    assert.deepEqual(seqs(got), published);
    assert.deepEqual(got.map((m) => m.text()), ["m0", "m1", "m2", "m3", "m4"]);
    for (const m of got) {
      assert.equal(m.topic, "history");
      assert.equal(m.pod, "p-0");
      assert.equal(m.isJson, false);
      assert.ok(m.data instanceof Uint8Array);
    }
    // then the ones published while it listens, from the republished messages
    const waiting = sub.take(2, LONG);
    const more = [await pub.publish("history", "m5"), await pub.publish("history", "m6")];
    assert.deepEqual(seqs(await waiting), more);
    await sub.close();
  });

  test("two publishers at once; subscribers before and after see one sequence", SAFETY,
    async () => {
      const [p1, p2] = [await driver("p", 1), await driver("p", 2)];
      const early = (await driver("s", 1)).subscribe("race");
      const N = 25;
      const gotEarly = early.take(2 * N, LONG); // reading while they publish
      /** @param {Driver} d */
      const burst = async (d) => {
        const mine = [];
        for (let i = 0; i < N; i++) mine.push(await d.publish("race", { from: d.pod, i }));
        return mine;
      };
      const [seqs1, seqs2] = await Promise.all([burst(p1), burst(p2)]);
      const late = (await driver("s", 2)).subscribe("race");
      const [a, b] = [await gotEarly, await late.take(2 * N, LONG)];
      assert.deepEqual(seqs(a), seqs(b));
      assert.ok(strictlyIncreasing(seqs(a)), `${seqs(a)}`);
      assert.deepEqual(seqs(a), [...seqs1, ...seqs2].sort((x, y) => x - y));
      for (const got of [a, b]) {
        for (const [pod, mine] of [["p-1", seqs1], ["p-2", seqs2]]) {
          const theirs = got.filter((m) => m.pod === pod);
          assert.deepEqual(seqs(theirs), mine); // each publisher's order kept
          assert.deepEqual(theirs.map((m) => m.json().i), [...Array(N).keys()]);
          assert.ok(theirs.every((m) => m.isJson && m.json().from === pod));
        }
      }
      await Promise.all([early.close(), late.close()]);
    });

  test("a retried publish (same message id) is stored once", SAFETY, async () => {
    const d = await driver("p", 3);
    const id = names.topicMsgId(ex.exp, d.pod, "retry", randomBytes(8).toString("hex"));
    const first = await d.publishWithId("retry", "once", id);
    const again = await d.publishWithId("retry", "once", id);
    assert.equal(again, first);
    const other = await d.publish("retry", "other");
    const end = await d.publish("retry", "end");
    const got = await d.subscribe("retry").take(3, LONG);
    assert.deepEqual(seqs(got), [first, other, end]); // the retry added nothing before "end"
    assert.deepEqual(got.map((m) => m.text()), ["once", "other", "end"]);
  });

  test("bytes, text and JSON round-trip, marked as they were sent", SAFETY, async () => {
    const d = await driver("p", 0);
    const value = { a: 1, b: [1, "x", null], c: { nested: true }, s: "héllo ✓" };
    const bytes = new Uint8Array([0, 255, 1, 128]);
    await d.publish("kinds", value);
    await d.publish("kinds", "héllo ✓");
    await d.publish("kinds", bytes);
    await d.publish("kinds", null);
    await d.publish("kinds", Buffer.from("buf"));
    await d.publish("kinds", ""); // an empty body: the stream's reply has no `data`
    const sub = d.subscribe("kinds");
    const [json, text, raw, nul, buf, empty] = await sub.take(6, LONG);
    assert.equal(json.isJson, true);
    assert.deepEqual(json.json(), value);
    assert.equal(text.isJson, false);
    assert.equal(text.text(), "héllo ✓");
    assert.equal(raw.isJson, false);
    assert.deepEqual([...raw.data], [...bytes]);
    assert.throws(() => raw.json(), (err) => {
      assert.ok(err instanceof TricksError);
      assert.match(err.message, /not JSON/);
      return true;
    });
    assert.equal(nul.isJson, true);
    assert.equal(nul.json(), null);
    assert.equal(buf.text(), "buf");
    assert.equal(empty.data.length, 0);
    assert.equal(empty.isJson, false);
    // the same, as republished messages (a subscriber that is up to date)
    const live = sub.take(2, LONG);
    await d.publish("kinds", value);
    await d.publish("kinds", bytes);
    const [json2, raw2] = await live;
    assert.equal(json2.isJson, true);
    assert.deepEqual(json2.json(), value);
    assert.equal(raw2.isJson, false);
    assert.deepEqual([...raw2.data], [...bytes]);
    await sub.close();
  });

  test("the largest message goes through; a larger one is refused at once", SAFETY, async () => {
    const d = await driver("p", 1);
    const big = new Uint8Array(MAX_TOPIC_BYTES).fill(7);
    const seq = await d.publish("big", big);
    const [got] = await d.subscribe("big").take(1, LONG);
    assert.equal(got.seq, seq);
    assert.equal(got.data.length, MAX_TOPIC_BYTES);
    assert.ok(got.data.every((b) => b === 7));
    for (const data of [new Uint8Array(MAX_TOPIC_BYTES + 1), "x".repeat(MAX_TOPIC_BYTES + 1),
      ["y".repeat(MAX_TOPIC_BYTES)]]) {
      const refused = d.publish("big", data); // rejected before any request
      await assert.rejects(refused, (err) => {
        assert.ok(err instanceof TricksError && !(err instanceof NatsUnavailable), `${err}`);
        assert.match(err.message, /at most 1,000,000 bytes/);
        return true;
      });
    }
  });

  test("bad topics, data and arguments are refused at once", SAFETY, async () => {
    const d = await driver("p", 2);
    for (const topic of ["", "a.b", "a b", "*", ">", 7]) {
      await assert.rejects(d.publish(/** @type {any} */ (topic), "x"), TricksError);
      assert.throws(() => d.subscribe(/** @type {any} */ (topic)), TricksError);
    }
    /** @type {any} */
    const cyclic = {};
    cyclic.self = cyclic;
    for (const data of [undefined, () => 1, Symbol("s"), 10n, cyclic]) {
      await assert.rejects(d.publish("bad", data), (err) => {
        assert.ok(err instanceof TricksError, `${err}`);
        assert.match(err.message, /cannot publish/);
        return true;
      });
    }
    await assert.rejects(d.publishWithId("bad", "x", "has space"), TricksError);
    const sub = d.subscribe("bad");
    await assert.rejects(sub.take(-1), TricksError);
    await assert.rejects(sub.next({ timeout: -1 }), TricksError);
    await sub.close();
  });

  test("next() and take() time out when nothing comes", SAFETY, async () => {
    const d = await driver("p", 3);
    const sub = d.subscribe("silent");
    await assert.rejects(sub.next({ timeout: 0.2 }), WaitTimeout);
    await d.publish("silent", "one");
    await assert.rejects(sub.take(2, { timeout: 0.5 }), (err) => {
      assert.ok(err instanceof WaitTimeout);
      assert.match(err.message, /waiting for 2 messages on "silent" \(1 came\)/);
      return true;
    });
    // the one that came is not lost: the next call returns it
    assert.equal((await sub.next(LONG)).text(), "one");
    // calls take turns; one whose time runs out before its turn takes nothing
    const first = sub.next(LONG);
    await assert.rejects(sub.next({ timeout: 0.2 }), WaitTimeout);
    const [a, b] = [await d.publish("silent", "two"), await d.publish("silent", "three")];
    assert.equal((await first).seq, a);
    assert.equal((await sub.next(LONG)).seq, b);
    await sub.close();
  });

  test("for await delivers in order; break leaves the subscription open", SAFETY, async () => {
    const d = await driver("p", 0);
    const sub = d.subscribe("loop");
    const published = [];
    for (let i = 0; i < 4; i++) published.push(await d.publish("loop", i));
    const got = [];
    for await (const msg of sub) {
      got.push(msg);
      if (got.length === 3) break;
    }
    assert.deepEqual(seqs(got), published.slice(0, 3));
    assert.deepEqual(got.map((m) => m.json()), [0, 1, 2]);
    assert.equal((await sub.next(LONG)).seq, published[3]);
    await sub.close();
  });

  test("past its buffer a subscription reads from the stream: nothing lost", SAFETY,
    async () => {
      const d = await driver("p", 1);
      const sub = d.subscribe("flood");
      sub.bufferBytes = 0; // every republished message overflows
      const published = [];
      for (let i = 0; i < 10; i++) published.push(await d.publish("flood", `x${i}`));
      const got = await sub.take(10, LONG);
      assert.deepEqual(seqs(got), published);
      await assert.rejects(sub.next({ timeout: 1 }), WaitTimeout); // (it reads to the end)
      const waiting = sub.take(3, LONG);
      const more = [];
      for (let i = 0; i < 3; i++) more.push(await d.publish("flood", `y${i}`));
      assert.deepEqual(seqs(await waiting), more);
      await sub.close();
    });

  test("a pod cannot publish where the stream republishes: no forged message", SAFETY,
    async () => {
      const d = await driver("p", 2);
      const sub = (await driver("s", 3)).subscribe("forge");
      const exp = ex.exp;
      // a forged "next message" on the republish subject: refused by the server
      const h = headers();
      h.set("Nats-Sequence", "999999");
      h.set("Nats-Last-Sequence", "0");
      h.set("Tricks-Pod", "p-0");
      const forged = d.nc.request(names.storedSubject(exp, "forge"), "forged", {
        timeout: 60_000,
        headers: h,
      });
      await assert.rejects(forged, /permissions violation/i);
      const seq = await d.publish("forge", "real");
      const [got] = await sub.take(1, LONG);
      assert.equal(got.seq, seq);
      assert.equal(got.text(), "real");
      await sub.close();
    });

  test("a republished message that does not follow is not taken at its word", SAFETY,
    async () => {
      const d = await driver("p", 0);
      const sub = d.subscribe("gaps");
      const first = await d.publish("gaps", "first");
      assert.equal((await sub.next(LONG)).seq, first);
      await assert.rejects(sub.next({ timeout: 1 }), WaitTimeout); // (it reads to the end)
      // Someone who may publish there (not a pod: the coordinator's credentials) sends
      // messages that claim to be stored: one without sequences, one that says it follows a
      // message the subscriber never saw, one it already has.
      const admin = await ex.admin();
      try {
        const stored = names.storedSubject(ex.exp, "gaps");
        /** @param {Record<string, string>} fields */
        const forge = (fields) => {
          const h = headers();
          for (const [k, v] of Object.entries(fields)) h.set(k, v);
          admin.publish(stored, "forged", { headers: h });
        };
        forge({ "Tricks-Pod": "p-9" });
        forge({ "Nats-Sequence": String(first + 1000) }); // no Nats-Last-Sequence: not 0
        forge({ "Nats-Sequence": String(first + 1000), "Nats-Last-Sequence": String(first + 999) });
        forge({ "Nats-Sequence": String(first), "Nats-Last-Sequence": "0" });
        await admin.flush(); // the server has sent them on before the real one below
      } finally {
        await admin.close();
      }
      const real = await d.publish("gaps", "real");
      const end = await d.publish("gaps", "end");
      const got = await sub.take(2, LONG);
      assert.deepEqual(seqs(got), [real, end]);
      assert.deepEqual(got.map((m) => m.text()), ["real", "end"]);
      await sub.close();
    });

  test("close() ends a pending next(); driver.close() ends next() and iteration", SAFETY,
    async () => {
      const d = await driver("p", 3);
      const sub = d.subscribe("ending");
      const pending = sub.next();
      pending.catch(() => {}); // checked below
      await sub.close();
      await assert.rejects(pending, (err) => {
        assert.ok(err instanceof TricksError && !(err instanceof NatsUnavailable), `${err}`);
        assert.match(err.message, /closed/);
        return true;
      });
      await assert.rejects(sub.next(), /closed/);
      await sub.close(); // harmless

      const own = await Driver.connect(configFromEnv(ex.env("q", 0, 4))); // closed here
      const a = own.subscribe("ending");
      const b = own.subscribe("ending");
      const waiting = a.next();
      waiting.catch(() => {}); // checked below
      /** @type {unknown[]} */
      const iterated = [];
      const loop = (async () => {
        for await (const msg of b) iterated.push(msg);
        return "ended";
      })();
      await own.nc.flush();
      await own.close();
      await assert.rejects(waiting, (err) => {
        assert.ok(err instanceof TricksError && !(err instanceof NatsUnavailable), `${err}`);
        assert.match(err.message, /the driver is closed/);
        return true;
      });
      assert.equal(await loop, "ended");
      assert.deepEqual(iterated, []);
      await assert.rejects(a.next(), /closed/);
      assert.throws(() => own.subscribe("ending"), /closed/);
      await assert.rejects(own.publish("ending", "x"), /closed/);
    });

  test("a subscriber across a server restart gets what was published while away", SAFETY,
    async () => {
      const proxy = await startProxy(ex.server.port);
      try {
        const pub = await driver("p", 0);
        const away = await driver("s", 0, proxy.url);
        const sub = away.subscribe("restart");
        const before = [await pub.publish("restart", "b0"), await pub.publish("restart", "b1")];
        assert.deepEqual(seqs(await sub.take(2, LONG)), before);
        // Nothing more comes; meanwhile the subscriber reads to the end of the topic and then
        // follows the republished messages (were its read still out, it would ride out the
        // restart below and deliver the same: the verdict does not depend on it).
        await assert.rejects(sub.next({ timeout: 1 }), WaitTimeout);
        const pending = sub.take(3, LONG); // waiting while the subscriber is away
        proxy.hold(); // the subscriber is cut off from here on
        await ex.restartServer();
        const meanwhile = [];
        for (let i = 0; i < 3; i++) meanwhile.push(await pub.publish("restart", `m${i}`));
        const back = reconnected(away);
        proxy.release();
        await back;
        // nothing is published from here on: only the reconnect tells it to read
        const got = await pending;
        assert.deepEqual(seqs(got), meanwhile);
        assert.deepEqual(got.map((m) => m.text()), ["m0", "m1", "m2"]);
        // nothing twice: the next message is the next one published
        const end = await pub.publish("restart", "end");
        assert.equal((await sub.next(LONG)).seq, end);
        await sub.close();
      } finally {
        await proxy.close();
      }
    });

  test("a subscriber connected through a restart misses nothing", SAFETY, async () => {
    const pub = await driver("p", 1);
    const d = await driver("s", 1);
    const sub = d.subscribe("through");
    const first = await pub.publish("through", "one");
    assert.equal((await sub.next(LONG)).seq, first);
    const pending = sub.take(3, LONG);
    const back = reconnected(d);
    await ex.restartServer();
    await back;
    const published = [];
    for (let i = 0; i < 3; i++) published.push(await pub.publish("through", `after${i}`));
    assert.deepEqual(seqs(await pending), published);
    await sub.close();
  });
});
