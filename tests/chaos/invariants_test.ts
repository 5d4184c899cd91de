/**
 * The invariant checker on synthetic observations: a clean campaign passes every invariant, and
 * each deliberately broken observation (a task id appended twice, a lost result, a late or
 * missing offline, an offline mark while connected, a heartbeat lost outside an outage, a
 * stuck task) is caught by the invariant meant for it, and only by it.
 */
import assert from "node:assert/strict";
import {
  brief,
  checkAll,
  type FaultRecord,
  faultSummary,
  formatResults,
  type InvariantResult,
  notConnected,
  type Observations,
  offlineMarks,
} from "./invariants.ts";
import type { Fault } from "./schedule.ts";

const T0 = 1_800_000_000_000;
const R1 = "robot-001", R2 = "robot-002";

function fault(n: number, f: Partial<Fault> & Pick<Fault, "component" | "action">): Fault {
  return { n, gapMs: 1000, moment: "any", restore: "devenv-start", ...f };
}

/** A clean campaign: two tasks, an agent crash seen in 300 ms, a broker crash with a loss. */
function clean(): Observations {
  const faults: FaultRecord[] = [
    {
      fault: fault(1, { component: "agent", robot: R1, action: "kill" }),
      firedAt: T0 + 10_000,
      onlineBefore: true,
      restoredAt: T0 + 13_500,
      healthyAt: T0 + 14_000,
      notes: [],
    },
    {
      fault: fault(2, { component: "mosquitto", action: "kill", restore: "supervisor" }),
      firedAt: T0 + 20_000,
      restoredAt: T0 + 25_000,
      healthyAt: T0 + 27_000,
      notes: [],
    },
  ];
  return {
    seed: 7,
    robots: [R1, R2],
    heartbeatMs: 1000,
    startedAt: T0,
    endedAt: T0 + 40_000,
    faults,
    tasks: [
      {
        token: "c7-1",
        robot: R1,
        id: "id-1",
        createdAt: T0 + 1000,
        final: { state: "done", exitCode: 0, stdout: "c7-1\n", error: null },
      },
      {
        token: "c7-2",
        robot: R2,
        id: "id-2",
        createdAt: T0 + 2000,
        final: { state: "done", exitCode: 0, stdout: "c7-2\n", error: null },
      },
      // Interrupted by the crash of its agent: reported failed by the agent's next boot.
      {
        token: "c7-3",
        robot: R1,
        id: "id-3",
        createdAt: T0 + 9000,
        final: { state: "failed", exitCode: null, stdout: "", error: "agent restarted" },
      },
    ],
    runs: [
      { robot: R1, token: "c7-1", phase: "start", at: T0 + 1100 },
      { robot: R1, token: "c7-1", phase: "end", at: T0 + 1600 },
      { robot: R2, token: "c7-2", phase: "start", at: T0 + 2100 },
      { robot: R2, token: "c7-2", phase: "end", at: T0 + 2600 },
      { robot: R1, token: "c7-3", phase: "start", at: T0 + 9100 },
    ],
    badRunLines: [],
    agentEvents: [
      { robot: R1, at: T0 - 5000, kind: "boot" },
      { robot: R1, at: T0 - 4000, kind: "connected" },
      { robot: R2, at: T0 - 5000, kind: "boot" },
      { robot: R2, at: T0 - 4000, kind: "connected" },
      { robot: R1, at: T0 + 1700, kind: "report", taskId: "id-1", state: "done" },
      { robot: R1, at: T0 + 12_000, kind: "boot" },
      { robot: R1, at: T0 + 13_000, kind: "connected" },
      { robot: R1, at: T0 + 20_001, kind: "disconnected" },
      { robot: R2, at: T0 + 20_001, kind: "disconnected" },
      { robot: R1, at: T0 + 26_000, kind: "connected" },
      { robot: R2, at: T0 + 26_000, kind: "connected" },
    ],
    transitions: [
      {
        robot: R1,
        at: T0 + 10_300,
        online: false,
        reason: "connection lost",
        source: "server-log",
      },
      // The poller saw the same change a little later: folded into the log's.
      {
        robot: R1,
        at: T0 + 10_340,
        prevAt: T0 + 10_290,
        online: false,
        reason: "connection lost",
        source: "api",
      },
      { robot: R1, at: T0 + 13_100, online: true, reason: null, source: "server-log" },
      // During the broker outage: the agents are disconnected, so this is not a false offline.
      { robot: R2, at: T0 + 23_000, online: false, reason: "missed 3 heartbeats", source: "api" },
    ],
    counterSteps: [
      // The broker's kill lost one acknowledged heartbeat of robot-002: inside its window.
      {
        robot: R2,
        prevAt: T0 + 26_500,
        at: T0 + 26_550,
        missing: [0, 1],
        received: [30, 31],
      },
    ],
    finalHeartbeats: { [R1]: { received: 30, missing: 0 }, [R2]: { received: 45, missing: 1 } },
    polls: { count: 800, errors: 3 },
  };
}

