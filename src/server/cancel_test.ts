/**
 * Cancel through FleetService, without a network: a pending task nobody is publishing is
 * withdrawn (cancelled at once, never sent); anything that may have reached the robot becomes
 * `cancelling`, gets a signed cancel (now, or when the robot comes back) and ends with the
 * robot's report; the sweeper settles what the robot never took up. Every task and cancel goes
 * through the signer.
 */
import assert from "node:assert/strict";
import { decodeDown, type DownMessage, encode } from "../mqtt/messages.ts";
import { ConflictError, type DownSigner, FleetService, NotFoundError } from "./fleet.ts";
import type { Publisher } from "./fleet.ts";
import { Registry } from "./registry.ts";

const T0 = Date.parse("2025-01-01T00:00:00Z");
const iso = (ms: number) => new Date(ms).toISOString();
const ADMIN = "spiffe://k8s4r.test/operator/admin";

/** A publisher whose PUBACKs the test releases by hand (`ack()`), to hold a publish in flight. */
class HeldPublisher implements Publisher {
  sent: { topic: string; msg: DownMessage }[] = [];
  held: (() => void)[] = [];
  hold = false;
  online = true;
  publish(topic: string, payload: Uint8Array): Promise<void> {
    const d = decodeDown(topic, payload);
    if (!d.ok) throw new Error(`server published an invalid message: ${d.error}`);
    this.sent.push({ topic, msg: d.message });
    if (!this.hold) return Promise.resolve();
    return new Promise((resolve) => this.held.push(resolve));
  }
  ack(): void {
    for (const r of this.held.splice(0)) r();
  }
  connected() {
    return this.online;
  }
}

/** Records what it signed; the payload stays plain JSON so the fake publisher can decode it. */
class RecordingSigner implements DownSigner {
  signed: DownMessage[] = [];
  fail = false;
  sign(msg: DownMessage): Uint8Array {
    if (this.fail) throw new Error("no SVID yet");
    this.signed.push(msg);
    return encode(msg);
  }
}

function setup() {
  const clock = { t: T0 };
  const registry = Registry.openFile(":memory:");
  const pub = new HeldPublisher();
  const signer = new RecordingSigner();
  let n = 0;
  const fleet = new FleetService(registry, pub, {
    now: () => new Date(clock.t),
    newId: () => `t${++n}`,
    heartbeatIntervalSeconds: 10,
    resultGraceSeconds: 60,
    signer,
  });
  const online = (id: string, on: boolean) => {
    registry.touchRobot(id, iso(clock.t));
    registry.setOnline(id, on, on ? null : "test");
  };
  const report = (robotId: string, taskId: string, state: string, extra = {}) => {
    const body = { v: 1, type: "task-status", robotId, ts: iso(clock.t), taskId, state, ...extra };
    const r = fleet.handleMessage(
      `k8s4r/robots/${robotId}/up/task`,
      new TextEncoder().encode(JSON.stringify(body)),
    );
    assert.ok(r.ok, `report ${state}: ${JSON.stringify(r)}`);
  };
  return { clock, registry, pub, signer, fleet, online, report };
}

const cancels = (pub: HeldPublisher) => pub.sent.filter((s) => s.msg.type === "cancel");

Deno.test("cancel: a pending task of an offline robot is cancelled at once and never sent", async () => {
  const { fleet, registry, pub, online } = setup();
  online("robot-001", false);
  const t = fleet.createTask("robot-001", {
    command: ["sleep", "600"],
    env: {},
    timeoutSeconds: 600,
  }, ADMIN);
  assert.equal(t.state, "pending");
  assert.equal(t.createdBy, ADMIN);
  const r = fleet.cancelTask(t.id, ADMIN);
  assert.equal(r.outcome, "withdrawn");
  assert.equal(r.task.state, "cancelled");
  assert.equal(r.task.cancelRequestedBy, ADMIN);
  assert.ok(r.task.finishedAt);
  assert.match(r.task.error ?? "", /before it was sent/);
  // The robot comes back: the task is not sent.
  online("robot-001", true);
  fleet.dispatchFor("robot-001");
  await fleet.settled();
  assert.equal(
    pub.sent.filter((s) => s.msg.type === "task").length,
    0,
    "a withdrawn task was sent",
  );
  assert.equal(registry.getTask(t.id)!.state, "cancelled");
  // Cancelling it again is a conflict, not a second cancel.
  assert.throws(() => fleet.cancelTask(t.id, ADMIN), ConflictError);
  assert.throws(() => fleet.cancelTask("nope", ADMIN), NotFoundError);
});

