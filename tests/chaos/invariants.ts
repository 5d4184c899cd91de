/**
 * The campaign's invariants, as a pure function of what was observed. Each returns figures and
 * the violations it found, each violation with enough context (times relative to the campaign
 * start, the faults around it) to explain it.
 *
 * 1. no task id ran twice (the run files: one `start` line per token, on its own robot);
 * 2. every task that ran has its final result in the registry: `done` with its output when it
 *    finished on the robot and no agent crash overlapped it; otherwise a final state the robot
 *    reported (`failed: agent restarted`), never the server's "no result" fallback or a state
 *    that is not final;
 * 3. every agent crash (kill -9) was seen offline within 2 s (agent crashes while the broker or
 *    the server is down are excluded: nobody can see them then);
 * 4. no robot was marked offline while it stayed connected (connectivity from the agents' own
 *    `mqtt.connected` / `mqtt.disconnected` logs, their boots, and the kills and pauses the
 *    harness did);
 * 5. heartbeats lost (the server's `heartbeats.missing`, counted per boot) only inside the
 *    windows of a broker or agent outage;
 * 6. (liveness) every task created reached a final state by the end of the campaign, and a task
 *    that never ran failed only because its agent crashed while holding it (received, then
 *    killed before the failure was recorded), never by the server's "no result" fallback.
 */
import type { AgentEvent, CounterStep, RunLine, Transition } from "./observe.ts";
import type { Fault } from "./schedule.ts";

export interface FaultRecord {
  fault: Fault;
  /** When the fault's signal was sent (for queued-results: the agent's kill). */
  firedAt?: number;
  /** queued-results: when Mosquitto was killed. */
  brokerKilledAt?: number;
  /** queued-results: a task of the robot finished while the broker was down. */
  resultQueued?: boolean;
  /** SIGCONT. */
  resumedAt?: number;
  /** The restore action finished (devenv start returned, the supervisor revived it). */
  restoredAt?: number;
  /** The whole stack healthy again (API up, MQTT connected, every robot online). */
  healthyAt?: number;
  /** The target robot was online at the server right before the fault. */
  onlineBefore?: boolean;
  notes: string[];
}

export interface TaskObs {
  token: string;
  robot: string;
  /** The server's id; undefined when the POST failed and no task carries the token. */
  id?: string;
  createdAt: number;
  /** The registry's view at the end (GET /api/tasks/{id}). */
  final?: {
    state: string;
    exitCode: number | null;
    stdout: string;
    error?: string | null;
    /** When the registry recorded the final state (epoch ms). */
    finishedAt?: number;
  };
}

export type { CounterStep };

export interface Observations {
  seed: number;
  robots: string[];
  heartbeatMs: number;
  /** Observation window (epoch ms). */
  startedAt: number;
  endedAt: number;
  faults: FaultRecord[];
  tasks: TaskObs[];
  runs: RunLine[];
  badRunLines: string[];
  agentEvents: AgentEvent[];
  /** Offline/online changes: from the API poller (`at` = the poll that saw it) and the server log. */
  transitions: (Transition & { prevAt?: number })[];
  counterSteps: CounterStep[];
  finalHeartbeats: Record<string, { received: number; missing: number }>;
  /** API polls; `unknown`: robot views that said `state: "unknown"` (broker link down). */
  polls: { count: number; errors: number; unknown?: number };
}

export interface InvariantResult {
  id: string;
  title: string;
  ok: boolean;
  figures: string;
  violations: string[];
}

/** Crash to offline, at most. */
export const CRASH_OFFLINE_MS = 2000;
/** The server's sweep interval plus scheduling slack, on top of 3 heartbeat intervals. */
export const DETECTION_SLACK_MS = 1500;
/** Mosquitto saves its persistence every second: a kill loses what it acked since. */
export const BROKER_SAVE_MS = 1500;
/** The server's fallback error for a task that never reported. */
export const NO_RESULT_ERROR = /^no result from robot/;

const FINAL = new Set(["done", "failed", "refused"]);

export interface Window {
  start: number;
  end: number;
  what: string;
}

/** How long after a task's last line its agent may still be recording its result. */
export const RESULT_RECORDING_MS = 250;

