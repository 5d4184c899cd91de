/**
 * The fault campaign's schedule: a pure function of (seed, faults, minutes, robots), so that
 * `deno task chaos --seed S --faults N --minutes M --robots R` replays exactly the same faults in
 * the same order with the same pauses and delays. (The real interleaving with tasks and
 * heartbeats still depends on timing; the schedule is what is replayed.)
 *
 * A fault is one of:
 * - `kill` (SIGKILL) or `pause` (SIGSTOP, then SIGCONT after `pauseMs`) of a robot's k8s4r
 *   agent, the fleet server, Mosquitto, or a robot's spire-agent;
 * - `queued-results`: kill -9 of Mosquitto, then, as soon as one of the robot's tasks has
 *   finished while the broker is down (its result can only wait in the agent), kill -9 of that
 *   robot's agent.
 *
 * `moment` says when it fires: `any` (after the gap), `mid-task` (after the gap, as soon as a
 * task is running on the robot, or on any robot for the server and Mosquitto), or
 * `queued-results` (see above). Restoration is what a user would do (`devenv start`, which
 * restarts only dead components) or the supervisors (broker-identity revives a dead Mosquitto;
 * the agent restarts its spire-agent); a pause needs only its SIGCONT.
 */

/** mulberry32: a small, well-mixed 32-bit PRNG. Returns floats in [0, 1). */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Helpers over one PRNG stream. */
export class Rng {
  readonly next: () => number;
  constructor(seed: number) {
    this.next = mulberry32(seed);
  }
  /** An integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }
  pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.next() * xs.length)];
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  /** Fisher-Yates, in place. */
  shuffle<T>(xs: T[]): T[] {
    for (let i = xs.length - 1; i > 0; i--) {
      const j = Math.floor(this.next() * (i + 1));
      [xs[i], xs[j]] = [xs[j], xs[i]];
    }
    return xs;
  }
}

export type Component = "agent" | "spire-agent" | "server" | "mosquitto";
export type Action = "kill" | "pause" | "queued-results";
export type Moment = "any" | "mid-task" | "queued-results";
export type Restore = "devenv-start" | "supervisor" | "sigcont";

export interface Fault {
  /** 1-based position in the schedule. */
  n: number;
  /** Wait before this fault, counted from the moment the previous one was recovered. */
  gapMs: number;
  component: Component;
  /** The robot, for `agent` and `spire-agent`. */
  robot?: string;
  action: Action;
  moment: Moment;
  /** SIGSTOP to SIGCONT, for `pause`. */
  pauseMs?: number;
  restore: Restore;
  /**
   * For `devenv-start`: how long after the fault (for an agent: after its robot was seen
   * offline, or after the offline wait gave up) `devenv start` runs.
   */
  restoreDelayMs?: number;
}

export interface ScheduleParams {
  seed: number;
  faults: number;
  /** Length of the fault phase. */
  minutes: number;
  robots: string[];
}

export interface Schedule extends ScheduleParams {
  items: Fault[];
}

/** The kinds of fault; a schedule of at least this many faults has each one at least once. */
export const FAULT_CLASSES: readonly { component: Component; action: Action; weight: number }[] = [
  { component: "agent", action: "kill", weight: 6 },
  { component: "agent", action: "pause", weight: 3 },
  { component: "server", action: "kill", weight: 3 },
  { component: "server", action: "pause", weight: 2 },
  { component: "mosquitto", action: "kill", weight: 3 },
  { component: "mosquitto", action: "pause", weight: 2 },
  { component: "spire-agent", action: "kill", weight: 2 },
  { component: "spire-agent", action: "pause", weight: 1 },
  { component: "agent", action: "queued-results", weight: 2 },
];

/** What a fault costs on average beyond its gap (recovery, waits); used to spread the gaps. */
export const EXPECTED_FAULT_COST_MS = 6000;

export const LIMITS = {
  seedMax: 0xffffffff,
  faultsMax: 1000,
  minutesMax: 24 * 60,
  pauseMs: [500, 6000] as const,
  restoreDelayMs: [200, 3000] as const,
  gapMinMs: 500,
} as const;

/** Checks the parameters; returns a one-line error naming the parameter, or undefined. */
export function checkParams(p: ScheduleParams): string | undefined {
  if (!Number.isInteger(p.seed) || p.seed < 0 || p.seed > LIMITS.seedMax) {
    return `--seed: expected an integer in [0, ${LIMITS.seedMax}], got ${p.seed}`;
  }
  if (!Number.isInteger(p.faults) || p.faults < 0 || p.faults > LIMITS.faultsMax) {
    return `--faults: expected an integer in [0, ${LIMITS.faultsMax}], got ${p.faults}`;
  }
  if (!Number.isFinite(p.minutes) || p.minutes <= 0 || p.minutes > LIMITS.minutesMax) {
    return `--minutes: expected a number in (0, ${LIMITS.minutesMax}], got ${p.minutes}`;
  }
  if (p.robots.length < 1) return `--robots: expected at least 1 robot`;
  return undefined;
}

