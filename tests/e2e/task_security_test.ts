/**
 * End to end, signed tasks and the task sandbox (issue 11) on a real stack: `devenv start
 * --robots 2 --broker native` as root (real SPIRE, real Mosquitto, the real CLI), so the fleet
 * server signs every task and cancel with its own SVID (spiffe://<td>/fleet-server) and the
 * robots run tasks as devenv's task user `k8s4r-task`. The security matrix, each attack with a
 * positive control on the same path:
 *
 * - a task forged through 1883 with the broker password: refused (bad-signature), never runs;
 *   the forged report cannot touch a real task of the same id;
 * - a task signed by robot-002's real SVID: refused (bad-signature);
 * - a real signed task replayed byte for byte: refused (replay); the same bytes after their
 *   expiresAt: refused (expired); it ran once;
 * - `PATH`, `LD_PRELOAD`, `TAR_OPTIONS` or `HOME` in a task's env: refused, nothing runs (a fake
 *   `echo` on that PATH never runs); TZ (in the default tasks.allowEnv) works;
 * - a task calling the Workload API: PermissionDenied (the test itself, the agents' uid, gets
 *   robot-001's SVID with the same command);
 * - `k8s4r task cancel` of a running `sleep 600`: gone within 2 s, the task ends `cancelled`;
 *   an unsigned cancel through 1883 leaves it running;
 * - a flooding robot against the broker's byte limit (max_queued_bytes) while the server is
 *   away: its session keeps at most the limit; a small flood arrives whole.
 *
 * Whether a task ran is told by a file it writes, not by its report.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import type mqtt from "mqtt";
import { robotLayout } from "../../src/devenv/layout.ts";
import { downTopic, upTopic } from "../../src/fleet/topics.ts";
import { fleetServerSpiffeId } from "../../src/fleet/ids.ts";
import { encode, PROTOCOL_VERSION, type TaskMessage } from "../../src/mqtt/messages.ts";
import { TaskSigner } from "../../src/mqtt/signed.ts";
import { DEFAULT_MAX_QUEUED_BYTES } from "../../src/mqtt/broker_config.ts";
import { parseJws, verifyJws } from "../../src/spiffe/jws.ts";
import { X509Bundle, X509BundleSet } from "../../src/spiffe/bundle.ts";
import { StaticX509Source } from "../../src/spiffe/source.ts";
import { parseX509SvidPem } from "../../src/spiffe/svid.ts";
import { TaskJournal } from "../../src/agent/task_journal.ts";
import { DEFAULT_TASK_USER, lookupUser } from "../../src/agent/task_user.ts";
import { processStartTime, realRunner, stopPidFile, waitFor } from "../../src/process/mod.ts";
import { E2eStack, metric, SPARE_ROBOT, SPIRE_BIN_DIR, TRUST_DOMAIN } from "./stack.ts";

const stack = await E2eStack.create({ heartbeatSeconds: 1 });
const e2e = stack.caseRegistrar("e2e task security: ");
const ROBOT = "robot-001";
const nonce = () => crypto.randomUUID().slice(0, 8);

// Where tasks (as k8s4r-task) leave their marks, and the Workload API client they may run.
const work = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-e2e-ts-" });
await Deno.chmod(work, 0o755);
const marks = `${work}/marks`;
await Deno.mkdir(marks);
await Deno.chmod(marks, 0o777);
const exists = (p: string) => {
  try {
    Deno.statSync(p);
    return true;
  } catch {
    return false;
  }
};
const lines = (p: string) =>
  exists(p) ? Deno.readTextFileSync(p).split("\n").filter((l) => l).length : 0;

async function refusals(): Promise<Record<string, number>> {
  return (await stack.stats()).messages.refusals;
}

/** Waits until the server counted one more `refused` report with `reason` than `before`. */
async function refusalCounted(reason: string, before: Record<string, number>, n = 1) {
  let now: Record<string, number> = {};
  await waitFor(async () => {
    now = await refusals();
    return (now[reason] ?? 0) >= (before[reason] ?? 0) + n;
  }, { timeoutMs: 20_000, intervalMs: 100, what: `${n} more ${reason} refusal(s) at the server` })
    .catch((err) => {
      throw new Error(
        `${err.message}: before ${JSON.stringify(before)}, now ${JSON.stringify(now)}`,
      );
    });
}