function overlaps(a0: number, a1: number, w: Window): boolean {
  return a0 <= w.end && w.start <= a1;
}

/** A campaign-relative time, e.g. `+73.2s`. */
export function rel(obs: Pick<Observations, "startedAt">, t: number): string {
  return `${t >= obs.startedAt ? "+" : "-"}${(Math.abs(t - obs.startedAt) / 1000).toFixed(1)}s`;
}

function faultLabel(r: FaultRecord): string {
  const f = r.fault;
  const who = f.robot ? `${f.component} ${f.robot}` : f.component;
  return `#${f.n} ${f.action} ${who}`;
}

function firstEvent(
  obs: Observations,
  robot: string,
  kind: AgentEvent["kind"],
  after: number,
): number | undefined {
  let best: number | undefined;
  for (const e of obs.agentEvents) {
    if (
      e.robot === robot && e.kind === kind && e.at >= after && (best === undefined || e.at < best)
    ) {
      best = e.at;
    }
  }
  return best;
}

const ran = (r: FaultRecord) => r.firedAt !== undefined;

/** When an agent that died at `t` was connected again (its new boot's first connect). */
function backAt(obs: Observations, robot: string, t: number, r: FaultRecord): number {
  return firstEvent(obs, robot, "connected", t) ?? r.healthyAt ?? obs.endedAt;
}

/** The kills of robot's agent (plain and queued-results), with their times. */
export function agentKills(obs: Observations, robot?: string): { r: FaultRecord; at: number }[] {
  return obs.faults.filter((r) =>
    ran(r) && r.fault.component === "agent" && r.fault.action !== "pause" &&
    (robot === undefined || r.fault.robot === robot)
  ).map((r) => ({ r, at: r.firedAt! }));
}

/** Windows in which robot's agent was dead or frozen. */
export function agentOutages(obs: Observations, robot: string): Window[] {
  const out: Window[] = [];
  for (const r of obs.faults) {
    if (!ran(r) || r.fault.component !== "agent" || r.fault.robot !== robot) continue;
    if (r.fault.action === "pause") {
      out.push({ start: r.firedAt!, end: r.resumedAt ?? obs.endedAt, what: faultLabel(r) });
    } else {
      out.push({ start: r.firedAt!, end: backAt(obs, robot, r.firedAt!, r), what: faultLabel(r) });
    }
  }
  return out;
}

/** Windows in which Mosquitto was dead or frozen (a kill reaches back to its last save). */
export function brokerOutages(obs: Observations): Window[] {
  const out: Window[] = [];
  for (const r of obs.faults) {
    if (!ran(r)) continue;
    const end = r.healthyAt ?? obs.endedAt;
    if (r.fault.component === "mosquitto" && r.fault.action === "kill") {
      out.push({ start: r.firedAt! - BROKER_SAVE_MS, end, what: faultLabel(r) });
    } else if (r.fault.component === "mosquitto" && r.fault.action === "pause") {
      out.push({ start: r.firedAt!, end: r.resumedAt ?? obs.endedAt, what: faultLabel(r) });
    } else if (r.fault.action === "queued-results" && r.brokerKilledAt !== undefined) {
      out.push({
        start: r.brokerKilledAt - BROKER_SAVE_MS,
        end,
        what: `${faultLabel(r)} (broker)`,
      });
    }
  }
  return out;
}

/** Windows in which the fleet server was dead or frozen. */
export function serverOutages(obs: Observations): Window[] {
  const out: Window[] = [];
  for (const r of obs.faults) {
    if (!ran(r) || r.fault.component !== "server") continue;
    const end = r.fault.action === "pause"
      ? r.resumedAt ?? obs.endedAt
      : r.healthyAt ?? obs.endedAt;
    out.push({ start: r.firedAt!, end, what: faultLabel(r) });
  }
  return out;
}

/**
 * When robot's agent was NOT connected: before its first connect, from each boot, disconnect
 * or clean stop to the next connect, and during the harness's kills and pauses of it.
 */
