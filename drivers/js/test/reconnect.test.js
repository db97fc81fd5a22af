// The driver across a restart of nats-server (PROTOCOL.md 6, 6.3 "after a reconnect", 6.4):
// the server is killed (SIGKILL) and started again on the same port and store, as the
// coordinator's supervisor does. The synchronisation is the restart itself and the drivers'
// own reconnect events, never a timer; the tests' timeouts are only a safety net.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { configFromEnv, Driver, names, NatsUnavailable, TricksError } from "../src/index.js";
import { reconnected, startExperiment, startProxy } from "../testing/harness.js";

const SAFETY = { timeout: 60_000 };

describe("after a server restart", () => {
  /** @type {Awaited<ReturnType<typeof startExperiment>>} */
  let ex;
  /** @type {Driver[]} */
  const open = [];
  /** @param {string} tag @param {number} podId @param {string} [url] another way to the server */
  const driver = async (tag, podId, url, tuning = {}) => {
    const env = ex.env(tag, podId, 4);
    const d = await Driver.connect(configFromEnv(url ? { ...env, TRICKS_NATS_URL: url } : env), tuning);
    open.push(d);
    return d;
  };

  before(async () => {
    ex = await startExperiment("jsrestart");
  });
  after(async () => {
    await Promise.all(open.map((d) => d.close()));
    await ex?.close();
  });

  test("waitEvent resolves when the event is registered after the restart", SAFETY, async () => {
    const waiter = await driver("a", 0);
    const back = reconnected(waiter);
    const waiting = waiter.waitEvent("go", 1);
    await ex.restartServer();
    await back;
    const other = await driver("b", 0);
    assert.equal(await other.registerEvent("go"), 1);
    assert.equal(await waiting, 1);
  });

  test("waitEvent reads the count again after a reconnect (the notification was lost)", SAFETY,
    async () => {
      const proxy = await startProxy(ex.server.port);
      try {
        const waiter = await driver("a", 1, proxy.url);
        const waiting = waiter.waitEvent("lost", 1);
        proxy.hold(); // the waiter is away from here on
        await ex.restartServer();
        const other = await driver("b", 1);
        const seen = other.nc.subscribe(names.reachedSubject(ex.exp, "lost", 1), { max: 1 });
        await other.nc.flush();
        assert.equal(await other.registerEvent("lost"), 1);
        for await (const _ of seen) break; // the one notification went out: the waiter missed it
        const back = reconnected(waiter);
        proxy.release();
        await back;
        assert.equal(await waiting, 1);
      } finally {
        await proxy.close();
      }
    });

  test("calls made while the server is away complete once it is back", SAFETY, async () => {
    const proxy = await startProxy(ex.server.port);
    try {
      // A request timeout far shorter than the outage, as on a loaded machine.
      const d = await driver("e", 0, proxy.url, { requestTimeoutMs: 50 });
      assert.equal(await d.registerEvent("away"), 1);
      proxy.hold(); // the pod is cut off from here on
      const calls = Promise.all([d.registerEvent("away"), d.count("away")]);
      await ex.restartServer();
      const back = reconnected(d);
      proxy.release();
      await back;
      const [registered] = await calls;
      assert.equal(registered, 2); // counted once, though earlier attempts went nowhere
      assert.equal(await d.count("away"), 2);
    } finally {
      await proxy.close();
    }
  });

  test("a blocking discover completes across a restart", SAFETY, async () => {
    const d = await driver("c", 0);
    await ex.runPod("server", 0, "127.0.0.30");
    const back = reconnected(d);
    const blocked = d.discover("server", 2);
    await ex.restartServer();
    await back;
    await ex.runPod("server", 1, "127.0.0.31");
    assert.deepEqual((await blocked).map((p) => [p.pod_id, p.ip, p.name]), [
      [0, "127.0.0.30", "server-0"],
      [1, "127.0.0.31", "server-1"],
    ]);
  });

  test("pods that stopped while the watcher was away are not counted", SAFETY, async () => {
    const proxy = await startProxy(ex.server.port);
    try {
      const d = await driver("c", 1, proxy.url);
      await ex.runPod("db", 0, "127.0.0.40");
      await ex.runPod("db", 1, "127.0.0.41");
      const blocked = d.discover("db", 3);
      proxy.hold();
      await ex.restartServer();
      await ex.podGone("db", 1);
      await ex.runPod("db", 2, "127.0.0.42");
      const back = reconnected(d);
      proxy.release();
      await back;
      await ex.runPod("db", 3, "127.0.0.43");
      assert.deepEqual((await blocked).map((p) => p.pod_id), [0, 2, 3]);
    } finally {
      await proxy.close();
    }
  });

  test("close() while the server is away ends the pending calls and returns", SAFETY,
    async () => {
      const proxy = await startProxy(ex.server.port);
      try {
        const env = { ...ex.env("f", 0, 4), TRICKS_NATS_URL: proxy.url };
        const d = await Driver.connect(configFromEnv(env)); // closed here, not in after()
        const pending = Promise.allSettled([d.waitEvent("gone", 1), d.discover("nobody", 2)]);
        await d.nc.flush();
        proxy.hold(); // the driver is cut off from here on
        await d.close();
        for (const outcome of await pending) {
          assert.equal(outcome.status, "rejected");
          const err = outcome.status === "rejected" ? outcome.reason : null;
          assert.ok(err instanceof TricksError && !(err instanceof NatsUnavailable), `${err}`);
          assert.match(err.message, /the driver is closed/);
        }
        assert.ok(d.nc.isClosed());
      } finally {
        await proxy.close();
      }
    });
});