function forged(id: string, command: string[], robotId = ROBOT): TaskMessage {
  const t = Date.now();
  return {
    v: PROTOCOL_VERSION,
    type: "task",
    robotId,
    ts: new Date(t).toISOString(),
    id,
    command,
    env: {},
    timeoutSeconds: 30,
    createdAt: new Date(t).toISOString(),
    expiresAt: new Date(t + 300_000).toISOString(),
  };
}

/** A client with the fleet server's broker password: the attacker of this file. */
let attacker: mqtt.MqttClient | undefined;
async function publish(kind: "task" | "cancel", payload: Uint8Array, robotId = ROBOT) {
  attacker ??= await stack.serverClient(`e2e-attacker-${nonce()}`);
  await attacker.publishAsync(downTopic(robotId, kind), Buffer.from(payload), { qos: 1 });
}

async function agentLog(): Promise<string> {
  return await Deno.readTextFile(stack.agentLogFile(ROBOT));
}

/** Positive control: a task through the API (signed by the server) runs and leaves its mark. */
async function controlRuns(label: string): Promise<string> {
  const mark = `${marks}/control-${label}`;
  const id = await stack.createTask(ROBOT, ["touch", mark]);
  const t = await stack.waitTask(id);
  assert.equal(t.state, "done", `control ${label}: ${JSON.stringify(t)}`);
  assert.ok(exists(mark), `control ${label}: the signed task did not run`);
  return id;
}

e2e("devenv start as root: the robots' tasks run as k8s4r-task", async () => {
  assert.equal(Deno.uid(), 0, "devenv creates the task user: run this suite as root (CI does)");
  const r = await stack.start();
  assert.match(r.stdout, /Stack ready in/);
  stack.started = true;
  assert.match(r.stdout, new RegExp(`task-user.*${DEFAULT_TASK_USER} \\(uid \\d+`));
  const id = await stack.createTask(ROBOT, ["id", "-un"]);
  const t = await stack.waitTask(id);
  assert.equal(t.state, "done", JSON.stringify(t));
  assert.equal(t.stdout, `${DEFAULT_TASK_USER}\n`);
  assert.match(await agentLog(), new RegExp(`tasks\\.user .*user=${DEFAULT_TASK_USER}`));
});

e2e(
  "a task forged through 1883 with the broker password is refused (bad-signature), never runs",
  async () => {
    const real = await controlRuns("forge");
    const before = await refusals();
    const fresh = `forged-${nonce()}`;
    await publish("task", encode(forged(fresh, ["touch", `${marks}/forged`])));
    // The same with the id of the real task, done: its refusal must not touch that task.
    await publish("task", encode(forged(real, ["touch", `${marks}/forged-real-id`])));
    await refusalCounted("bad-signature", before, 2);
    assert.ok(!exists(`${marks}/forged`), "the forged task ran");
    assert.ok(!exists(`${marks}/forged-real-id`), "the forged task ran");
    const t = await stack.task(real);
    assert.equal(t.state, "done", "a forged task's refusal changed the real task");
    assert.match(await agentLog(), new RegExp(`task\\.refused task=${fresh} reason=bad-signature`));
    await controlRuns("forge-after");
  },
);

e2e("a task signed by robot-002's real SVID is refused (bad-signature)", async () => {
  const svid = await stack.fetchSvid("robot-002");
  const signer = new TaskSigner(
    new StaticX509Source(
      parseX509SvidPem(svid.cert, svid.key),
      new X509BundleSet([X509Bundle.fromPem(TRUST_DOMAIN, svid.ca)]),
    ),
  );
  const before = await refusals();
  const id = `by-robot-002-${nonce()}`;
  await publish("task", signer.sign(forged(id, ["touch", `${marks}/robot-002`])));
  await refusalCounted("bad-signature", before);
  assert.ok(!exists(`${marks}/robot-002`), "a task signed by robot-002 ran");
  assert.match(
    await agentLog(),
    new RegExp(
      `task=${id} reason=bad-signature.*signed by spiffe://${TRUST_DOMAIN}/robot/robot-002`,
    ),
  );
  await controlRuns("robot-002-after");
});