export function notConnected(obs: Observations, robot: string): Window[] {
  const out: Window[] = [];
  const evs = obs.agentEvents.filter((e) =>
    e.robot === robot && e.kind !== "report" && e.kind !== "received"
  )
    .sort((a, b) => a.at - b.at);
  let downSince: number | undefined = obs.startedAt - 3_600_000;
  for (const e of evs) {
    if (e.kind === "connected") {
      if (downSince !== undefined) out.push({ start: downSince, end: e.at, what: "agent log" });
      downSince = undefined;
    } else if (downSince === undefined) {
      downSince = e.at;
    }
  }
  if (downSince !== undefined) out.push({ start: downSince, end: obs.endedAt, what: "agent log" });
  return [...out, ...agentOutages(obs, robot)];
}

/** The faults whose windows come near [a, b], for a violation's context. */
function around(obs: Observations, a: number, b: number): string {
  const near = obs.faults.filter((r) => {
    if (!ran(r)) return false;
    const start = Math.min(r.firedAt!, r.brokerKilledAt ?? r.firedAt!);
    const end = r.healthyAt ?? r.resumedAt ?? r.restoredAt ?? start;
    return start <= b + 5000 && end >= a - 5000;
  });
  return near.length
    ? `near ${near.map((r) => `${faultLabel(r)} at ${rel(obs, r.firedAt!)}`).join(", ")}`
    : "no fault near";
}

/** An error for a one-line violation: quoted absolute paths cut to their file name. */
export function brief(error: string | null | undefined): string {
  return (error ?? "?").replace(/'\/[^']*\/([^'/]*)'/g, "'…/$1'");
}

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p * s.length))];
}

// ---- 1. at most once

export function checkAtMostOnce(obs: Observations): InvariantResult {
  const byToken = new Map<string, RunLine[]>();
  for (const l of obs.runs) {
    if (l.phase !== "start") continue;
    byToken.set(l.token, [...(byToken.get(l.token) ?? []), l]);
  }
  const robotOf = new Map(obs.tasks.map((t) => [t.token, t.robot]));
  const violations: string[] = [];
  let twice = 0;
  for (const [token, starts] of byToken) {
    if (starts.length > 1) {
      twice++;
      violations.push(
        `${token} ran ${starts.length} times (${
          starts.map((s) => `${s.robot} at ${rel(obs, s.at)}`).join(", ")
        }); ${around(obs, starts[0].at, starts[starts.length - 1].at)}`,
      );
    }
    const want = robotOf.get(token);
    for (const s of starts) {
      if (want === undefined) violations.push(`${token} ran on ${s.robot} but no task carries it`);
      else if (s.robot !== want) violations.push(`${token} (a task of ${want}) ran on ${s.robot}`);
    }
  }
  for (const l of obs.badRunLines) violations.push(`unreadable run record: ${JSON.stringify(l)}`);
  return {
    id: "at-most-once",
    title: "no task id ran twice",
    ok: violations.length === 0,
    figures: `${obs.tasks.length} tasks created, ${byToken.size} ran, ${twice} ran more than once`,
    violations,
  };
}

// ---- 2. results

