// The conformance scenario in JavaScript (same steps as scenario.py), on drivers/js.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";

import { Driver, names, WaitTimeout } from "../../drivers/js/src/index.js";

const tricks = await Driver.connect();
try {
  const me = tricks.config;
  assert.equal(me.tag, process.env.TAG);
  assert.equal(me.experiment, process.env.EXP_ID);
  assert.ok(me.podId >= 0 && me.podId < me.replicas);
  assert.equal(me.podIp, process.env.POD_IP);
  console.log(`config ${me.tag} ${me.podId}/${me.replicas} ${me.experiment} ${me.podIp}`);

  const peers = await tricks.discover(me.tag, me.replicas, { timeout: 60 });
  assert.deepEqual(
    peers.map((p) => p.pod_id).slice(0, me.replicas),
    [...Array(me.replicas).keys()],
  );
  assert.ok(peers.some((p) => p.pod_id === me.podId && p.ip === me.podIp));
  console.log(`discovered ${peers.length}`);

  const id = names.msgId(me.experiment, tricks.pod, "hello", randomBytes(8).toString("hex"));
  const first = await tricks.increment("hello", id);
  const again = await tricks.increment("hello", id);
  assert.equal(again, first);
  const plain = await tricks.registerEvent("hello");
  assert.ok(plain > first);
  console.log(`registered ${first} ${again} ${plain}`);

  // PROTOCOL.md 9: a pod may not write a count, a notification or a stored message; the
  // server refuses each with a permissions violation (nats.js fails the request with it).
  const exp = me.experiment;
  let refused = 0;
  for (const subject of [
    `$KV.tricks-${exp}-counts.hello`,
    `tricks.${exp}.reached.hello.1000`,
    `tricks.${exp}.stored.greeting`,
  ]) {
    try {
      await tricks.nc.request(subject, '{"event":"hello","value":1000}', { timeout: 20000 });
    } catch (err) {
      if (/permissions? violation/i.test(String(err instanceof Error ? err.message : err))) {
        refused += 1;
      } else throw err;
    }
  }
  console.log(`forgeries refused ${refused}`);

  const total = Number(process.env.HELLO_TOTAL ?? 2 * me.replicas);
  const reached = await tricks.waitEvent("hello", total, { timeout: 60 });
  assert.ok(reached >= total);
  console.log(`waited ${reached}`);

  for (const k of [1, 2]) tricks.record("conformance_ms", me.podId * 10 + k, { lang: "javascript" });
  tricks.record("conformance_ms", me.podId * 10 + 3);
  await tricks.flush();
  console.log("recorded 3");

  const mine = await tricks.publish("greeting", { tag: me.tag, pod_id: me.podId });
  const greetTotal = Number(process.env.GREET_TOTAL ?? me.replicas);
  const greetings = tricks.subscribe("greeting");
  const greeted = await greetings.take(greetTotal, { timeout: 60 });
  await greetings.close();
  assert.ok(greeted.every((m, i) => i === 0 || m.seq > greeted[i - 1].seq));
  assert.ok(greeted.some((m) => {
    const body = m.isJson ? m.json() : null;
    return m.seq === mine && m.pod === `${process.env.TAG}-${process.env.POD_ID}` &&
      body?.tag === me.tag && body?.pod_id === me.podId;
  }));
  console.log(`exchanged ${greeted.length}`);

  await assert.rejects(tricks.waitEvent("never", 1, { timeout: 0.5 }), (err) => {
    assert.ok(err instanceof WaitTimeout);
    console.log(`timed out as expected: ${err.message}`);
    return true;
  });
  console.log("scenario ok");
} finally {
  await tricks.close();
}