/** A real signed task of the server, captured on the wire, and the task it is. */
let captured: { id: string; payload: Uint8Array; expiresAt: string } | undefined;
const ranLog = `${marks}/replay.log`;

e2e("a real signed task replayed byte for byte is refused (replay); it ran once", async () => {
  const tap = await stack.serverClient(`e2e-tap-${nonce()}`);
  const got: Uint8Array[] = [];
  tap.on("message", (_t, p) => got.push(new Uint8Array(p)));
  await tap.subscribeAsync(downTopic(ROBOT, "task"), { qos: 1 });
  try {
    const id = await stack.createTask(ROBOT, ["sh", "-c", `echo ran >> ${ranLog}`], 30, {
      ttlSeconds: 8,
    });
    const t = await stack.waitTask(id);
    assert.equal(t.state, "done", JSON.stringify(t));
    assert.equal(lines(ranLog), 1);
    await waitFor(() => got.length > 0, { timeoutMs: 10_000, what: "the task on the wire" });
    // What went out is a JWS of the fleet server over the exact task.
    const jws = parseJws(JSON.parse(new TextDecoder().decode(got[0])));
    const svid = await stack.fetchSvid(ROBOT);
    const v = verifyJws(jws, new X509BundleSet([X509Bundle.fromPem(TRUST_DOMAIN, svid.ca)]));
    assert.equal(v.signer.toString(), fleetServerSpiffeId(TRUST_DOMAIN));
    const msg = JSON.parse(new TextDecoder().decode(v.payload)) as TaskMessage;
    assert.equal(msg.id, id);
    captured = { id, payload: got[0], expiresAt: msg.expiresAt! };
  } finally {
    await tap.endAsync(true);
  }
  const before = await refusals();
  await publish("task", captured.payload);
  await refusalCounted("replay", before);
  assert.equal(lines(ranLog), 1, "the replayed task ran again");
  assert.equal((await stack.task(captured.id)).state, "done");
  assert.match(await agentLog(), new RegExp(`task\\.refused task=${captured.id} reason=replay`));
});

e2e("the same signed bytes after their expiresAt are refused (expired)", async () => {
  assert.ok(captured, "needs the replay case's captured task");
  const c = captured;
  // The robot's clock must be past the task's expiresAt (a probe of the clock, not a sleep).
  await waitFor(() => Date.now() > Date.parse(c.expiresAt) + 200, {
    timeoutMs: 20_000,
    intervalMs: 50,
    what: `the clock past ${c.expiresAt}`,
  });
  const before = await refusals();
  const stale = (await stack.stats()).messages.staleTaskReports;
  await publish("task", c.payload);
  await refusalCounted("expired", before);
  assert.equal(lines(ranLog), 1, "the expired task ran");
  assert.equal((await stack.task(c.id)).state, "done", "a late copy's refusal changed the task");
  assert.equal((await stack.stats()).messages.staleTaskReports, stale + 1);
  assert.match(await agentLog(), new RegExp(`task\\.refused task=${c.id} reason=expired`));
  await controlRuns("expired-after");
});