export function checkResults(obs: Observations): InvariantResult {
  const starts = new Map<string, number>();
  const ends = new Map<string, number>();
  for (const l of obs.runs) {
    const m = l.phase === "start" ? starts : ends;
    if (!m.has(l.token)) m.set(l.token, l.at);
  }
  const reports = new Map<string, string[]>();
  for (const e of obs.agentEvents) {
    if (e.kind === "report" && e.taskId) {
      reports.set(e.taskId, [...(reports.get(e.taskId) ?? []), e.state ?? "?"]);
    }
  }
  const violations: string[] = [];
  const counts = { ran: 0, done: 0, failedByRobot: 0, interrupted: 0 };
  for (const t of obs.tasks) {
    const start = starts.get(t.token);
    const end = ends.get(t.token);
    const f = t.final;
    const ctx = () => {
      const rep = t.id ? reports.get(t.id) : undefined;
      return `${rep ? `agent reported ${rep.join(">")}` : "agent reported nothing"}; ${
        around(obs, start ?? t.createdAt, end ?? start ?? t.createdAt)
      }`;
    };
    if (start === undefined) {
      if (f?.state === "done") {
        violations.push(`${t.token} (${t.robot}) is done in the registry but never ran; ${ctx()}`);
      }
      continue;
    }
    counts.ran++;
    // A kill just after the task's last line still interrupts it: the agent has yet to reap
    // it and write its result to the durable queue (an fsync), so its exit status dies with
    // the agent, which then reports `failed: agent restarted`.
    const crashed = agentKills(obs, t.robot).some((k) =>
      k.at >= start && k.at <= (end !== undefined ? end + RESULT_RECORDING_MS : obs.endedAt)
    );
    if (crashed) counts.interrupted++;
    const where = `${t.token} (${t.robot}, ran ${rel(obs, start)}${
      end !== undefined ? `-${rel(obs, end)}` : ", never ended"
    }${crashed ? ", its agent crashed meanwhile" : ""})`;
    if (!t.id || !f) {
      violations.push(`${where}: not in the registry`);
      continue;
    }
    if (!FINAL.has(f.state)) {
      violations.push(`${where}: no final result, the registry says ${f.state}; ${ctx()}`);
      continue;
    }
    if (f.state === "failed" && NO_RESULT_ERROR.test(f.error ?? "")) {
      violations.push(`${where}: result lost, the server gave up (${f.error}); ${ctx()}`);
      continue;
    }
    if (f.state === "refused") {
      violations.push(`${where}: refused in the registry, yet it ran; ${ctx()}`);
      continue;
    }
    if (end !== undefined && !crashed) {
      if (f.state !== "done" || f.exitCode !== 0 || !f.stdout.includes(t.token)) {
        violations.push(
          `${where}: finished on the robot, but the registry says ${f.state} exit ${f.exitCode}${
            f.error ? ` (${brief(f.error)})` : ""
          }; ${ctx()}`,
        );
        continue;
      }
    }
    if (f.state === "done") counts.done++;
    else counts.failedByRobot++;
  }
  return {
    id: "results",
    title: "every task that ran has its final result in the registry",
    ok: violations.length === 0,
    figures: `${counts.ran} ran: ${counts.done} done, ${counts.failedByRobot} failed as reported ` +
      `by the robot, ${counts.interrupted} overlapped a crash of their agent`,
    violations,
  };
}

// ---- 3. crash detection

export function checkCrashDetection(obs: Observations): InvariantResult {
  const violations: string[] = [];
  const latencies: number[] = [];
  const excluded: string[] = [];
  const offline = obs.transitions.filter((t) => !t.online);
  const blind = [...brokerOutages(obs), ...serverOutages(obs)];
  const reasons = new Map<string, number>();
  for (const { r, at } of agentKills(obs)) {
    const robot = r.fault.robot!;
    const other = blind.find((w) => overlaps(at - 500, at + CRASH_OFFLINE_MS, w));
    if (other) {
      excluded.push(`${faultLabel(r)} (${other.what} overlapped)`);
      continue;
    }
    if (r.onlineBefore === false) {
      excluded.push(`${faultLabel(r)} (robot already offline)`);
      continue;
    }
    const back = backAt(obs, robot, at, r);
    const seen = offline.filter((t) => t.robot === robot && t.at >= at && t.at <= back)
      .sort((a, b) => a.at - b.at)[0];
    if (!seen) {
      violations.push(
        `${faultLabel(r)} at ${rel(obs, at)}: never seen offline before it was back at ${
          rel(obs, back)
        } (${((back - at) / 1000).toFixed(1)}s later)`,
      );
      continue;
    }
    const ms = seen.at - at;
    latencies.push(ms);
    reasons.set(seen.reason ?? "?", (reasons.get(seen.reason ?? "?") ?? 0) + 1);
    if (ms > CRASH_OFFLINE_MS) {
      violations.push(
        `${faultLabel(r)} at ${
          rel(obs, at)
        }: offline after ${ms} ms (${seen.reason}, seen in the ${seen.source})`,
      );
    }
  }
  const lat = latencies.length
    ? `time to offline min ${Math.min(...latencies)} / median ${pct(latencies, 0.5)} / max ${
      Math.max(...latencies)
    } ms; reasons: ${[...reasons].map(([k, v]) => `${k} x${v}`).join(", ")}`
    : "no crash was seen offline";
  return {
    id: "crash-detection",
    title: `every agent crash was seen offline within ${CRASH_OFFLINE_MS / 1000} s`,
    ok: violations.length === 0,
    figures: `${agentKills(obs).length} agent crashes, ${excluded.length} excluded${
      excluded.length ? ` [${excluded.join("; ")}]` : ""
    }; ${lat}`,
    violations,
  };
}

