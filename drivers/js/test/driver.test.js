// The JavaScript driver against a real nats-server, the pod permissions of PROTOCOL.md and the
// coordinator's count notifier (tests/conformance/fixture.py).

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  ConfigError,
  configFromEnv,
  Driver,
  NatsUnavailable,
  TricksError,
  WaitTimeout,
} from "../src/index.js";
import { startExperiment } from "../testing/harness.js";

describe("config", () => {
  const base = {
    TAG: "server",
    REPLICAS: "6",
    POD_ID: "3",
    EXP_ID: "x-1",
    POD_IP: "127.0.0.5",
    TRICKS_NATS_URL: "nats://127.0.0.1:4222",
    TRICKS_NATS_USER: "u",
    TRICKS_NATS_PASSWORD: "p",
  };

  test("reads every variable", () => {
    assert.deepEqual(configFromEnv(base), {
      tag: "server",
      replicas: 6,
      podId: 3,
      experiment: "x-1",
      podIp: "127.0.0.5",
      natsUrl: "nats://127.0.0.1:4222",
      natsUser: "u",
      natsPassword: "p",
    });
  });

  test("falls back to TRICKS_IP and TRICKS_PORT", () => {
    const env = { ...base, TRICKS_NATS_URL: "", TRICKS_IP: "10.0.0.1", TRICKS_PORT: "4333" };
    assert.equal(configFromEnv(env).natsUrl, "nats://10.0.0.1:4333");
  });

  /** @type {[Record<string, string | undefined>, RegExp][]} */
  const cases = [
    [{ TAG: undefined }, /TAG is not set/],
    [{ EXP_ID: "" }, /EXP_ID is not set/],
    [{ POD_ID: "zero" }, /POD_ID must be an integer/],
    [{ TRICKS_NATS_URL: undefined }, /TRICKS_NATS_URL/],
    [{ TRICKS_PROTOCOL: "2" }, /speaks protocol 1/],
  ];
  for (const [change, expect] of cases) {
    test(`errors name the variable: ${expect}`, () => {
      assert.throws(() => configFromEnv({ ...base, ...change }), (err) => {
        assert.ok(err instanceof ConfigError && err instanceof TricksError);
        assert.match(err.message, expect);
        return true;
      });
    });
  }
});

test("unreachable NATS is a clear error", async () => {
  const config = configFromEnv({
    TAG: "a", REPLICAS: "1", POD_ID: "0", EXP_ID: "e", TRICKS_NATS_URL: "nats://127.0.0.1:1",
  });
  await assert.rejects(Driver.connect(config), (err) => {
    assert.ok(err instanceof NatsUnavailable);
    assert.match(err.message, /cannot reach NATS at nats:\/\/127\.0\.0\.1:1/);
    return true;
  });
});

