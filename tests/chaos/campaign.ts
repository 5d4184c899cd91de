/**
 * The fault campaign against one real stack (`devenv start --robots N` in a temp project, via
 * the real CLI: tests/e2e/stack.ts): a steady stream of tasks through the HTTP API, heartbeats
 * every second, and the seeded schedule of faults (schedule.ts). Observation is continuous:
 * the API is polled every 50 ms for every robot's online flag and heartbeat counters, and at
 * the end the run files, the agents' and the server's logs and the registry are read back and
 * checked (invariants.ts).
 *
 * Each task runs the campaign's own script (the agents' only allowed executable) with its token
 * as an argument, never a shell line: it appends `start <token> <ms> <pid>` to its robot's run
 * file, sleeps, appends `end <token> <ms>`, and prints the token.
 *
 * Processes are found only through devenv's pid files (pid + start time) and, for a robot's
 * spire-agent, the k8s4r agent's process tree; a signal goes only to a process whose start time
 * still matches. Restoration is what a user would do: `k8s4r devenv start`, which restarts only
 * dead components, or the supervisors (broker-identity, the agent's spire-agent supervisor).
 */
import { delay, processStartTime, waitFor } from "../../src/process/mod.ts";
import type { E2eStack, RobotView, TaskView } from "../e2e/stack.ts";
import {
  checkAll,
  type CounterStep,
  type FaultRecord,
  type InvariantResult,
  type Observations,
  rel,
  type TaskObs,
} from "./invariants.ts";
import {
  type AgentEvent,
  nextSample,
  parseAgentLog,
  parseRunFile,
  parseServerLog,
  type RobotSample,
  type RunLine,
  type Transition,
} from "./observe.ts";
import { type Fault, formatFault, type Schedule, taskStream } from "./schedule.ts";

export const HEARTBEAT_SECONDS = 1;
export const POLL_MS = 50;
/** A task's timeout at the agent (its sleep is at most 2.5 s). */
export const TASK_TIMEOUT_SECONDS = 10;
/** How long an agent kill waits for its robot to be seen offline before restoring it. */
export const OFFLINE_WAIT_MS = 8000;
/** How long `mid-task` waits for a running task before firing anyway. */
export const MID_TASK_WAIT_MS = 10_000;
/** queued-results: how long the broker stays dead waiting for a result (its watchdog waits 5 s). */
export const QUEUED_WAIT_MS = 4000;
export const HEALTHY_TIMEOUT_MS = 90_000;
/** At the end: how long tasks get to reach a final state. */
export const QUIESCE_MS = 45_000;

const FINAL = new Set(["done", "failed", "refused"]);

export const TASK_SCRIPT = `#!/bin/sh
# k8s4r chaos task: records that it ran, sleeps, prints its token. Arguments only.
set -eu
token="$1"; file="$2"; secs="$3"
printf 'start %s %s %s\\n' "$token" "$(date +%s%3N)" "$$" >> "$file"
sleep "$secs"
printf 'end %s %s\\n' "$token" "$(date +%s%3N)" >> "$file"
printf '%s\\n' "$token"
`;

type Pid = { pid: number; startTime: number };

export class Campaign {
  readonly runDir: string;
  readonly script: string;
  readonly records: FaultRecord[] = [];
  readonly tasks: TaskObs[] = [];
  /** Tokens whose POST failed: the task may exist anyway (resolved from the listings). */
  private readonly uncertain = new Set<string>();
  private readonly transitions: (Transition & { prevAt?: number })[] = [];
  private readonly counterSteps: CounterStep[] = [];
  private readonly last = new Map<string, RobotSample>();
  private polls = { count: 0, errors: 0 };
  /** Robot views that said `state: "unknown"`. */
  private unknownPolls = 0;
  private stopPolling = false;
  private stopTasks = false;
  private poller?: Promise<void>;
  private producer?: Promise<void>;
  /** Processes the harness has SIGSTOPped and not yet resumed. */
  private readonly stopped = new Map<number, number>();
  startedAt = 0;
  endedAt = 0;
  readonly t0 = Date.now();

