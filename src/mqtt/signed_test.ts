import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { X509Bundle, X509BundleSet } from "../spiffe/bundle.ts";
import { StaticX509Source } from "../spiffe/source.ts";
import { parseX509SvidPem } from "../spiffe/svid.ts";
import { FakeWorkloadApi } from "../spiffe/testing/fake_workload_api.ts";
import { countSignatureChecks, mutuallyIssuingChain, TestCa } from "../spiffe/testing/test_ca.ts";
import { X509Source } from "../spiffe/workload/x509_source.ts";
import { waitFor } from "../process/mod.ts";
import { downTopic } from "../fleet/topics.ts";
import { fleetServerSpiffeId, robotSpiffeId } from "../fleet/ids.ts";
import {
  type CancelMessage,
  encode,
  MAX_PAYLOAD_BYTES,
  PROTOCOL_VERSION,
  type TaskMessage,
} from "./messages.ts";
import {
  checkDown,
  type DownCheckOptions,
  MAX_TASK_TTL_SECONDS,
  replayWindowEnd,
  SIGNED_TYP,
  TaskSigner,
  X5cChainCache,
} from "./signed.ts";

const TD = "k8s4r.test";
const SERVER_ID = fleetServerSpiffeId(TD);
const ROBOT = "robot-001";
const TOPIC = downTopic(ROBOT, "task");

const ca = TestCa.create({ trustDomain: TD });
const bundles = new X509BundleSet([X509Bundle.fromPem(TD, ca.rootPem)]);

function svidOf(issued: ReturnType<TestCa["issue"]>) {
  return parseX509SvidPem(issued.chainPem, issued.keyPem);
}
const serverSvid = svidOf(ca.issue({ spiffeId: SERVER_ID }));
const signer = new TaskSigner(new StaticX509Source(serverSvid, bundles));

function task(more: Partial<TaskMessage> = {}): TaskMessage {
  const now = Date.now();
  return {
    v: PROTOCOL_VERSION,
    type: "task",
    robotId: ROBOT,
    ts: new Date(now).toISOString(),
    id: `t-${crypto.randomUUID()}`,
    command: ["echo", "hi"],
    env: {},
    timeoutSeconds: 30,
    createdAt: new Date(now).toISOString(),
    expiresAt: new Date(now + 300_000).toISOString(),
    ...more,
  };
}

function cancel(taskId: string, more: Partial<CancelMessage> = {}): CancelMessage {
  return {
    v: PROTOCOL_VERSION,
    type: "cancel",
    robotId: ROBOT,
    ts: new Date().toISOString(),
    taskId,
    ...more,
  };
}

const opts = (more: Partial<DownCheckOptions> = {}): DownCheckOptions => ({
  robotId: ROBOT,
  bundles,
  signerId: SERVER_ID,
  ...more,
});

function refusal(v: ReturnType<typeof checkDown>) {
  assert.equal(v.ok, false, JSON.stringify(v));
  assert.ok(!v.ok && v.kind === "refused", JSON.stringify(v));
  return v as Extract<typeof v, { kind: "refused" }>;
}

Deno.test("signed: a task signed by the fleet server for this robot is accepted (control)", () => {
  const t = task();
  const v = checkDown(TOPIC, signer.sign(t), opts());
  assert.ok(v.ok, JSON.stringify(v));
  assert.deepEqual(v.message, t);
  assert.equal(v.signer, SERVER_ID);
  // The payload is a JWS whose payload is exactly encode(task).
  const jws = JSON.parse(new TextDecoder().decode(signer.sign(t)));
  assert.deepEqual(Object.keys(jws).sort(), ["payload", "protected", "signature"]);
  assert.deepEqual(new Uint8Array(Buffer.from(jws.payload, "base64url")), encode(t));
  const header = JSON.parse(Buffer.from(jws.protected, "base64url").toString());
  assert.equal(header.alg, "ES256");
  assert.equal(header.typ, SIGNED_TYP.task);
  assert.equal(header.x5c.length, 1);
});

