// The JavaScript driver against a real nats-server, the pod permissions of PROTOCOL.md and the
// coordinator's side of the experiment (tests/conformance/fixture.py).

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { inspect } from "node:util";

import {
  ConfigError,
  configFromEnv,
  Driver,
  names,
  NatsUnavailable,
  parseRoster,
  PermissionDenied,
  TricksError,
  UnknownTag,
  WaitTimeout,
} from "../src/index.js";
import { startExperiment, startProxy } from "../testing/harness.js";

const SECRET = "s3cret-pod-password";

describe("config", () => {
  const base = {
    TAG: "server",
    REPLICAS: "6",
    POD_ID: "3",
    EXP_ID: "x-1",
    POD_IP: "127.0.0.5",
    TRICKS_NATS_URL: "nats://127.0.0.1:4222",
    TRICKS_NATS_USER: "u",
    TRICKS_NATS_PASSWORD: SECRET,
    TRICKS_PROTOCOL: "2",
  };

  test("reads every variable", () => {
    const config = configFromEnv(base);
    assert.deepEqual(config, {
      tag: "server",
      replicas: 6,
      podId: 3,
      experiment: "x-1",
      podIp: "127.0.0.5",
      natsUrl: "nats://127.0.0.1:4222",
      natsUser: "u",
    });
    assert.equal(config.natsPassword, SECRET);
  });

  test("the password is in no printable form of the config", () => {
    const config = configFromEnv(base);
    for (const shown of [
      inspect(config),
      inspect(config, { depth: Infinity, getters: true }),
      JSON.stringify(config),
      String(Object.entries(config)),
      `${config}`,
    ]) {
      assert.ok(!shown.includes(SECRET), shown);
    }
  });

  test("without a user there is no password", () => {
    const config = configFromEnv({ ...base, TRICKS_NATS_USER: "" });
    assert.equal(config.natsUser, undefined);
    assert.equal(config.natsPassword, undefined);
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
    [{ TRICKS_PROTOCOL: "1" }, /TRICKS_PROTOCOL is "1": this driver speaks protocol 2/],
    [{ TRICKS_PROTOCOL: "3" }, /speaks protocol 2/],
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

describe("rosters", () => {
  const encode = (/** @type {unknown} */ body) => new TextEncoder().encode(JSON.stringify(body));

  test("parsed as peers sorted by pod id, unknown fields ignored", () => {
    const body = {
      tag: "server",
      pods: [{ pod_id: 3, ip: "127.42.0.4", extra: 1 }, { pod_id: 0, ip: "127.42.0.1" }],
      generation: 7,
    };
    assert.deepEqual(parseRoster("server", encode(body)), [
      { tag: "server", pod_id: 0, ip: "127.42.0.1", name: "server-0" },
      { tag: "server", pod_id: 3, ip: "127.42.0.4", name: "server-3" },
    ]);
    assert.deepEqual(parseRoster("server", encode({ tag: "server", pods: [] })), []);
  });

  for (const body of [null, [], { tag: "x" }, { pods: [{ ip: "1" }] }, { pods: [{ pod_id: "1" }] }]) {
    test(`a malformed roster is null: ${JSON.stringify(body)}`, () => {
      assert.equal(parseRoster("x", encode(body)), null);
    });
  }
  test("a roster that is not JSON is null", () => {
    assert.equal(parseRoster("x", new TextEncoder().encode("{nope")), null);
  });
});

test("unreachable NATS is a clear error", async () => {
  const config = configFromEnv({
    TAG: "a", REPLICAS: "1", POD_ID: "0", EXP_ID: "e", TRICKS_NATS_URL: "nats://127.0.0.1:1",
  });
  // a short ride-out budget (default 20 s): the server never comes
  await assert.rejects(Driver.connect(config, { recoveryMs: 300 }), (err) => {
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
  const driver = async (tag = "t", podId = 0, replicas = 1, env = {}) => {
    const d = await Driver.connect(configFromEnv({ ...ex.env(tag, podId, replicas), ...env }));
    open.push(d);
    return d;
  };
  /**
   * `err` is a `kind` (for TricksError: of no more specific kind) and says `message`.
   * @param {unknown} err @param {typeof TricksError} kind @param {RegExp} message
   */
  const failedWith = (err, kind, message) => {
    assert.ok(err instanceof kind, String(err));
    for (const other of [ConfigError, NatsUnavailable, WaitTimeout, PermissionDenied, UnknownTag]) {
      if (other !== kind) assert.ok(!(err instanceof other), String(err));
    }
    assert.match(err.message, message);
    return true;
  };

  before(async () => {
    ex = await startExperiment("jsdriver");
  });
  after(async () => {
    await Promise.all(open.map((d) => d.close()));
    await ex?.close();
  });

  test("wrong credentials are refused clearly, at once", async () => {
    const env = { ...ex.env(), TRICKS_NATS_PASSWORD: "wrong" };
    // the default ride-out budget: refused credentials must not be retried
    await assert.rejects(Driver.connect(configFromEnv(env)), (err) => {
      assert.ok(err instanceof NatsUnavailable);
      assert.match(err.message, /credentials refused/);
      return true;
    });
  });

  test("connecting rides out a server that refuses connections for a while", async () => {
    const proxy = await startProxy(ex.server.port);
    try {
      proxy.hold(); // connections are refused from here on
      const refused = proxy.refused();
      const connecting = driver("t", 0, 1, { TRICKS_NATS_URL: proxy.url });
      await refused; // the first attempt failed
      proxy.release();
      const d = await connecting;
      assert.equal(await d.count("never-registered"), 0);
    } finally {
      await proxy.close();
    }
  });

  test("the password is in no printable form of a driver", async () => {
    const d = await driver();
    const secret = ex.server.pod.password;
    assert.equal(d.config.natsPassword, secret);
    for (const shown of [
      inspect(d.config),
      JSON.stringify(d.config),
      inspect(d),
      inspect(d, { depth: 8 }),
      JSON.stringify(d),
    ]) {
      assert.ok(!shown.includes(secret), "the password is shown");
    }
  });

  test("registerEvent counts and returns the new total", async () => {
    const d = await driver();
    assert.equal(await d.count("ready"), 0);
    assert.equal(await d.registerEvent("ready"), 1);
    assert.equal(await d.registerEvent("ready"), 2);
    assert.equal(await d.count("ready"), 2);
    assert.equal(await ex.count("ready"), 2);
  });

  test("a retried registration (same message id) counts once", async () => {
    const d = await driver();
    const id = `${ex.exp}.t-0.retry.abc`;
    assert.equal(await d.increment("retry", id), 1);
    assert.equal(await d.increment("retry", id), 1); // the retry reports the original total
    assert.equal(await d.registerEvent("retry"), 2);
    assert.equal(await d.count("retry"), 2);
  });

  test("a registration the coordinator refuses fails with its reason", async () => {
    const d = await driver();
    const id = `${ex.exp}.t-0.long.${"x".repeat(200)}`; // longer than 200 characters
    await assert.rejects(d.increment("long", id), (err) =>
      failedWith(err, TricksError, /register event "long" refused: ./));
    assert.equal(await d.count("long"), 0);
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

  test("a notification that does not state the count does not release waitEvent", async () => {
    // Only the coordinator may publish notifications (the pods' permissions), and a waiter
    // takes the count a well-formed one states. Garbage there (sent by the coordinator's
    // unrestricted credentials) never releases: the waiter reads the count and waits on.
    const waiter = await driver("a", 1);
    const other = await driver("b", 5);
    const admin = await ex.admin();
    try {
      let settled = false;
      const waiting = waiter.waitEvent("forged", 3).finally(() => {
        settled = true;
      });
      await waiter.nc.flush(); // waitEvent subscribed before it yielded: the server has it
      for (const body of [
        "\xff not json",
        '{"event":"other","value":3}',
        '{"event":"forged","value":2}',
        '{"event":"forged"}',
      ]) {
        admin.publish(names.reachedSubject(ex.exp, "forged", 3), body);
        await admin.flush();
        // Queued to the waiter before this PONG: it has seen it once this returns, and a
        // round trip later it has read the count (0) and waits again.
        await waiter.nc.flush();
        assert.equal(await waiter.count("forged"), 0);
        assert.equal(settled, false, body);
      }
      for (let i = 0; i < 3; i += 1) await other.registerEvent("forged"); // the real ones
      assert.equal(await waiting, 3);
    } finally {
      await admin.close();
    }
  });

  test("a notification that states the count ends the wait without another read", async () => {
    const waiter = await driver("a", 1);
    const admin = await ex.admin();
    try {
      const waiting = waiter.waitEvent("told", 2);
      await waiter.nc.flush();
      // the coordinator's credentials: what it states is taken (the count itself is 0 here)
      admin.publish(names.reachedSubject(ex.exp, "told", 2), '{"event":"told","value":7}');
      assert.equal(await waiting, 7);
    } finally {
      await admin.close();
    }
  });

  test("barrier registers once and releases everyone at the count", async () => {
    const pods = await Promise.all([0, 1, 2].map((i) => driver("p", i)));
    const reached = await Promise.all(pods.map((d) => d.barrier("all-in", 3, { timeout: 60 })));
    assert.deepEqual(reached, [3, 3, 3]);
    assert.equal(await pods[0].count("all-in"), 3);
    await assert.rejects(pods[0].barrier("lonely", 2, { timeout: 0.5 }), (err) => {
      assert.ok(err instanceof WaitTimeout);
      assert.match(err.message, /"lonely" to reach 2 \(it is 1\)/);
      return true;
    });
    await assert.rejects(pods[0].barrier("bad name", 1), TricksError);
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

  test("close() during a pending waitEvent rejects it with a TricksError", async () => {
    const d = await Driver.connect(configFromEnv(ex.env("z", 0)));
    // the outcomes are taken (handled) before close() rejects them
    const pending = Promise.allSettled([d.waitEvent("never", 1), d.discover("nobody", 1)]);
    await d.nc.flush();
    await d.close();
    for (const outcome of await pending) {
      assert.equal(outcome.status, "rejected");
      failedWith(outcome.status === "rejected" && outcome.reason, TricksError, /driver is closed/);
    }
    await d.close(); // again: harmless
    for (const call of [
      () => d.registerEvent("late"),
      () => d.count("late"),
      () => d.waitEvent("late", 1),
      () => d.discover("late"),
    ]) {
      await assert.rejects(call(), (err) => failedWith(err, TricksError, /the driver is closed/));
    }
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
      peers.map((p) => [p.tag, p.pod_id, p.ip, p.name]),
      [
        ["server", 0, "127.0.0.10", "server-0"],
        ["server", 1, "127.0.0.11", "server-1"],
        ["server", 2, "127.0.0.12", "server-2"],
      ],
    );
    await ex.podGone("server", 1);
    assert.deepEqual((await d.discover("server")).map((p) => p.pod_id), [0, 2]);
    assert.deepEqual((await d.discover("server", 0)).map((p) => p.pod_id), [0, 2]);
    assert.deepEqual((await d.discover("other", 1, { timeout: 5 })).map((p) => p.ip), [
      "127.0.0.99",
    ]);
  });

  test("a blocking discover of a whole tag ends with its notification's roster", async () => {
    // PROTOCOL.md 6.4: once all the tag's pods run, the start notification carries the
    // roster; the driver returns it without reading the roster again.
    const d = await driver("c", 0);
    const admin = await ex.admin();
    try {
      const pods = names.podsStream(ex.exp);
      const spy = admin.subscribe(`$JS.API.DIRECT.GET.${pods}.>`)[Symbol.asyncIterator]();
      await admin.flush();
      await ex.expect("whole", 2);
      const blocked = d.discover("whole", 2, { timeout: 30 });
      const firstLook = (await spy.next()).value; // the roster, empty: it waits
      await ex.runPod("whole", 0, "127.0.0.20");
      await ex.runPod("whole", 1, "127.0.0.21");
      assert.deepEqual((await blocked).map((p) => p.ip), ["127.0.0.20", "127.0.0.21"]);
      await admin.request(`$JS.API.DIRECT.GET.${pods}.${names.rosterSubject(ex.exp, "whole")}`);
      const after = (await spy.next()).value; // ours: the driver read nothing more
      const driverInbox = firstLook.reply.slice(0, firstLook.reply.lastIndexOf("."));
      assert.ok(!after.reply.startsWith(driverInbox), after.reply);
    } finally {
      await admin.close();
    }
  });

  test("discover of a tag the experiment lacks (TRICKS_TAGS) is said at once", async () => {
    const d = await driver("c", 0, 1, { TRICKS_TAGS: "lone,client" });
    assert.deepEqual(d.config.tags, ["lone", "client"]);
    await ex.runPod("lone", 0, "127.0.0.20");
    assert.deepEqual((await d.discover("lone")).map((p) => p.pod_id), [0]);
    for (const call of [() => d.discover("loan"), () => d.discover("loan", 3)]) {
      await assert.rejects(call(), (err) =>
        failedWith(
          err,
          UnknownTag,
          new RegExp(`^no tag 'loan' in experiment ${d.config.experiment} \\(its tags: lone, client\\)$`),
        ),
      );
    }
  });

  test("a blocking discover waits for new pods, not for pods that stopped", async () => {
    const d = await driver("c", 1);
    await ex.runPod("flaky", 0, "127.0.0.50");
    await ex.runPod("flaky", 1, "127.0.0.51");
    await ex.podGone("flaky", 1);
    const blocked = d.discover("flaky", 2);
    await ex.runPod("flaky", 2, "127.0.0.52");
    assert.deepEqual((await blocked).map((p) => p.pod_id), [0, 2]);
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

  test("a malformed roster reads as no pods", async () => {
    const d = await driver();
    const admin = await ex.admin();
    try {
      await admin.request(names.rosterSubject(ex.exp, "garbled"), "not a roster");
    } finally {
      await admin.close();
    }
    assert.deepEqual(await d.discover("garbled"), []);
  });

  test("bad names are refused before the wire", async () => {
    const d = await driver();
    await assert.rejects(d.registerEvent("has space"), /bad event name/);
    await assert.rejects(d.discover("a.b"), /bad tag/);
    await assert.rejects(d.waitEvent("x>", 1), /bad event name/);
  });

  test("credentials of another experiment: a permissions violation, at once", async () => {
    const other = "other-20261122-000000-beef";
    const stranger = await driver("t", 0, 1, { EXP_ID: other });
    /** @type {[string, () => Promise<unknown>][]} */
    const calls = [
      ["registerEvent", () => stranger.registerEvent("x")],
      ["count", () => stranger.count("x")],
      ["waitEvent", () => stranger.waitEvent("x", 1)],
      ["discover", () => stranger.discover("t")],
      ["discover with a count", () => stranger.discover("t", 1)],
    ];
    for (const [name, call] of calls) {
      await assert.rejects(call(), (err) => {
        assert.ok(err instanceof PermissionDenied, `${name}: ${err}`);
        return failedWith(
          err,
          PermissionDenied,
          new RegExp(
            `^NATS refused \\S+: these credentials do not reach experiment "${other}" ` +
              "\\(permissions violation\\)$",
          ),
        );
      });
    }
  });
});