  constructor(
    readonly stack: E2eStack,
    readonly schedule: Schedule,
    private readonly say: (msg: string) => void = console.log,
  ) {
    this.runDir = `${stack.dir}/chaos`;
    this.script = `${this.runDir}/task.sh`;
  }

  log(msg: string): void {
    this.say(`[chaos ${((Date.now() - this.t0) / 1000).toFixed(1).padStart(6)}s] ${msg}`);
  }

  runFile(robot: string): string {
    return `${this.runDir}/ran-${robot}.log`;
  }

  get robots(): string[] {
    return this.schedule.robots;
  }

  // ---- setup

  /** Writes the task script, allows only it, starts the stack, starts observing and tasks. */
  async start(): Promise<void> {
    await Deno.mkdir(this.runDir, { recursive: true });
    // Tasks run as devenv's task user (k8s4r-task): it appends to its run logs here. Sticky, so
    // it cannot replace the script.
    await Deno.chmod(this.runDir, 0o1777);
    await Deno.writeTextFile(this.script, TASK_SCRIPT, { mode: 0o755 });
    await Deno.chmod(this.script, 0o755);
    await this.stack.setTaskAllow([this.script]);
    const t = Date.now();
    await this.stack.start();
    this.stack.started = true;
    await this.stack.waitOnline(this.robots, 120_000);
    this.log(`stack up in ${((Date.now() - t) / 1000).toFixed(1)}s: ${this.robots.join(", ")}`);
    this.startedAt = Date.now();
    this.poller = this.poll();
    this.producer = this.produce();
  }

  // ---- observation

  private async poll(): Promise<void> {
    while (!this.stopPolling) {
      const sent = Date.now();
      try {
        const r = await this.stack.http<{ robots: RobotView[] }>("/api/robots", {
          signal: AbortSignal.timeout(1000),
        });
        const at = Date.now();
        this.polls.count++;
        for (const v of r.body.robots ?? []) this.sample(v, at);
      } catch {
        this.polls.errors++;
      }
      const wait = POLL_MS - (Date.now() - sent);
      if (wait > 0) await delay(wait);
    }
  }

  private sample(v: RobotView, at: number): void {
    if (!this.robots.includes(v.id)) return;
    const r = nextSample(this.last.get(v.id), v, at);
    if (r.unknown) this.unknownPolls++;
    if (r.transition) this.transitions.push(r.transition);
    if (r.step) this.counterSteps.push(r.step);
    this.last.set(v.id, r.sample);
  }

  online(robot: string): boolean | undefined {
    return this.last.get(robot)?.online;
  }

  // ---- the task stream

