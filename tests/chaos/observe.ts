/**
 * What the campaign reads back from the stack, as pure parsers:
 * - the run files the chaos task appends to (`start <token> <ms> <pid>`, `end <token> <ms>`);
 * - the agents' logs (`<iso> agent[<id>] <event> k=v ...`): boots, MQTT connects and
 *   disconnects, task reports;
 * - the server's log (`<iso> INFO robot <id> is offline (missed 3 heartbeats)`): its own
 *   timestamps of robot state changes;
 * - each poll of `GET /api/robots`: online/offline changes and heartbeat counter steps.
 * Lines that do not parse are counted, never fatal.
 */

export interface RunLine {
  robot: string;
  token: string;
  phase: "start" | "end";
  /** Epoch ms, from the task's own clock (`date +%s%3N`). */
  at: number;
}

export interface Parsed<T> {
  items: T[];
  /** Lines that did not parse (a run file must have none). */
  bad: string[];
}

/** The chaos task's run file of one robot. */
export function parseRunFile(robot: string, text: string): Parsed<RunLine> {
  const items: RunLine[] = [];
  const bad: string[] = [];
  for (const line of text.split("\n")) {
    if (line === "") continue;
    const m = /^(start|end) ([A-Za-z0-9_-]+) (\d{13})(?: \d+)?$/.exec(line);
    if (!m) {
      bad.push(line);
      continue;
    }
    items.push({ robot, token: m[2], phase: m[1] as "start" | "end", at: Number(m[3]) });
  }
  return { items, bad };
}

export type AgentEventKind =
  | "boot"
  | "connected"
  | "disconnected"
  | "stopped"
  | "received"
  | "report";

export interface AgentEvent {
  robot: string;
  at: number;
  kind: AgentEventKind;
  /** For `received` and `report`: the server's task id; for `report`, the state reported. */
  taskId?: string;
  state?: string;
}

/** `k=v k2="quoted value"` as written by the agent's line logger. */
export function parseFields(rest: string): Record<string, string> {
  const out: Record<string, string> = {};
  const re = /(?:^|\s)([A-Za-z_][\w.]*)=("(?:[^"\\]|\\.)*"|\S*)/g;
  for (const m of rest.matchAll(re)) {
    let v = m[2];
    if (v.startsWith('"')) {
      try {
        v = JSON.parse(v);
      } catch { /* keep raw */ }
    }
    out[m[1]] = v;
  }
  return out;
}

const AGENT_LINE = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z) agent\[([a-z0-9-]+)\] (\S+)(.*)$/;
const AGENT_EVENTS: Record<string, AgentEventKind> = {
  "agent.starting": "boot",
  "mqtt.connected": "connected",
  "mqtt.disconnected": "disconnected",
  "agent.stopped": "stopped",
  "task.received": "received",
  "task.report": "report",
};

/** The events of one agent log that the invariants need; other lines are skipped. */
export function parseAgentLog(text: string): AgentEvent[] {
  const out: AgentEvent[] = [];
  for (const line of text.split("\n")) {
    const m = AGENT_LINE.exec(line);
    if (!m) continue;
    const kind = AGENT_EVENTS[m[3]];
    if (!kind) continue;
    const e: AgentEvent = { robot: m[2], at: Date.parse(m[1]), kind };
    if (kind === "report" || kind === "received") {
      const f = parseFields(m[4]);
      e.taskId = f.task;
      if (kind === "report") e.state = f.state;
    }
    out.push(e);
  }
  return out;
}

export interface Transition {
  robot: string;
  at: number;
  online: boolean;
  reason: string | null;
  source: "api" | "server-log";
}

const SERVER_LINE =
  /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z) \w+ robot ([a-z0-9-]+) (?:is (online|offline|back)\b(?: \((.*)\))?|(registered)\b)/;

/** The robot state changes the server logged, with its own timestamps. */
export function parseServerLog(text: string): Transition[] {
  const out: Transition[] = [];
  for (const line of text.split("\n")) {
    const m = SERVER_LINE.exec(line);
    if (!m) continue;
    const online = m[3] !== "offline";
    out.push({
      robot: m[2],
      at: Date.parse(m[1]),
      online,
      reason: online ? null : m[4] ?? "status offline",
      source: "server-log",
    });
  }
  return out;
}

/** A change of a robot's `heartbeats.missing` (or a fall of `.received`) seen by the poller. */
export interface CounterStep {
  robot: string;
  /** The last poll that saw the old values, and the first that saw the new ones. */
  prevAt: number;
  at: number;
  missing: [number, number];
  received: [number, number];
}

/** What the poller keeps per robot between polls. */
export interface RobotSample {
  at: number;
  online: boolean;
  missing: number;
  received: number;
}

/** The fields of a `GET /api/robots` view the poller reads. */
export interface RobotViewLike {
  id: string;
  online?: boolean;
  /** `online` | `offline` | `unknown` (a server that knows it cannot hear the fleet). */
  state?: string;
  offlineReason?: string | null;
  heartbeats?: { received: number; missing: number };
}

/**
 * One poll of one robot against the previous one: the new sample, the online/offline change
 * (if any), and the counter step (if `missing` changed or `received` went back, which only a
 * registry that lost acknowledged writes does). `state: "unknown"` is neither online nor
 * offline: it keeps the previous value. Servers without `state` are read by `online`.
 */
export function nextSample(
  prev: RobotSample | undefined,
  v: RobotViewLike,
  at: number,
): {
  sample: RobotSample;
  unknown: boolean;
  transition?: Transition & { prevAt: number };
  step?: CounterStep;
} {
  const unknown = v.state === "unknown";
  const online = unknown
    ? prev?.online ?? true
    : v.state !== undefined
    ? v.state === "online"
    : v.online === true;
  const sample: RobotSample = {
    at,
    online,
    missing: v.heartbeats?.missing ?? 0,
    received: v.heartbeats?.received ?? 0,
  };
  const out: ReturnType<typeof nextSample> = { sample, unknown };
  if (!prev) return out;
  if (prev.online !== online) {
    out.transition = {
      robot: v.id,
      at,
      prevAt: prev.at,
      online,
      reason: online ? null : v.offlineReason ?? null,
      source: "api",
    };
  }
  if (prev.missing !== sample.missing || sample.received < prev.received) {
    out.step = {
      robot: v.id,
      prevAt: prev.at,
      at,
      missing: [prev.missing, sample.missing],
      received: [prev.received, sample.received],
    };
  }
  return out;
}