describe("against an experiment", () => {
  /** @type {Awaited<ReturnType<typeof startExperiment>>} */
  let ex;
  /** @type {Driver[]} */
  const open = [];
  /** @param {string} [tag] @param {number} [podId] @param {number} [replicas] */
  const driver = async (tag = "t", podId = 0, replicas = 1) => {
    const d = await Driver.connect(configFromEnv(ex.env(tag, podId, replicas)));
    open.push(d);
    return d;
  };

  before(async () => {
    ex = await startExperiment("jsdriver");
  });
  after(async () => {
    await Promise.all(open.map((d) => d.close()));
    await ex?.close();
  });

  test("wrong credentials are refused clearly", async () => {
    const env = { ...ex.env(), TRICKS_NATS_PASSWORD: "wrong" };
    await assert.rejects(Driver.connect(configFromEnv(env)), (err) => {
      assert.ok(err instanceof NatsUnavailable);
      assert.match(err.message, /credentials refused/);
      return true;
    });
  });

  test("registerEvent counts and returns the new total", async () => {
    const d = await driver();
    assert.equal(await d.count("ready"), 0);
    assert.equal(await d.registerEvent("ready"), 1);
    assert.equal(await d.registerEvent("ready"), 2);
    assert.equal(await d.count("ready"), 2);
    assert.equal(await ex.count("ready"), 2);
  });

  test("a retried increment (same message id) counts once", async () => {
    const d = await driver();
    const id = `${ex.exp}.t-0.retry.abc`;
    assert.equal(await d.increment("retry", id), 1);
    assert.equal(await d.increment("retry", id), 1); // the duplicate reports the original total
    assert.equal(await d.registerEvent("retry"), 2);
    assert.equal(await d.count("retry"), 2);
  });

  test("concurrent drivers count exactly", async () => {
    const drivers = await Promise.all([...Array(6).keys()].map((i) => driver("w", i, 6)));
    const totals = await Promise.all(
      drivers.flatMap((d) => [...Array(20)].map(() => d.registerEvent("hit"))),
    );
    assert.deepEqual(totals.sort((a, b) => a - b), [...Array(120).keys()].map((i) => i + 1));
    assert.equal(await drivers[0].count("hit"), 120);
  });

  test("waitEvent resolves when the count is reached", async () => {
    const waiter = await driver("a", 0);
    const others = await Promise.all([0, 1, 2].map((i) => driver("b", i, 3)));
    let settled = false;
    const waiting = waiter.waitEvent("go", 3, { timeout: 30 }).finally(() => {
      settled = true;
    });
    await others[0].registerEvent("go");
    await others[1].registerEvent("go");
    assert.equal(settled, false);
    await others[2].registerEvent("go");
    assert.ok((await waiting) >= 3);
  });

  test("waitEvent already met returns at once", async () => {
    const d = await driver();
    await d.registerEvent("done");
    assert.equal(await d.waitEvent("done", 1, { timeout: 5 }), 1);
  });

  test("waitEvent times out", async () => {
    const d = await driver();
    await d.registerEvent("half");
    await assert.rejects(d.waitEvent("half", 2, { timeout: 0.2 }), (err) => {
      assert.ok(err instanceof WaitTimeout);
      assert.match(err.message, /"half" to reach 2 \(it is 1\)/);
      return true;
    });
  });

  test("discover now and blocking", async () => {
    const d = await driver("c", 0);
    assert.deepEqual(await d.discover("server"), []);
    await ex.runPod("server", 0, "127.0.0.10");
    const blocked = d.discover("server", 3, { timeout: 30 });
    await ex.runPod("server", 1, "127.0.0.11");
    await ex.runPod("other", 0, "127.0.0.99");
    await ex.runPod("server", 2, "127.0.0.12");
    const peers = await blocked;
    assert.deepEqual(
      peers.map((p) => [p.pod_id, p.ip, p.name]),
      [[0, "127.0.0.10", "server-0"], [1, "127.0.0.11", "server-1"], [2, "127.0.0.12", "server-2"]],
    );
    await ex.podGone("server", 1);
    assert.deepEqual((await d.discover("server")).map((p) => p.pod_id), [0, 2]);
    assert.deepEqual((await d.discover("other", 1, { timeout: 5 })).map((p) => p.ip), [
      "127.0.0.99",
    ]);
  });

  test("discover times out", async () => {
    const d = await driver();
    await ex.runPod("lonely", 0, "127.0.0.20");
    await assert.rejects(d.discover("lonely", 2, { timeout: 0.2 }), (err) => {
      assert.ok(err instanceof WaitTimeout);
      assert.match(err.message, /discovering 2 pods of "lonely" \(1 running\)/);
      return true;
    });
  });

  test("bad names are refused before the wire", async () => {
    const d = await driver();
    await assert.rejects(d.registerEvent("has space"), /bad event name/);
    await assert.rejects(d.discover("a.b"), /bad tag/);
    await assert.rejects(d.waitEvent("x>", 1), /bad event name/);
  });

  test("pod credentials reach only their own experiment", async () => {
    const env = { ...ex.env(), EXP_ID: "other-20261122-000000-beef" };
    const stranger = await Driver.connect(configFromEnv(env)).catch((err) => err);
    if (stranger instanceof Driver) {
      open.push(stranger);
      await assert.rejects(stranger.registerEvent("x"), TricksError);
    } else {
      assert.ok(stranger instanceof TricksError);
    }
  });
});