function failing(results: InvariantResult[]): string[] {
  return results.filter((r) => !r.ok).map((r) => r.id);
}

function only(results: InvariantResult[], id: string): InvariantResult {
  assert.deepEqual(failing(results), [id], formatResults(results));
  return results.find((r) => r.id === id)!;
}

Deno.test("invariants: a clean campaign passes all six, with figures", () => {
  const results = checkAll(clean());
  assert.deepEqual(failing(results), [], formatResults(results));
  const text = formatResults(results);
  assert.match(text, /PASS at-most-once: .*\n\s+3 tasks created, 3 ran, 0 ran more than once/);
  assert.match(text, /2 done, 1 failed as reported by the robot, 1 overlapped a crash/);
  assert.match(text, /1 agent crashes, 0 excluded; time to offline min 300 .* max 300 ms/);
  assert.match(text, /reasons: connection lost x1/);
  assert.match(text, /2 offline marks, 2 while the robot was disconnected/);
  assert.match(text, /1 lost during the campaign, 1 inside an outage/);
  assert.equal(faultSummary(clean()), "kill agent x1, kill mosquitto x1");
});

Deno.test("at-most-once: a task id appended twice by hand is caught", () => {
  const obs = clean();
  obs.runs.push({ robot: R2, token: "c7-2", phase: "start", at: T0 + 30_000 });
  const r = only(checkAll(obs), "at-most-once");
  assert.match(
    r.violations[0],
    /^c7-2 ran 2 times \(robot-002 at \+2\.1s, robot-002 at \+30\.0s\)/,
  );
  assert.match(r.figures, /1 ran more than once/);
});

Deno.test("at-most-once: a task on another robot, or an unreadable record, is caught", () => {
  const obs = clean();
  obs.runs[2] = { ...obs.runs[2], robot: R1 };
  obs.runs[3] = { ...obs.runs[3], robot: R1 };
  assert.match(
    only(checkAll(obs), "at-most-once").violations[0],
    /a task of robot-002\) ran on robot-001/,
  );
  const obs2 = clean();
  obs2.badRunLines.push("start half-written");
  assert.match(only(checkAll(obs2), "at-most-once").violations[0], /unreadable run record/);
});

Deno.test("results: lost, not final, missing, wrong, or refused results are caught", () => {
  const cases: [string, (o: Observations) => void, RegExp][] = [
    [
      "the server's fallback",
      (o) =>
        o.tasks[0].final = {
          state: "failed",
          exitCode: null,
          stdout: "",
          error: "no result from robot robot-001 within timeout + 60s",
        },
      /c7-1 .*: result lost, the server gave up .*agent reported done/,
    ],
    [
      "still running",
      (o) => o.tasks[1].final = { state: "running", exitCode: null, stdout: "" },
      /c7-2 \(robot-002, ran \+2\.1s-\+2\.6s\): no final result, the registry says running; agent reported nothing/,
    ],
    ["unknown to the registry", (o) => delete o.tasks[1].final, /c7-2 .*: not in the registry/],
    [
      "finished but failed",
      (o) => o.tasks[1].final = { state: "failed", exitCode: 1, stdout: "", error: "x" },
      /finished on the robot, but the registry says failed exit 1 \(x\)/,
    ],
    [
      "done without its output",
      (o) => o.tasks[1].final!.stdout = "",
      /finished on the robot, but the registry says done exit 0/,
    ],
    [
      "refused after it ran",
      (o) => o.tasks[2].final = { state: "refused", exitCode: null, stdout: "", error: "no" },
      /c7-3 .*its agent crashed meanwhile\): refused in the registry, yet it ran/,
    ],
    [
      "done without a run",
      (o) => o.runs.splice(0, 2),
      /c7-1 \(robot-001\) is done in the registry but never ran/,
    ],
  ];
  for (const [what, mutate, re] of cases) {
    const obs = clean();
    mutate(obs);
    const r = only(checkAll(obs), "results");
    assert.match(r.violations.join("\n"), re, what);
  }
});

Deno.test("results: a result queued when its agent crashed after the task must still be done", () => {
  // The task ended at +9.5s, the agent was killed at +10s (result waiting in its queue): the
  // crash did not overlap the run, so only `done` is acceptable.
  const obs = clean();
  obs.runs.push({ robot: R1, token: "c7-3", phase: "end", at: T0 + 9500 });
  const r = only(checkAll(obs), "results");
  assert.match(r.violations[0], /c7-3 .*: finished on the robot, but the registry says failed/);
});