  private async produce(): Promise<void> {
    const draws = taskStream(this.schedule.seed, this.robots);
    let n = 0;
    while (!this.stopTasks) {
      const d = draws.next().value!;
      n++;
      const token = `c${this.schedule.seed}-${String(n).padStart(5, "0")}`;
      const t: TaskObs = { token, robot: d.robot, createdAt: Date.now() };
      this.tasks.push(t);
      try {
        const r = await this.stack.http<{ id?: string }>(`/api/robots/${d.robot}/tasks`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({
            command: [this.script, token, this.runFile(d.robot), (d.sleepMs / 1000).toFixed(1)],
            timeoutSeconds: TASK_TIMEOUT_SECONDS,
          }),
          signal: AbortSignal.timeout(3000),
        });
        if (r.status === 201 && typeof r.body.id === "string") t.id = r.body.id;
        else this.uncertain.add(token);
      } catch {
        this.uncertain.add(token);
      }
      await delay(d.nextInMs);
    }
  }

  /** Finds the tasks of failed POSTs in the robots' listings (the newest 1000 each). */
  async resolveUncertain(): Promise<void> {
    if (this.uncertain.size === 0) return;
    for (const robot of this.robots) {
      try {
        const r = await this.stack.http<{ tasks: (TaskView & { command: string[] })[] }>(
          `/api/robots/${robot}/tasks?limit=1000`,
        );
        for (const v of r.body.tasks ?? []) {
          const token = v.command?.[1];
          if (!token || !this.uncertain.has(token)) continue;
          const t = this.tasks.find((x) => x.token === token);
          if (t) t.id = v.id;
          this.uncertain.delete(token);
        }
      } catch { /* the API is down: try again later */ }
    }
  }

  // ---- run files

  async runs(): Promise<{ items: RunLine[]; bad: string[] }> {
    const items: RunLine[] = [];
    const bad: string[] = [];
    for (const robot of this.robots) {
      const text = await Deno.readTextFile(this.runFile(robot)).catch(() => "");
      const p = parseRunFile(robot, text);
      items.push(...p.items);
      bad.push(...p.bad);
    }
    return { items, bad };
  }

  /** Tokens of robot (or of any robot) that started and have not ended. */
  async running(robot?: string): Promise<string[]> {
    const { items } = await this.runs();
    const ended = new Set(items.filter((l) => l.phase === "end").map((l) => l.token));
    return items.filter((l) =>
      l.phase === "start" && !ended.has(l.token) && (robot === undefined || l.robot === robot)
    ).map((l) => l.token);
  }

  // ---- processes

  pidOf(component: Fault["component"], robot?: string): Pid | undefined {
    const s = this.stack;
    switch (component) {
      case "agent":
        return s.pid(s.agentPidFile(robot!));
      case "spire-agent":
        return s.spireAgentOf(robot!);
      case "server":
        return s.pid(s.files.serverPid);
      case "mosquitto":
        return s.pid(s.files.mosquittoPid);
    }
  }

  /** Sends sig only if pid is still the process we looked up (its start time matches). */
  private signal(p: Pid, sig: Deno.Signal): boolean {
    if (processStartTime(p.pid) !== p.startTime) return false;
    try {
      Deno.kill(p.pid, sig);
      return true;
    } catch {
      return false;
    }
  }

  private async kill9(p: Pid, what: string): Promise<number | undefined> {
    if (!this.signal(p, "SIGKILL")) return undefined;
    const at = Date.now();
    await waitFor(() => processStartTime(p.pid) !== p.startTime, {
      timeoutMs: 10_000,
      intervalMs: 10,
      what: `${what} to die`,
    });
    return at;
  }

  /** SIGCONT for everything still stopped (a failing run never leaves a frozen process). */
  resumeAll(): void {
    for (const [pid, startTime] of this.stopped) this.signal({ pid, startTime }, "SIGCONT");
    this.stopped.clear();
  }

  async devenvStart(why: string): Promise<void> {
    const t = Date.now();
    const r = await this.stack.devenv(...this.stack.startArgs());
    this.stack.remember();
    const ms = Date.now() - t;
    if (r.code !== 0) {
      this.log(`  devenv start (${why}) exited ${r.code} after ${ms} ms:\n${r.stdout}${r.stderr}`);
    } else {
      this.log(`  devenv start (${why}): ${(ms / 1000).toFixed(1)}s`);
    }
  }

  /** API up, MQTT connected, every robot online, every component's pid alive. */
  private async healthy(): Promise<boolean> {
    try {
      const h = await this.stack.http<{ ok?: boolean }>("/healthz", {
        signal: AbortSignal.timeout(1000),
      });
      if (h.body.ok !== true) return false;
      const r = await this.stack.http<{ robots: RobotView[] }>("/api/robots", {
        signal: AbortSignal.timeout(1000),
      });
      for (const id of this.robots) {
        if (!r.body.robots.find((x) => x.id === id)?.online) return false;
        if (!this.pidOf("agent", id)) return false;
      }
      return this.pidOf("mosquitto") !== undefined && this.pidOf("server") !== undefined;
    } catch {
      return false;
    }
  }

  /** Waits until healthy; runs `devenv start` once more if it is not. Returns when it was. */
  async waitHealthy(): Promise<number | undefined> {
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        await waitFor(() => this.healthy(), {
          timeoutMs: HEALTHY_TIMEOUT_MS / 2,
          intervalMs: 100,
          what: "the stack to be healthy",
        });
        return Date.now();
      } catch {
        if (attempt === 0) await this.devenvStart("not healthy");
      }
    }
    return undefined;
  }

  // ---- faults

  private async waitMidTask(f: Fault, r: FaultRecord): Promise<void> {
    const robot = f.component === "agent" || f.component === "spire-agent" ? f.robot : undefined;
    const ok = await waitFor(async () => (await this.running(robot)).length > 0, {
      timeoutMs: MID_TASK_WAIT_MS,
      intervalMs: 20,
    }).then(() => true, () => false);
    r.notes.push(
      ok ? `fired mid-task (${(await this.running(robot)).join(" ")})` : "no task was running",
    );
  }

  /** Runs one fault and its restoration; fills its record. */
  async inject(f: Fault): Promise<FaultRecord> {
    const r: FaultRecord = { fault: f, notes: [] };
    this.records.push(r);
    this.log(formatFault(f));
    if (f.moment === "mid-task" || f.moment === "queued-results") await this.waitMidTask(f, r);
    if (f.robot) r.onlineBefore = this.online(f.robot);
    try {
      if (f.action === "pause") await this.pause(f, r);
      else if (f.action === "queued-results") await this.queuedResults(f, r);
      else await this.kill(f, r);
    } finally {
      this.resumeAll();
    }
    r.healthyAt = await this.waitHealthy();
    if (r.healthyAt === undefined) r.notes.push("the stack did not become healthy");
    await this.resolveUncertain();
    this.stack.remember();
    const t = (x?: number) => (x === undefined ? "-" : rel(this.obsTimes(), x));
    this.log(
      `  fired ${t(r.firedAt)}, resumed ${t(r.resumedAt)}, restored ${t(r.restoredAt)}, healthy ${
        t(r.healthyAt)
      }${r.notes.length ? `; ${r.notes.join("; ")}` : ""}`,
    );
    return r;
  }

  private obsTimes(): { startedAt: number } {
    return { startedAt: this.startedAt };
  }

  private async pause(f: Fault, r: FaultRecord): Promise<void> {
    const p = this.pidOf(f.component, f.robot);
    if (!p || !this.signal(p, "SIGSTOP")) {
      r.notes.push(`${f.component} not running: skipped`);
      return;
    }
    r.firedAt = Date.now();
    this.stopped.set(p.pid, p.startTime);
    // The pause is the fault itself (a bounded freeze), not a wait for readiness.
    await delay(f.pauseMs!);
    this.signal(p, "SIGCONT");
    this.stopped.delete(p.pid);
    r.resumedAt = Date.now();
  }

  private async kill(f: Fault, r: FaultRecord): Promise<void> {
    const p = this.pidOf(f.component, f.robot);
    if (!p) {
      r.notes.push(`${f.component} not running: skipped`);
      return;
    }
    r.firedAt = await this.kill9(p, formatFault(f));
    if (r.firedAt === undefined) {
      r.notes.push("the process was gone before the signal");
      return;
    }
    if (f.component === "agent") await this.waitOffline(f.robot!, r);
    if (f.restore === "devenv-start") {
      await delay(f.restoreDelayMs ?? 0);
      await this.devenvStart(`after #${f.n}`);
      r.restoredAt = Date.now();
      return;
    }
    // The supervisor brings it back: broker-identity for Mosquitto, the agent for spire-agent.
    const revived = await waitFor(() => {
      const now = this.pidOf(f.component, f.robot);
      return now !== undefined && now.pid !== p.pid;
    }, { timeoutMs: 30_000, intervalMs: 50 }).then(() => true, () => false);
    if (revived) {
      r.restoredAt = Date.now();
    } else {
      r.notes.push("the supervisor did not restart it within 30 s");
      await this.devenvStart(`after #${f.n}, no supervisor restart`);
      r.restoredAt = Date.now();
    }
  }

  /** After an agent kill: waits (bounded) until the poller saw its robot offline. */
  private async waitOffline(robot: string, r: FaultRecord): Promise<void> {
    const seen = await waitFor(() => this.online(robot) === false, {
      timeoutMs: OFFLINE_WAIT_MS,
      intervalMs: 10,
    }).then(() => true, () => false);
    r.notes.push(
      seen
        ? `${robot} seen offline by the poller after ${Date.now() - r.firedAt!} ms`
        : `${robot} still online ${OFFLINE_WAIT_MS} ms after the kill`,
    );
  }

  private async queuedResults(f: Fault, r: FaultRecord): Promise<void> {
    const broker = this.pidOf("mosquitto");
    if (!broker) {
      r.notes.push("mosquitto not running: skipped");
      return;
    }
    r.brokerKilledAt = await this.kill9(broker, "mosquitto");
    const before = new Set(
      (await this.runs()).items.filter((l) => l.phase === "end").map((l) => l.token),
    );
    r.resultQueued = await waitFor(
      async () =>
        (await this.runs()).items.some((l) =>
          l.phase === "end" && l.robot === f.robot && !before.has(l.token)
        ),
      { timeoutMs: QUEUED_WAIT_MS, intervalMs: 20 },
    ).then(() => true, () => false);
    r.notes.push(
      r.resultQueued
        ? `a result of ${f.robot} was queued`
        : `no task of ${f.robot} ended meanwhile`,
    );
    const agent = this.pidOf("agent", f.robot);
    if (!agent) {
      r.notes.push(`agent ${f.robot} not running`);
    } else {
      r.firedAt = await this.kill9(agent, `agent ${f.robot}`);
    }
    await delay(f.restoreDelayMs ?? 0);
    await this.devenvStart(`after #${f.n}`);
    r.restoredAt = Date.now();
  }

  /** Runs the schedule within its time budget; returns how many faults ran. */
  async runFaults(): Promise<number> {
    const end = this.startedAt + this.schedule.minutes * 60_000;
    let n = 0;
    for (const f of this.schedule.items) {
      if (Date.now() + f.gapMs >= end) {
        this.log(
          `time budget of ${this.schedule.minutes} min spent: ${n} of ${this.schedule.items.length} faults ran`,
        );
        break;
      }
      await delay(f.gapMs);
      await this.inject(f);
      n++;
    }
    if (this.schedule.items.length === 0) {
      // No faults: the campaign is the task stream alone for the whole phase.
      await delay(Math.max(0, end - Date.now()));
    }
    return n;
  }

  // ---- the end

  /** Stops the task stream, lets every task finish, lets the counters settle. */
  async quiesce(): Promise<void> {
    if ((await this.waitHealthy()) === undefined) this.log("the stack is not healthy at the end");
    this.stopTasks = true;
    await this.producer;
    await this.resolveUncertain();
    const t = Date.now();
    const pending = new Set(this.tasks.filter((x) => x.id).map((x) => x.id!));
    await waitFor(async () => {
      for (const id of [...pending]) {
        try {
          const v = await this.stack.task(id);
          if (FINAL.has(v.state)) pending.delete(id);
        } catch { /* the API is busy: next round */ }
      }
      return pending.size === 0;
    }, { timeoutMs: QUIESCE_MS, intervalMs: 500 }).catch(() => {});
    this.log(
      `quiesce: ${pending.size} task(s) not final after ${((Date.now() - t) / 1000).toFixed(1)}s`,
    );
    // Two more heartbeats from everyone, so that every gap has been counted.
    await Promise.all(this.robots.map((id) => this.stack.waitHeartbeats(id, 2).catch(() => {})));
    this.stopPolling = true;
    await this.poller;
    this.endedAt = Date.now();
  }

  /** Reads everything back. Call after `quiesce`; may be called again (controls). */
  async collect(): Promise<Observations> {
    const { items: runs, bad } = await this.runs();
    const agentEvents: AgentEvent[] = [];
    for (const robot of this.robots) {
      const text = await Deno.readTextFile(this.stack.agentLogFile(robot)).catch(() => "");
      agentEvents.push(...parseAgentLog(text).filter((e) => e.robot === robot));
    }
    const serverLog = await Deno.readTextFile(this.stack.files.serverLog).catch(() => "");
    const logged = parseServerLog(serverLog).filter((t) =>
      t.at >= this.startedAt && this.robots.includes(t.robot)
    );
    const tasks: TaskObs[] = [];
    for (const t of this.tasks) {
      const o: TaskObs = { ...t };
      if (t.id) {
        try {
          const v = await this.stack.task(t.id);
          o.final = {
            state: v.state,
            exitCode: v.exitCode,
            stdout: v.stdout,
            error: v.error,
            finishedAt: v.finishedAt ? Date.parse(v.finishedAt) : undefined,
          };
        } catch { /* left without a final view: reported */ }
      }
      tasks.push(o);
    }
    const finalHeartbeats: Observations["finalHeartbeats"] = {};
    for (const id of this.robots) {
      try {
        finalHeartbeats[id] = (await this.stack.robot(id)).heartbeats;
      } catch { /* reported as ? */ }
    }
    return {
      seed: this.schedule.seed,
      robots: this.robots,
      heartbeatMs: HEARTBEAT_SECONDS * 1000,
      startedAt: this.startedAt,
      endedAt: this.endedAt || Date.now(),
      faults: this.records.map((r) => ({ ...r, notes: [...r.notes] })),
      tasks,
      runs,
      badRunLines: bad,
      agentEvents,
      transitions: [...this.transitions.filter((t) => t.at >= this.startedAt), ...logged],
      counterSteps: [...this.counterSteps],
      finalHeartbeats,
      polls: { ...this.polls, unknown: this.unknownPolls },
    };
  }

  /**
   * Positive control: appends by hand a second `start` record of a task that ran, exactly as a
   * second run of it would. Returns its token; `collect()` + `checkAll()` must then fail.
   */
  async appendDuplicateRun(): Promise<string> {
    const first = (await this.runs()).items.find((l) => l.phase === "start");
    if (!first) throw new Error("no task ran: nothing to duplicate");
    await Deno.writeTextFile(
      this.runFile(first.robot),
      `start ${first.token} ${Date.now()} 0\n`,
      { append: true },
    );
    return first.token;
  }

  /** Stops the background loops (idempotent; for a run that failed half-way). */
  async abort(): Promise<void> {
    this.resumeAll();
    this.stopTasks = true;
    this.stopPolling = true;
    await Promise.allSettled([this.producer, this.poller]);
  }
}