// ---- 4. no false offline

/** Offline marks, API observations folded into the server log's own when both saw one. */
export function offlineMarks(obs: Observations): (Transition & { prevAt?: number })[] {
  const logged = obs.transitions.filter((t) => !t.online && t.source === "server-log");
  const api = obs.transitions.filter((t) =>
    !t.online && t.source === "api" &&
    !logged.some((l) =>
      l.robot === t.robot && l.at >= (t.prevAt ?? t.at) - 250 && l.at <= t.at + 250
    )
  );
  return [...logged, ...api].sort((a, b) => a.at - b.at);
}

export function checkNoFalseOffline(obs: Observations): InvariantResult {
  const lag = 3 * obs.heartbeatMs + DETECTION_SLACK_MS;
  const violations: string[] = [];
  const marks = offlineMarks(obs);
  let legit = 0;
  for (const m of marks) {
    const from = (m.prevAt ?? m.at) - lag;
    const down = notConnected(obs, m.robot).some((w) => overlaps(from, m.at, w));
    if (down) {
      legit++;
      continue;
    }
    violations.push(
      `${m.robot} marked offline at ${rel(obs, m.at)} (${m.reason}, seen in the ${m.source}) ` +
        `while its agent stayed connected; ${around(obs, m.at - lag, m.at)}`,
    );
  }
  return {
    id: "no-false-offline",
    title: "no robot was marked offline while it stayed connected",
    ok: violations.length === 0,
    figures: `${marks.length} offline marks, ${legit} while the robot was disconnected, dead or ` +
      `frozen; ${obs.polls.count} API polls (${obs.polls.errors} failed${
        obs.polls.unknown ? `, ${obs.polls.unknown} robot views "unknown"` : ""
      })`,
    violations,
  };
}

// ---- 5. heartbeats

export function checkHeartbeats(obs: Observations): InvariantResult {
  const hb = obs.heartbeatMs;
  const violations: string[] = [];
  const brokers = brokerOutages(obs);
  let lost = 0, explained = 0;
  for (const s of obs.counterSteps) {
    if (s.missing[1] < s.missing[0] || s.received[1] < s.received[0]) {
      violations.push(
        `${s.robot}: the server's heartbeat counters went back between ${rel(obs, s.prevAt)} and ${
          rel(obs, s.at)
        } (received ${s.received[0]} -> ${s.received[1]}, missing ${s.missing[0]} -> ${
          s.missing[1]
        }): acknowledged writes were lost; ${around(obs, s.prevAt, s.at)}`,
      );
      continue;
    }
    const d = s.missing[1] - s.missing[0];
    if (d === 0) continue;
    lost += d;
    const from = s.prevAt - (d + 2) * hb - 2000;
    const windows = [...brokers, ...agentOutages(obs, s.robot)];
    const w = windows.find((w) => overlaps(from, s.at, w));
    if (w) {
      explained += d;
      continue;
    }
    violations.push(
      `${s.robot}: ${d} heartbeat(s) lost, counted between ${rel(obs, s.prevAt)} and ${
        rel(obs, s.at)
      }, outside any broker or agent outage; ${around(obs, from, s.at)}`,
    );
  }
  const per = obs.robots.map((r) => {
    const h = obs.finalHeartbeats[r];
    return h ? `${r} ${h.received} received / ${h.missing} missing` : `${r} ?`;
  }).join(", ");
  return {
    id: "heartbeats",
    title: "heartbeats lost only inside broker or agent outages",
    ok: violations.length === 0,
    figures: `${lost} lost during the campaign, ${explained} inside an outage; ${per}`,
    violations,
  };
}

// ---- 6. liveness