/** The mean gap between faults so that `faults` of them fit in `minutes`. */
export function meanGapMs(p: Pick<ScheduleParams, "faults" | "minutes">): number {
  if (p.faults === 0) return 0;
  return Math.max(LIMITS.gapMinMs, (p.minutes * 60_000) / p.faults - EXPECTED_FAULT_COST_MS);
}

/** The schedule for these parameters. Pure: same parameters, same schedule. */
export function buildSchedule(p: ScheduleParams): Schedule {
  const err = checkParams(p);
  if (err) throw new Error(err);
  const rng = new Rng(p.seed);
  // Every class once (when there is room), the rest drawn by weight, then shuffled.
  const classes: (typeof FAULT_CLASSES)[number][] = [];
  if (p.faults >= FAULT_CLASSES.length) classes.push(...FAULT_CLASSES);
  const total = FAULT_CLASSES.reduce((s, c) => s + c.weight, 0);
  while (classes.length < p.faults) {
    let r = rng.next() * total;
    let c = FAULT_CLASSES[0];
    for (const k of FAULT_CLASSES) {
      r -= k.weight;
      if (r < 0) {
        c = k;
        break;
      }
    }
    classes.push(c);
  }
  rng.shuffle(classes);
  const mean = meanGapMs(p);
  const items = classes.map((c, i): Fault => {
    const gapMs = Math.max(LIMITS.gapMinMs, Math.round(mean * (0.3 + 1.4 * rng.next())));
    const f: Fault = {
      n: i + 1,
      gapMs,
      component: c.component,
      action: c.action,
      moment: "any",
      restore: "sigcont",
    };
    if (c.component === "agent" || c.component === "spire-agent") f.robot = rng.pick(p.robots);
    if (c.action === "queued-results") {
      f.moment = "queued-results";
      f.restore = "devenv-start";
      f.restoreDelayMs = rng.int(...LIMITS.restoreDelayMs);
    } else if (c.action === "pause") {
      f.moment = rng.chance(0.5) ? "mid-task" : "any";
      f.pauseMs = rng.int(...LIMITS.pauseMs);
    } else {
      f.moment = rng.chance(0.5) ? "mid-task" : "any";
      if (c.component === "spire-agent") {
        f.restore = "supervisor";
      } else if (c.component === "mosquitto" && rng.chance(0.5)) {
        f.restore = "supervisor";
      } else {
        f.restore = "devenv-start";
        f.restoreDelayMs = rng.int(...LIMITS.restoreDelayMs);
      }
    }
    return f;
  });
  return { ...p, robots: [...p.robots], items };
}

/** One line, e.g. `#03 +2.4s kill -9 agent robot-002 mid-task; devenv start 1.2s later`. */
export function formatFault(f: Fault): string {
  const n = `#${String(f.n).padStart(2, "0")}`;
  const who = f.robot ? `${f.component} ${f.robot}` : f.component;
  const what = f.action === "kill"
    ? `kill -9 ${who}`
    : f.action === "pause"
    ? `SIGSTOP ${who} for ${(f.pauseMs! / 1000).toFixed(1)}s`
    : `kill -9 mosquitto, then kill -9 ${who} once a result of it is queued`;
  const when = f.moment === "mid-task" ? " mid-task" : "";
  const restore = f.restore === "sigcont"
    ? "SIGCONT"
    : f.restore === "supervisor"
    ? `${f.component === "mosquitto" ? "broker-identity" : "the agent"} restarts it`
    : `devenv start ${(f.restoreDelayMs! / 1000).toFixed(1)}s later`;
  return `${n} +${(f.gapMs / 1000).toFixed(1)}s ${what}${when}; ${restore}`;
}

export function formatSchedule(s: Schedule): string {
  const head = `seed ${s.seed}, ${s.items.length} faults over ${s.minutes} min, robots ${
    s.robots.join(",")
  }`;
  return [head, ...s.items.map(formatFault)].join("\n");
}

/** The command that replays this schedule. */
export function replayCommand(s: ScheduleParams): string {
  return `deno task chaos --seed ${s.seed} --faults ${s.faults} --minutes ${s.minutes} --robots ${s.robots.length}`;
}

/** The task stream: which robot gets the next task, how long it runs, when the next comes. */
export interface TaskDraw {
  robot: string;
  /** How long the task sleeps between its start and end records. */
  sleepMs: number;
  /** Delay before the next task is created. */
  nextInMs: number;
}

/** An endless, seeded task stream (its own PRNG stream, independent of the faults). */
export function* taskStream(seed: number, robots: string[]): Generator<TaskDraw> {
  const rng = new Rng((seed ^ 0x5bd1e995) >>> 0);
  while (true) {
    yield {
      robot: rng.pick(robots),
      sleepMs: rng.int(100, 2500),
      nextInMs: rng.int(200, 900),
    };
  }
}