e2e(
  "PATH, LD_PRELOAD, TAR_OPTIONS or HOME in a task's env: refused, nothing runs; TZ works",
  async () => {
    // A fake echo on the PATH the task asks for: it must never run.
    const evil = `${work}/evil`;
    await Deno.mkdir(evil);
    await Deno.writeTextFile(`${evil}/echo`, `#!/bin/sh\ntouch ${marks}/evil\n`);
    await Deno.chmod(evil, 0o755);
    await Deno.chmod(`${evil}/echo`, 0o755);
    // PATH and LD_PRELOAD can never be allowed; TAR_OPTIONS and HOME (git's fsmonitor) are not in
    // the default tasks.allowEnv (locale and time zone only).
    const envs: Record<string, string>[] = [
      { PATH: evil },
      { LD_PRELOAD: `${evil}/x.so` },
      { TAR_OPTIONS: `--checkpoint=1 --checkpoint-action=exec=touch\\ ${marks}/evil` },
      { HOME: evil },
    ];
    for (const env of envs) {
      const name = Object.keys(env)[0];
      const id = await stack.createTask(ROBOT, ["echo", "hi"], 30, { env });
      const t = await stack.waitTask(id);
      assert.equal(t.state, "refused", `${name}: ${JSON.stringify(t)}`);
      assert.match(t.error ?? "", new RegExp(name));
    }
    assert.ok(!exists(`${marks}/evil`), "the fake echo ran");
    const ok = await stack.createTask(ROBOT, ["sh", "-c", 'echo "$TZ"'], 30, {
      env: { TZ: "UTC0" },
    });
    const t = await stack.waitTask(ok);
    assert.equal(t.state, "done", JSON.stringify(t));
    assert.equal(t.stdout, "UTC0\n");
  },
);

e2e(
  "a task calling the Workload API gets PermissionDenied (the agents' uid gets the SVID)",
  async () => {
    const client = `${work}/spire-agent`;
    await Deno.copyFile(`${SPIRE_BIN_DIR}/spire-agent`, client);
    await Deno.chmod(client, 0o755);
    const args = [
      "api",
      "fetch",
      "x509",
      "-socketPath",
      stack.robotSocket(ROBOT),
      "-timeout",
      "5s",
    ];
    // Control: the same command as the agents' uid (this test) gets robot-001's SVID and key.
    const own = await realRunner.output(client, args, { check: false, timeoutMs: 30_000 });
    assert.equal(own.code, 0, own.stderr);
    assert.match(own.stdout, new RegExp(`SPIFFE ID:\\s+spiffe://${TRUST_DOMAIN}/robot/${ROBOT}`));
    const id = await stack.createTask(ROBOT, [client, ...args], 60);
    const t = await stack.waitTask(id);
    assert.equal(t.state, "done", JSON.stringify(t));
    assert.notEqual(t.exitCode, 0, "the task got an SVID");
    assert.match(`${t.stdout}\n${t.stderr}`, /PermissionDenied/);
    assert.doesNotMatch(`${t.stdout}\n${t.stderr}`, /SPIFFE ID:/);
  },
);

e2e(
  "k8s4r task cancel of a running sleep 600: gone within 2 s, the task ends cancelled",
  async () => {
    const id = await stack.createTask(ROBOT, ["sleep", "600"], 900);
    await waitFor(async () => (await stack.task(id)).state === "running", {
      timeoutMs: 20_000,
      intervalMs: 100,
      what: "sleep 600 running",
    });
    const stateDir = `${robotLayout(stack.layout, ROBOT, stack.env).agentDataDir}/k8s4r-agent`;
    const rec = (await new TaskJournal(stateDir).interrupted()).find((r) => r.taskId === id);
    assert.ok(rec?.pid && rec.startTime, `no journal record of ${id}`);
    const pid = rec.pid;
    const alive = () => {
      try {
        return processStartTime(pid) === rec.startTime &&
          !/^\d+ \(.*\) Z/.test(Deno.readTextFileSync(`/proc/${pid}/stat`));
      } catch {
        return false;
      }
    };
    assert.ok(alive());
    // It runs as the task user.
    const uid = (await lookupUser(realRunner, DEFAULT_TASK_USER))!.uid;
    assert.match(
      Deno.readTextFileSync(`/proc/${pid}/status`),
      new RegExp(`^Uid:\\s+${uid}\\s`, "m"),
    );

    // Attack: an unsigned cancel through 1883 is refused; the task lives.
    await publish(
      "cancel",
      encode({
        v: PROTOCOL_VERSION,
        type: "cancel",
        robotId: ROBOT,
        ts: new Date().toISOString(),
        taskId: id,
      }),
    );
    await waitFor(
      async () =>
        new RegExp(`cancel\\.refused task=${id} reason=bad-signature`).test(await agentLog()),
      {
        timeoutMs: 20_000,
        intervalMs: 100,
        what: "the unsigned cancel refused",
      },
    );
    assert.ok(alive(), "an unsigned cancel stopped the task");
    assert.equal((await stack.task(id)).state, "running");

    // The clock starts with the command (its own start included): gone within 2 s of it.
    const t0 = performance.now();
    const cmd = stack.k8s4r(["task", "cancel", id]);
    await waitFor(() => !alive(), {
      timeoutMs: 2000,
      intervalMs: 10,
      what: "sleep 600 gone within 2 s of `k8s4r task cancel`",
    });
    metric("task_security.cancel_gone_ms", Math.round(performance.now() - t0));
    const r = await cmd;
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`task ${id}: cancel sent to its robot`));
    const t = await stack.waitTask(id, 20_000);
    assert.equal(t.state, "cancelled", JSON.stringify(t));
    assert.match(
      t.error ?? "",
      new RegExp(`cancelled by spiffe://${TRUST_DOMAIN}/operator/admin; stopped with SIGTERM`),
    );
  },
);