Deno.test("cancel: a dispatched task becomes cancelling, the robot gets a signed cancel, its report ends it", async () => {
  const { fleet, registry, pub, signer, online, report } = setup();
  online("robot-001", true);
  const t = fleet.createTask("robot-001", {
    command: ["sleep", "600"],
    env: {},
    timeoutSeconds: 600,
  }, ADMIN);
  await fleet.settled();
  assert.equal(registry.getTask(t.id)!.state, "dispatched");
  report("robot-001", t.id, "running");
  const r = fleet.cancelTask(t.id, ADMIN);
  assert.equal(r.outcome, "cancelling");
  assert.equal(r.task.state, "cancelling");
  await fleet.settled();
  const c = cancels(pub);
  assert.equal(c.length, 1);
  assert.equal(c[0].topic, "k8s4r/robots/robot-001/down/cancel");
  assert.equal(c[0].msg.type === "cancel" && c[0].msg.taskId, t.id);
  assert.deepEqual(
    signer.signed.map((m) => m.type),
    ["task", "cancel"],
    "both went through the signer",
  );
  assert.equal(fleet.stats.cancelsSent, 1);
  // A second request re-sends the cancel; the state does not move.
  assert.equal(fleet.cancelTask(t.id, ADMIN).outcome, "already");
  await fleet.settled();
  assert.equal(cancels(pub).length, 2);
  // A progress report while cancelling keeps it cancelling; the robot's cancelled ends it.
  report("robot-001", t.id, "running");
  assert.equal(registry.getTask(t.id)!.state, "cancelling");
  report("robot-001", t.id, "cancelled", { error: "killed: cancelled" });
  const done = registry.getTask(t.id)!;
  assert.equal(done.state, "cancelled");
  assert.ok(done.finishedAt);
  // Re-dispatch never resends a cancelling or cancelled task.
  fleet.dispatchFor("robot-001");
  await fleet.settled();
  assert.equal(pub.sent.filter((s) => s.msg.type === "task").length, 1);
});

Deno.test("cancel: a task being published (no PUBACK yet) is not withdrawn: it may reach the robot", async () => {
  const { fleet, registry, pub, online, report } = setup();
  online("robot-001", true);
  pub.hold = true;
  const t = fleet.createTask("robot-001", { command: ["true"], env: {}, timeoutSeconds: 5 }, ADMIN);
  assert.equal(registry.getTask(t.id)!.state, "pending");
  const r = fleet.cancelTask(t.id, ADMIN);
  assert.equal(r.outcome, "cancelling", "a task in flight must be cancelled on the robot");
  pub.ack(); // the task's PUBACK
  await new Promise((r) => setTimeout(r, 0));
  pub.ack(); // the cancel's
  await fleet.settled();
  assert.equal(registry.getTask(t.id)!.state, "cancelling", "the late PUBACK does not undo it");
  assert.equal(registry.getTask(t.id)!.dispatchCount, 1);
  assert.equal(cancels(pub).length, 1);
  // The robot ran it to completion before the cancel arrived: its report wins.
  report("robot-001", t.id, "done", { exitCode: 0 });
  assert.equal(registry.getTask(t.id)!.state, "done");
  assert.throws(() => fleet.cancelTask(t.id, ADMIN), /already done/);
});

Deno.test("cancel: the robot is offline: the cancel goes out when it comes back", async () => {
  const { fleet, registry, pub, online } = setup();
  online("robot-001", true);
  const t = fleet.createTask(
    "robot-001",
    { command: ["sleep", "9"], env: {}, timeoutSeconds: 30 },
    ADMIN,
  );
  await fleet.settled();
  online("robot-001", false);
  fleet.cancelTask(t.id, ADMIN);
  await fleet.settled();
  assert.equal(cancels(pub).length, 0, "nothing is sent to an offline robot");
  online("robot-001", true);
  fleet.dispatchFor("robot-001");
  await fleet.settled();
  assert.equal(cancels(pub).length, 1);
  assert.equal(pub.sent.filter((s) => s.msg.type === "task").length, 1, "the task is not re-sent");
  assert.equal(registry.getTask(t.id)!.state, "cancelling");
});

Deno.test("cancel: the sweeper settles cancels the robot never answers", async () => {
  const { fleet, registry, clock, online, report } = setup();
  online("robot-001", true);
  const never = fleet.createTask("robot-001", {
    command: ["x"],
    env: {},
    timeoutSeconds: 10,
    ttlSeconds: 30,
  }, ADMIN);
  const ran = fleet.createTask("robot-001", { command: ["y"], env: {}, timeoutSeconds: 10 }, ADMIN);
  await fleet.settled();
  report("robot-001", ran.id, "running");
  fleet.cancelTask(never.id, ADMIN);
  fleet.cancelTask(ran.id, ADMIN);
  await fleet.settled();
  clock.t += 31_000; // past never's expiresAt: a robot would refuse it now
  online("robot-001", true);
  let s = fleet.sweep();
  assert.deepEqual(s.expired, [never.id]);
  assert.equal(registry.getTask(never.id)!.state, "cancelled");
  assert.equal(
    registry.getTask(ran.id)!.state,
    "cancelling",
    "it ran: only its report or loss ends it",
  );
  clock.t += 10_000 + 61_000; // past timeout + grace with no report
  registry.touchRobot("robot-001", iso(clock.t));
  s = fleet.sweep();
  assert.deepEqual(s.lost, [ran.id]);
  assert.equal(registry.getTask(ran.id)!.state, "failed");
});

Deno.test("signing: a task that cannot be signed is not sent, counted, and stays pending", async () => {
  const { fleet, registry, pub, signer, online } = setup();
  online("robot-001", true);
  signer.fail = true;
  const t = fleet.createTask("robot-001", { command: ["true"], env: {}, timeoutSeconds: 5 }, ADMIN);
  await fleet.settled();
  assert.equal(pub.sent.length, 0);
  assert.equal(fleet.stats.signErrors, 1);
  assert.equal(registry.getTask(t.id)!.state, "pending");
  signer.fail = false;
  fleet.dispatchFor("robot-001");
  await fleet.settled();
  assert.equal(registry.getTask(t.id)!.state, "dispatched");
});