Deno.test("results: a kill within RESULT_RECORDING_MS of the task's end interrupted it", () => {
  // The task printed its last line at +9.9s, the agent was killed at +10s: the agent had not
  // reaped it and written its result yet, so `failed: agent restarted` is the honest answer.
  const obs = clean();
  obs.runs.push({ robot: R1, token: "c7-3", phase: "end", at: T0 + 10_000 - 100 });
  const r = checkAll(obs).find((x) => x.id === "results")!;
  assert.equal(r.ok, true, r.violations.join("\n"));
  assert.match(r.figures, /1 overlapped a crash of their agent/);
});

Deno.test("crash-detection: late, never, and excluded crashes", () => {
  const late = clean();
  late.transitions[0].at = T0 + 13_200;
  late.transitions.splice(1, 1);
  late.agentEvents.find((e) => e.at === T0 + 13_000)!.at = T0 + 13_500;
  const r = only(checkAll(late), "crash-detection");
  assert.match(
    r.violations[0],
    /#1 kill agent robot-001 at \+10\.0s: offline after 3200 ms \(connection lost, seen in the server-log\)/,
  );
  assert.match(r.figures, /max 3200 ms/);

  const never = clean();
  never.transitions.splice(0, 2);
  const r2 = only(checkAll(never), "crash-detection");
  assert.match(
    r2.violations[0],
    /never seen offline before it was back at \+13\.0s \(3\.0s later\)/,
  );

  // An agent killed while the broker is down: nobody can see it; excluded, not failed.
  const blind = clean();
  blind.transitions.splice(0, 2);
  blind.faults[0].firedAt = T0 + 21_000;
  blind.agentEvents.push({ robot: R1, at: T0 + 21_000, kind: "boot" });
  const r3 = checkAll(blind).find((x) => x.id === "crash-detection")!;
  assert.ok(r3.ok, r3.violations.join("\n"));
  assert.match(
    r3.figures,
    /1 excluded \[#1 kill agent robot-001 \(#2 kill mosquitto overlapped\)\]/,
  );
});

Deno.test("no-false-offline: a mark while connected is caught; during a pause it is not", () => {
  const obs = clean();
  obs.transitions.push({
    robot: R2,
    at: T0 + 5000,
    online: false,
    reason: "missed 3 heartbeats",
    source: "server-log",
  });
  const r = only(checkAll(obs), "no-false-offline");
  assert.match(
    r.violations[0],
    /^robot-002 marked offline at \+5\.0s \(missed 3 heartbeats, seen in the server-log\) while its agent stayed connected; near #1 kill agent robot-001 at \+10\.0s/,
  );

  // The same mark while the harness had robot-002's agent frozen is expected.
  obs.faults.push({
    fault: fault(3, {
      component: "agent",
      robot: R2,
      action: "pause",
      pauseMs: 4000,
      restore: "sigcont",
    }),
    firedAt: T0 + 1500,
    resumedAt: T0 + 5500,
    notes: [],
  });
  const r2 = checkAll(obs).find((x) => x.id === "no-false-offline")!;
  assert.ok(r2.ok, r2.violations.join("\n"));

  // A frozen broker leaves the agents connected: marks then are false offline.
  const frozen = clean();
  frozen.faults.push({
    fault: fault(3, { component: "mosquitto", action: "pause", pauseMs: 5000, restore: "sigcont" }),
    firedAt: T0 + 30_000,
    resumedAt: T0 + 35_000,
    notes: [],
  });
  frozen.transitions.push({
    robot: R1,
    at: T0 + 33_500,
    online: false,
    reason: "missed 3 heartbeats",
    source: "api",
    prevAt: T0 + 33_450,
  });
  assert.match(
    only(checkAll(frozen), "no-false-offline").violations[0],
    /robot-001 marked offline at \+33\.5s .*near .*#3 pause mosquitto at \+30\.0s/,
  );
});

Deno.test("no-false-offline: connectivity comes from the agent log and the harness's faults", () => {
  const w = notConnected(clean(), R1).map((x) => [x.start - T0, x.end - T0, x.what]);
  assert.deepEqual(w, [
    [-3_600_000, -4000, "agent log"],
    [12_000, 13_000, "agent log"],
    [20_001, 26_000, "agent log"],
    [10_000, 13_000, "#1 kill agent robot-001"],
  ]);
  assert.deepEqual(offlineMarks(clean()).map((m) => [m.robot, m.at - T0, m.source]), [
    [R1, 10_300, "server-log"],
    [R2, 23_000, "api"],
  ]);
});

Deno.test("heartbeats: a loss outside any outage, or counters going back, is caught", () => {
  const obs = clean();
  obs.counterSteps.push({
    robot: R1,
    prevAt: T0 + 35_000,
    at: T0 + 35_100,
    missing: [0, 2],
    received: [40, 41],
  });
  const r = only(checkAll(obs), "heartbeats");
  assert.match(
    r.violations[0],
    /^robot-001: 2 heartbeat\(s\) lost, counted between \+35\.0s and \+35\.1s, outside any broker or agent outage/,
  );
  assert.match(r.figures, /3 lost during the campaign, 1 inside an outage/);

  const back = clean();
  back.counterSteps.push({
    robot: R1,
    prevAt: T0 + 30_000,
    at: T0 + 31_000,
    missing: [0, 0],
    received: [40, 35],
  });
  assert.match(
    only(checkAll(back), "heartbeats").violations[0],
    /counters went back .*received 40 -> 35/,
  );
});

Deno.test("liveness: a task that never ran and never ended is caught", () => {
  const obs = clean();
  obs.tasks.push({
    token: "c7-4",
    robot: R2,
    id: "id-4",
    createdAt: T0 + 10_000,
    final: { state: "dispatched", exitCode: null, stdout: "" },
  });
  const r = only(checkAll(obs), "liveness");
  assert.match(
    r.violations[0],
    /c7-4 \(robot-002, created \+10\.0s\) never ran and is still dispatched/,
  );
  assert.match(r.figures, /dispatched 1, done 2, failed 1; 0 never ran because/);
  assert.match(r.figures, /failed because: "agent restarted" x1/);
  // A POST that failed (no task carries the token) is not waited for.
  obs.tasks[3] = { token: "c7-4", robot: R2, createdAt: T0 + 10_000 };
  assert.ok(checkAll(obs).every((x) => x.ok));
});

Deno.test("liveness: a task that never ran may fail only because its agent crashed holding it", () => {
  const failedAt = (o: Observations, error: string, finishedAt: number) => {
    o.tasks.push({
      token: "c7-5",
      robot: R1,
      id: "id-5",
      createdAt: T0 + 9000,
      final: { state: "failed", exitCode: null, stdout: "", error, finishedAt },
    });
  };
  // Received at +9.5s, its agent killed at +10s, reported after the restart: explained.
  const held = clean();
  held.agentEvents.push({ robot: R1, at: T0 + 9500, kind: "received", taskId: "id-5" });
  failedAt(held, "agent restarted", T0 + 13_200);
  const ok = checkAll(held).find((x) => x.id === "liveness")!;
  assert.ok(ok.ok, ok.violations.join("\n"));
  assert.match(ok.figures, /1 never ran because their agent crashed holding them/);

  // Received after the restart and failed at once by the agent (no crash while it held it).
  const spurious = clean();
  spurious.agentEvents.push({ robot: R1, at: T0 + 13_100, kind: "received", taskId: "id-5" });
  failedAt(spurious, "cannot record task id: ENOENT", T0 + 13_150);
  assert.match(
    only(checkAll(spurious), "liveness").violations[0],
    /c7-5 \(robot-001, created \+9\.0s\) never ran and failed \(cannot record task id: ENOENT\) at \+13\.2s, its agent got it at \+13\.1s and did not crash meanwhile/,
  );

  // Never reached an agent, yet failed.
  const never = clean();
  failedAt(never, "x", T0 + 13_150);
  assert.match(only(checkAll(never), "liveness").violations[0], /without reaching its agent/);

  // The server's fallback is a lost result, crash or not.
  const lost = clean();
  lost.agentEvents.push({ robot: R1, at: T0 + 9500, kind: "received", taskId: "id-5" });
  failedAt(lost, "no result from robot robot-001 within timeout + 60s", T0 + 80_000);
  assert.match(
    only(checkAll(lost), "liveness").violations[0],
    /never ran: result lost, the server gave up/,
  );
});

Deno.test("brief: quoted absolute paths are cut to their file name", () => {
  assert.equal(
    brief("cannot record task id: ENOENT: rename '/tmp/a b/x/ids.json.tmp' -> '/tmp/x/ids.json'"),
    "cannot record task id: ENOENT: rename '…/ids.json.tmp' -> '…/ids.json'",
  );
  assert.equal(brief(undefined), "?");
});

Deno.test("formatResults: PASS/FAIL lines, violations capped", () => {
  const obs = clean();
  for (let i = 0; i < 30; i++) {
    obs.runs.push({ robot: R1, token: "c7-1", phase: "start", at: T0 + i });
  }
  obs.runs.push({ robot: R2, token: "c7-2", phase: "start", at: T0 });
  const text = formatResults(checkAll(obs), 1);
  assert.match(text, /^FAIL at-most-once: no task id ran twice$/m);
  assert.match(text, /^PASS results: /m);
  assert.match(text, /\.\.\. and 1 more/);
});