Deno.test("signed: an unsigned task (forged with the broker password) is bad-signature", () => {
  const t = task();
  const r = refusal(checkDown(TOPIC, encode(t), opts()));
  assert.equal(r.reason, "bad-signature");
  assert.equal(r.taskId, t.id);
  assert.match(
    r.error,
    /^bad-signature: unsigned task: this robot runs only what the fleet server/,
  );
  // Positive control: the same task signed by the fleet server is accepted.
  const v = checkDown(TOPIC, signer.sign(t), opts());
  assert.ok(v.ok && v.signer === SERVER_ID);
});

Deno.test("signed: a task signed by robot-002's SVID is bad-signature", () => {
  const robot2 = svidOf(
    ca.issue({ spiffeId: robotSpiffeId(TD, "robot-002"), dnsNames: ["robot-002"] }),
  );
  const t = task();
  const r = refusal(
    checkDown(TOPIC, new TaskSigner(new StaticX509Source(robot2, bundles)).sign(t), opts()),
  );
  assert.equal(r.reason, "bad-signature");
  assert.equal(
    r.error,
    `bad-signature: signed by ${
      robotSpiffeId(TD, "robot-002")
    }, expected the fleet server ${SERVER_ID}`,
  );
  assert.equal(r.taskId, t.id);
});

Deno.test("signed: the fleet-server ID from a CA outside the robot's bundle is bad-signature", () => {
  const rogue = TestCa.create({ trustDomain: TD });
  const s = new TaskSigner(
    new StaticX509Source(svidOf(rogue.issue({ spiffeId: SERVER_ID })), bundles),
  );
  const r = refusal(checkDown(TOPIC, s.sign(task()), opts()));
  assert.equal(r.reason, "bad-signature");
  assert.match(
    r.error,
    /chain does not verify: leaf certificate .* is not issued under the X.509 bundle/,
  );
});

Deno.test("signed: a tampered payload is bad-signature", () => {
  const signed = JSON.parse(new TextDecoder().decode(signer.sign(task())));
  const evil = task({ command: ["rm", "-rf", "/"] });
  signed.payload = Buffer.from(encode(evil)).toString("base64url");
  const r = refusal(checkDown(TOPIC, new TextEncoder().encode(JSON.stringify(signed)), opts()));
  assert.equal(r.reason, "bad-signature");
  assert.match(r.error, /signature does not verify/);
});

Deno.test("signed: a task for robot-002 on robot-001's topic is wrong-robot", () => {
  const t = task({ robotId: "robot-002" });
  const r = refusal(checkDown(TOPIC, signer.sign(t), opts()));
  assert.equal(r.reason, "wrong-robot");
  assert.equal(r.error, "wrong-robot: addressed to robot-002, this is robot-001");
});

Deno.test("signed: expired, future and too-old tasks are refused; the skew allowance holds", () => {
  const now = Date.now();
  const iso = (ms: number) => new Date(ms).toISOString();
  const exp = refusal(
    checkDown(
      TOPIC,
      signer.sign(task({ createdAt: iso(now - 60_000), expiresAt: iso(now - 1000) })),
      opts(),
    ),
  );
  assert.equal(exp.reason, "expired");
  assert.match(exp.error, /^expired: arrived at .*, after its expiresAt /);
  // createdAt 4 minutes ahead: inside the 300 s skew allowance.
  assert.ok(checkDown(TOPIC, signer.sign(task({ createdAt: iso(now + 240_000) })), opts()).ok);
  const future = refusal(
    checkDown(TOPIC, signer.sign(task({ createdAt: iso(now + 600_000) })), opts()),
  );
  assert.equal(future.reason, "replay");
  assert.match(future.error, /createdAt .* is in the future .*clock skew allowed: 300 s/);
  const old = task({
    createdAt: iso(now - (MAX_TASK_TTL_SECONDS + 400) * 1000),
    expiresAt: undefined,
  });
  delete old.expiresAt;
  const tooOld = refusal(checkDown(TOPIC, signer.sign(old), opts()));
  assert.equal(tooOld.reason, "replay");
  assert.match(tooOld.error, /is older than the window of 604800 s \+ 300 s/);
  // Inside the window by the clock, but created no later than what the id store has forgotten
  // (the clock went back, or the window was raised): it cannot vouch for the id.
  const recent = task({ createdAt: iso(now - 3600_000) });
  delete recent.expiresAt;
  assert.ok(checkDown(TOPIC, signer.sign(recent), opts()).ok);
  assert.ok(
    checkDown(TOPIC, signer.sign(recent), opts({ forgottenUpTo: now - 3600_001 })).ok,
    "created after the bound (control)",
  );
  const back = refusal(
    checkDown(TOPIC, signer.sign(recent), opts({ forgottenUpTo: now - 3600_000 })),
  );
  assert.equal(back.reason, "replay");
  assert.match(back.error, /up to which this robot has forgotten the ids it saw/);
  // The expiry is the clock's: `expired: arrived at <now>` is after the expiresAt it names.
  const m = /arrived at (\S+), after its expiresAt (\S+)$/.exec(exp.error);
  assert.ok(m && Date.parse(m[1]) > Date.parse(m[2]), exp.error);
  // The window the id store must keep ids for.
  assert.equal(
    replayWindowEnd(recent),
    Date.parse(recent.createdAt) + (MAX_TASK_TTL_SECONDS + 300) * 1000,
  );
});