/**
 * With the fleet server stopped (its persistent session stays at the broker), a robot (the spare
 * robot-099's real SVID: the broker makes a certificate's CN its client id, so robot-001's own
 * certificate would take over its agent's session) publishes `count` payloads of `size` bytes; then
 * the server comes back, the flooder sends one `{not json` to sync on, and what the server's
 * session had kept is read from the new server process's counters (each flood message is dropped
 * as bad-schema).
 */
async function floodWhileServerAway(count: number, size: number): Promise<number> {
  const svid = await stack.spareRobotSvid();
  assert.equal(await stopPidFile(stack.files.serverPid, 15_000), "stopped");
  const flood = await stack.tlsClient(svid, SPARE_ROBOT);
  try {
    const payload = Buffer.from(JSON.stringify({ pad: "a".repeat(size - 10) }));
    assert.equal(payload.byteLength, size);
    for (let i = 0; i < count; i++) {
      await flood.publishAsync(upTopic(SPARE_ROBOT, "heartbeat"), payload, { qos: 1 });
    }
    await stack.mustDevenv(...stack.startArgs());
    stack.remember();
    await flood.publishAsync(upTopic(SPARE_ROBOT, "heartbeat"), Buffer.from("{not json"), {
      qos: 1,
    });
    let now: Record<string, number> = {};
    // A new server process: its counters start at 0.
    await waitFor(async () => {
      now = (await stack.stats()).messages.dropped;
      return now["bad-json"] >= 1;
    }, { timeoutMs: 60_000, intervalMs: 200, what: "the sync message after the queued ones" });
    // Everything queued before the sync was delivered (in order) and counted by then.
    return now["bad-schema"];
  } finally {
    await flood.endAsync(true).catch(() => {});
  }
}

e2e("a flooding robot fills the away server's session only up to max_queued_bytes", async () => {
  const SIZE = 200 * 1024;
  // Control: 20 x 200 KiB (4 MiB, far below the limit) arrive whole.
  assert.equal(await floodWhileServerAway(20, SIZE), 20);
  // The attack: 800 x 200 KiB = 160 MiB against the 128 MiB limit.
  const COUNT = 800;
  const kept = await floodWhileServerAway(COUNT, SIZE);
  metric("task_security.flood_kept_messages", kept);
  console.log(
    `flood of ${COUNT} x ${SIZE} B = ${
      COUNT * SIZE
    } B; the server's session kept ${kept} (max_queued_bytes ${DEFAULT_MAX_QUEUED_BYTES})`,
  );
  assert.ok(kept < COUNT, `the whole flood (${kept}) was kept`);
  assert.ok(kept * SIZE <= DEFAULT_MAX_QUEUED_BYTES + SIZE, `kept ${kept * SIZE} B`);
  assert.ok(kept * SIZE > DEFAULT_MAX_QUEUED_BYTES * 0.9, `kept only ${kept * SIZE} B`);
  await stack.waitOnline();
  await controlRuns("after-flood");
});

Deno.test({
  name: "e2e task security: teardown: stop and clean leave no process and no listening port",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await attacker?.endAsync(true).catch(() => {});
    await Deno.remove(work, { recursive: true }).catch(() => {});
    await stack.teardown();
  },
});
