import assert from "node:assert/strict";
import {
  nextSample,
  parseAgentLog,
  parseFields,
  parseRunFile,
  parseServerLog,
  type RobotSample,
} from "./observe.ts";

Deno.test("parseRunFile: start and end records; anything else is bad", () => {
  const r = parseRunFile(
    "robot-002",
    "start c7-0001 1767225600123 4242\nend c7-0001 1767225601123\ngarbage\nstart x 12\n\n",
  );
  assert.deepEqual(r.items, [
    { robot: "robot-002", token: "c7-0001", phase: "start", at: 1767225600123 },
    { robot: "robot-002", token: "c7-0001", phase: "end", at: 1767225601123 },
  ]);
  assert.deepEqual(r.bad, ["garbage", "start x 12"]);
});

Deno.test("parseFields: plain and JSON-quoted values", () => {
  assert.deepEqual(parseFields(` task=ab-1 state=failed error="killed by SIGKILL" exit=null`), {
    task: "ab-1",
    state: "failed",
    error: "killed by SIGKILL",
    exit: "null",
  });
  assert.deepEqual(parseFields(` note="a \\"quoted\\" word" x=`), {
    note: 'a "quoted" word',
    x: "",
  });
});

Deno.test("parseAgentLog: boots, connects, disconnects, reports; other lines skipped", () => {
  const log = [
    "2026-01-01T00:00:00.000Z agent[robot-001] agent.starting spiffeId=spiffe://x/robot/robot-001",
    "2026-01-01T00:00:01.500Z agent[robot-001] mqtt.connected sessionPresent=false connects=1",
    "2026-01-01T00:00:02.000Z agent[robot-001] task.received task=t-1 exe=/x/task.sh timeout=10",
    "2026-01-01T00:00:02.100Z agent[robot-001] task.report task=t-1 state=accepted",
    "Warning: some deno warning",
    "2026-01-01T00:00:03.000Z agent[robot-001] mqtt.disconnected inFlight=0 nextAttemptMs=1000",
    "2026-01-01T00:00:04.000Z agent[robot-001] agent.stopped connects=1",
  ].join("\n");
  const t0 = Date.parse("2026-01-01T00:00:00.000Z");
  assert.deepEqual(parseAgentLog(log), [
    { robot: "robot-001", at: t0, kind: "boot" },
    { robot: "robot-001", at: t0 + 1500, kind: "connected" },
    { robot: "robot-001", at: t0 + 2000, kind: "received", taskId: "t-1" },
    { robot: "robot-001", at: t0 + 2100, kind: "report", taskId: "t-1", state: "accepted" },
    { robot: "robot-001", at: t0 + 3000, kind: "disconnected" },
    { robot: "robot-001", at: t0 + 4000, kind: "stopped" },
  ]);
});

Deno.test("parseServerLog: offline with reason, online, back, registered", () => {
  const log = [
    "2026-01-01T00:00:00.000Z INFO robot robot-001 registered (agent 0.1.0)",
    "2026-01-01T00:00:05.000Z INFO robot robot-001 is offline (missed 3 heartbeats)",
    "2026-01-01T00:00:06.000Z INFO robot robot-001 is back (heartbeat)",
    "2026-01-01T00:00:07.000Z INFO robot robot-002 is offline",
    "2026-01-01T00:00:08.000Z INFO robot robot-002 is online",
    "2026-01-01T00:00:09.000Z WARN robot robot-002 reported on unknown task x",
    "2026-01-01T00:00:09.000Z INFO connected to mqtt://127.0.0.1:1 as k8s4r-server",
  ].join("\n");
  const t0 = Date.parse("2026-01-01T00:00:00.000Z");
  const r = parseServerLog(log).map((t) => [t.robot, t.at - t0, t.online, t.reason]);
  assert.deepEqual(r, [
    ["robot-001", 0, true, null],
    ["robot-001", 5000, false, "missed 3 heartbeats"],
    ["robot-001", 6000, true, null],
    ["robot-002", 7000, false, "status offline"],
    ["robot-002", 8000, true, null],
  ]);
});

Deno.test("nextSample: online/offline changes and counter steps between two polls", () => {
  const hb = (received: number, missing: number) => ({ received, missing });
  const first = nextSample(undefined, { id: "r", online: true, heartbeats: hb(5, 0) }, 1000);
  assert.deepEqual(first, {
    sample: { at: 1000, online: true, missing: 0, received: 5 },
    unknown: false,
  });
  // Nothing changed but the received count: no transition, no step.
  const same = nextSample(first.sample, { id: "r", online: true, heartbeats: hb(6, 0) }, 1050);
  assert.equal(same.transition, undefined);
  assert.equal(same.step, undefined);
  // Offline, with its reason; a gap counted.
  const off = nextSample(same.sample, {
    id: "r",
    online: false,
    offlineReason: "connection lost",
    heartbeats: hb(7, 2),
  }, 1100);
  assert.deepEqual(off.transition, {
    robot: "r",
    at: 1100,
    prevAt: 1050,
    online: false,
    reason: "connection lost",
    source: "api",
  });
  assert.deepEqual(off.step, {
    robot: "r",
    prevAt: 1050,
    at: 1100,
    missing: [0, 2],
    received: [6, 7],
  });
  // Counters that go back are a step too (a registry that lost acknowledged writes).
  const back = nextSample(off.sample, { id: "r", online: false, heartbeats: hb(3, 2) }, 1150);
  assert.deepEqual(back.step?.received, [7, 3]);
});

Deno.test("nextSample: `state` wins over `online`; `unknown` keeps the previous value", () => {
  const prev: RobotSample = { at: 0, online: true, missing: 0, received: 1 };
  // A server that knows it cannot hear the fleet: not an offline mark, whatever `online` says.
  const u = nextSample(prev, { id: "r", state: "unknown", online: false }, 50);
  assert.equal(u.unknown, true);
  assert.equal(u.sample.online, true);
  assert.equal(u.transition, undefined);
  const off = nextSample(u.sample, { id: "r", state: "offline", online: true }, 100);
  assert.equal(off.transition?.online, false);
  const back = nextSample(off.sample, { id: "r", state: "unknown" }, 150);
  assert.equal(back.sample.online, false);
  assert.equal(back.transition, undefined);
  assert.equal(nextSample(back.sample, { id: "r", state: "online" }, 200).transition?.online, true);
});