export function checkLiveness(obs: Observations): InvariantResult {
  const states = new Map<string, number>();
  const violations: string[] = [];
  const starts = new Set(obs.runs.filter((l) => l.phase === "start").map((l) => l.token));
  const received = new Map<string, number>();
  for (const e of obs.agentEvents) {
    if (e.kind === "received" && e.taskId && !received.has(e.taskId)) received.set(e.taskId, e.at);
  }
  let crashFailed = 0;
  for (const t of obs.tasks) {
    const s = t.final?.state ?? (t.id ? "unknown" : "not created");
    states.set(s, (states.get(s) ?? 0) + 1);
    if (!t.id || starts.has(t.token)) continue; // not created, or checked by `results`
    const where = `${t.token} (${t.robot}, created ${rel(obs, t.createdAt)}) never ran`;
    if (!FINAL.has(s)) {
      violations.push(`${where} and is still ${s}; ${around(obs, t.createdAt, t.createdAt)}`);
      continue;
    }
    if (s !== "failed") continue;
    const f = t.final!;
    const got = received.get(t.id);
    const until = f.finishedAt ?? obs.endedAt;
    const crash = got !== undefined &&
      agentKills(obs, t.robot).some((k) => k.at >= got && k.at <= until);
    if (NO_RESULT_ERROR.test(f.error ?? "")) {
      violations.push(
        `${where}: result lost, the server gave up (${f.error}); ${
          around(obs, got ?? t.createdAt, until)
        }`,
      );
    } else if (!crash) {
      violations.push(
        `${where} and failed (${brief(f.error)}) ${
          got === undefined
            ? "without reaching its agent"
            : `at ${rel(obs, until)}, its agent got it at ${
              rel(obs, got)
            } and did not crash meanwhile`
        }; ${around(obs, got ?? t.createdAt, until)}`,
      );
    } else {
      crashFailed++;
    }
  }
  // Why tasks failed, paths and ids blanked out (e.g. `cannot record task id: ... rename '…'`).
  const errors = new Map<string, number>();
  for (const t of obs.tasks) {
    if (t.final?.state !== "failed") continue;
    const e = (t.final.error ?? "?").replace(/'[^']*'/g, "'…'").replace(/robot-\d+/g, "robot-N")
      .slice(0, 80);
    errors.set(e, (errors.get(e) ?? 0) + 1);
  }
  const why = [...errors].sort((a, b) => b[1] - a[1]).map(([e, n]) => `${JSON.stringify(e)} x${n}`);
  return {
    id: "liveness",
    title: "every task reached a final state; one that never ran failed only by a crash",
    ok: violations.length === 0,
    figures: ([...states].sort().map(([k, v]) => `${k} ${v}`).join(", ") || "no tasks") +
      `; ${crashFailed} never ran because their agent crashed holding them` +
      (why.length ? `; failed because: ${why.join(", ")}` : ""),
    violations,
  };
}

export function checkAll(obs: Observations): InvariantResult[] {
  return [
    checkAtMostOnce(obs),
    checkResults(obs),
    checkCrashDetection(obs),
    checkNoFalseOffline(obs),
    checkHeartbeats(obs),
    checkLiveness(obs),
  ];
}

/** How many faults of each kind ran, e.g. `kill agent x5, pause server x2`. */
export function faultSummary(obs: Pick<Observations, "faults">): string {
  const n = new Map<string, number>();
  for (const r of obs.faults) {
    if (!ran(r)) continue;
    const k = `${r.fault.action} ${r.fault.component}`;
    n.set(k, (n.get(k) ?? 0) + 1);
  }
  return [...n].map(([k, v]) => `${k} x${v}`).join(", ") || "none";
}

/** The report: one block per invariant, violations listed (the first `maxEach`). */
export function formatResults(results: InvariantResult[], maxEach = 20): string {
  const lines: string[] = [];
  for (const r of results) {
    lines.push(`${r.ok ? "PASS" : "FAIL"} ${r.id}: ${r.title}`);
    lines.push(`     ${r.figures}`);
    for (const v of r.violations.slice(0, maxEach)) lines.push(`     - ${v}`);
    if (r.violations.length > maxEach) {
      lines.push(`     ... and ${r.violations.length - maxEach} more`);
    }
  }
  return lines.join("\n");
}