Deno.test("signed: cancels are verified the same way; kinds cannot be swapped", () => {
  const c = cancel("t-1", { reason: "operator" });
  const ct = downTopic(ROBOT, "cancel");
  const v = checkDown(ct, signer.sign(c), opts());
  assert.ok(v.ok && v.message.type === "cancel", JSON.stringify(v));
  const unsigned = refusal(checkDown(ct, encode(c), opts()));
  assert.equal(unsigned.reason, "bad-signature");
  assert.equal(unsigned.type, "cancel");
  assert.equal(unsigned.taskId, "t-1");
  // A correctly signed cancel published on the task topic (and the reverse) is dropped.
  const swapped = checkDown(TOPIC, signer.sign(c), opts());
  assert.ok(!swapped.ok && swapped.kind === "malformed" && swapped.reason === "bad-schema");
  assert.match(swapped.error, /typ "k8s4r-cancel" on a task topic/);
  const old = refusal(
    checkDown(
      ct,
      signer.sign(cancel("t-1", { ts: new Date(Date.now() + 3600_000).toISOString() })),
      opts(),
    ),
  );
  assert.equal(old.reason, "replay");
});

Deno.test("signed: not a message at all is malformed, never refused", () => {
  const m = (p: Uint8Array) => {
    const v = checkDown(TOPIC, p, opts());
    assert.ok(!v.ok && v.kind === "malformed", JSON.stringify(v));
    return v.reason;
  };
  assert.equal(m(new TextEncoder().encode("{")), "bad-json");
  assert.equal(m(new Uint8Array(MAX_PAYLOAD_BYTES + 1)), "too-large");
  assert.equal(m(signer.sign(task({ command: [] as unknown as string[] }))), "bad-schema");
  const other = checkDown(downTopic("robot-002", "task"), signer.sign(task()), opts());
  assert.ok(!other.ok && other.kind === "malformed" && other.reason === "robot-id-mismatch");
  // A JWS that is structurally broken is a refusal (someone tried): bad-signature.
  const broken = refusal(
    checkDown(
      TOPIC,
      new TextEncoder().encode('{"protected":"!","signature":"x","payload":"x"}'),
      opts(),
    ),
  );
  assert.equal(broken.reason, "bad-signature");
});

Deno.test("TaskSigner: refuses to produce a payload robots would drop as too large", () => {
  const big = task({ env: { BIG: "x".repeat(200 * 1024) } });
  assert.throws(
    () => signer.sign(big),
    /signed task is \d+ bytes, over the 262144-byte payload limit/,
  );
  const fits = task({ env: { BIG: "x".repeat(150 * 1024) } });
  assert.ok(checkDown(TOPIC, signer.sign(fits), opts()).ok);
});