export interface CampaignReport {
  schedule: Schedule;
  faultsRun: number;
  observations: Observations;
  results: InvariantResult[];
  ok: boolean;
  ms: { start: number; faults: number; quiesce: number };
}

/** The whole campaign on a created (not started) stack. The caller tears the stack down. */
export async function runCampaign(
  stack: E2eStack,
  schedule: Schedule,
  say: (msg: string) => void = console.log,
): Promise<{ campaign: Campaign; report: CampaignReport }> {
  const c = new Campaign(stack, schedule, say);
  try {
    const t0 = Date.now();
    await c.start();
    const t1 = Date.now();
    const faultsRun = await c.runFaults();
    const t2 = Date.now();
    await c.quiesce();
    const t3 = Date.now();
    const observations = await c.collect();
    const results = checkAll(observations);
    return {
      campaign: c,
      report: {
        schedule,
        faultsRun,
        observations,
        results,
        ok: results.every((r) => r.ok),
        ms: { start: t1 - t0, faults: t2 - t1, quiesce: t3 - t2 },
      },
    };
  } finally {
    await c.abort();
  }
}

/** Writes the whole report (schedule, observations, results) as JSON; returns its path. */
export async function saveReport(report: CampaignReport): Promise<string> {
  const file = `/tmp/k8s4r-chaos-${report.schedule.seed}-${Date.now()}.json`;
  await Deno.writeTextFile(file, JSON.stringify(report, null, 1));
  return file;
}

/** The fault records as a timeline (campaign-relative times), for the failure report. */
export function formatTimeline(obs: Observations): string {
  const t = (x?: number) => (x === undefined ? "-" : rel(obs, x));
  return obs.faults.map((r) =>
    `${formatFault(r.fault)}\n     fired ${t(r.firedAt)}${
      r.brokerKilledAt !== undefined ? ` (broker killed ${t(r.brokerKilledAt)})` : ""
    }, resumed ${t(r.resumedAt)}, restored ${t(r.restoredAt)}, healthy ${t(r.healthyAt)}${
      r.notes.length ? `; ${r.notes.join("; ")}` : ""
    }`
  ).join("\n");
}