Deno.test("TaskSigner and checkDown follow rotation through the Workload API (fake)", async () => {
  // The server's source (its SVID rotates) and the robot's source (its bundle rotates) both
  // come from a fake Workload API, as they come from SPIRE agents in production.
  const server = await FakeWorkloadApi.start();
  const robot = await FakeWorkloadApi.start();
  let serverSrc: X509Source | undefined;
  let robotSrc: X509Source | undefined;
  try {
    const first = ca.issue({ spiffeId: SERVER_ID });
    server.setX509Svids([first], { [TD]: ca.rootDer });
    robot.setX509Svids([ca.issue({ spiffeId: robotSpiffeId(TD, ROBOT) })], { [TD]: ca.rootDer });
    serverSrc = await X509Source.create({ address: server.address, timeoutMs: 5000 });
    robotSrc = await X509Source.create({ address: robot.address, timeoutMs: 5000 });
    const s = new TaskSigner(serverSrc);
    const cache = new X5cChainCache();
    const o = opts({ bundles: robotSrc, cache });
    assert.ok(checkDown(TOPIC, s.sign(task()), o).ok);

    // The server's SVID rotates: the next message carries and is signed by the new one.
    const rotated = ca.issue({ spiffeId: SERVER_ID });
    server.setX509Svids([rotated]);
    await waitFor(
      () => serverSrc!.getX509Svid().serialNumber === rotated.certificate.serialNumber,
      {
        timeoutMs: 5000,
        what: "the server's rotated SVID",
      },
    );
    const p = s.sign(task());
    const x5c = JSON.parse(
      Buffer.from(JSON.parse(new TextDecoder().decode(p)).protected, "base64url").toString(),
    ).x5c;
    assert.equal(x5c[0], Buffer.from(rotated.certificate.raw).toString("base64"));
    assert.ok(checkDown(TOPIC, p, o).ok);

    // The CA rotates: the robot's bundle now holds only the new CA. A message signed under the
    // old CA is refused (even though its chain was cached); one under the new CA is accepted.
    const ca2 = TestCa.create({ trustDomain: TD });
    robot.setBundles({ [TD]: ca2.rootDer });
    await waitFor(() => robotSrc!.getX509BundleForTrustDomain(TD)?.toPem() === ca2.rootPem, {
      timeoutMs: 5000,
      what: "the robot's rotated bundle",
    });
    assert.equal(refusal(checkDown(TOPIC, s.sign(task()), o)).reason, "bad-signature");
    server.setX509Svids([ca2.issue({ spiffeId: SERVER_ID })], { [TD]: ca2.rootDer });
    await waitFor(() => serverSrc!.getX509BundleForTrustDomain(TD)?.toPem() === ca2.rootPem, {
      timeoutMs: 5000,
      what: "the server's SVID under the new CA",
    });
    assert.ok(checkDown(TOPIC, s.sign(task()), o).ok);
  } finally {
    await serverSrc?.close();
    await robotSrc?.close();
    await server.close();
    await robot.close();
  }
});

Deno.test("TaskSigner: refuses to sign with an SVID that is not valid now (robots would refuse it)", () => {
  const src = new StaticX509Source(serverSvid, bundles);
  const at = (ms: number) => new TaskSigner(src, () => new Date(ms));
  const t = task();
  // Control: now, inside the SVID's validity, it signs and a robot accepts it.
  const ok = at(Date.now()).sign(t);
  assert.equal(checkDown(TOPIC, ok, opts()).ok, true);
  assert.throws(
    () => at(serverSvid.notAfter.getTime() + 1000).sign(t),
    /the signing SVID spiffe:\/\/k8s4r\.test\/fleet-server is not valid now .*waiting for a new one/,
  );
  assert.throws(() => at(serverSvid.notBefore.getTime() - 1000).sign(t), /is not valid now/);
});

Deno.test("checkDown: a task signed under 7 CAs that all issue each other is refused within 64 signature checks, again in none", () => {
  const hostile = mutuallyIssuingChain({ spiffeId: SERVER_ID, count: 7 });
  const forger = new TaskSigner(
    new StaticX509Source(parseX509SvidPem(hostile.chainPem, hostile.keyPem), bundles),
  );
  const payload = forger.sign(task());
  const cache = new X5cChainCache();
  const first = countSignatureChecks(() => checkDown(TOPIC, payload, opts({ cache })));
  assert.equal(refusal(first.result!).reason, "bad-signature");
  assert.ok(first.checks <= 64, `${first.checks} signature checks`);
  const again = countSignatureChecks(() => checkDown(TOPIC, payload, opts({ cache })));
  assert.equal(refusal(again.result!).reason, "bad-signature");
  assert.equal(again.checks, 0);
  // Control: the real server's task, same cache.
  assert.ok(checkDown(TOPIC, signer.sign(task()), opts({ cache })).ok);
});
