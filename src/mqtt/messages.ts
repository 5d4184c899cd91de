/**
 * Versioned JSON messages of the k8s4r protocol, with hand-written validators.
 *
 * Every message is a JSON object `{ "v": 1, "type": ..., "robotId": ..., "ts": ..., ... }`.
 * Rules (docs/PROTOCOL.md):
 * - `v` is the protocol major version. A receiver rejects a higher `v` than it speaks; unknown
 *   extra fields are tolerated (that is how minor additions are made without a version bump).
 * - Every timestamp is an RFC 3339 UTC string, as produced by `Date.prototype.toISOString()`.
 * - Validators never throw on bad input: they return the first precise error, as a path and what
 *   was expected (`heartbeat.load: expected array of 3 numbers, got "x"`).
 */
import { type DownKind, isRobotId, parseTopic, type UpKind } from "../fleet/topics.ts";

export const PROTOCOL_VERSION = 1;
/** Largest payload accepted on any topic. Task status carries bounded output tails. */
export const MAX_PAYLOAD_BYTES = 256 * 1024;
/** Bound on each of stdout/stderr tails in a task status (characters). */
export const MAX_OUTPUT_TAIL = 64 * 1024;
export const MAX_COMMAND_ARGS = 256;
export const MAX_TIMEOUT_SECONDS = 24 * 3600;
export const TASK_ID_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;

export interface Envelope {
  v: number;
  robotId: string;
  /** When the sender created the message (RFC 3339). */
  ts: string;
}

export interface DeviceInfo {
  hostname: string;
  os: string;
  arch: string;
  cpus: number;
  memoryBytes: number;
  /** 1, 5 and 15 minute load averages. */
  load: [number, number, number];
  uptimeSeconds: number;
}

export interface RegisterMessage extends Envelope {
  type: "register";
  spiffeId: string;
  agentVersion: string;
  /** How often the agent sends heartbeats; the server declares it offline after 3 misses. */
  heartbeatIntervalSeconds?: number;
  svidExpiresAt: string;
  /** The SVID's notBefore (optional, additive): with `svidExpiresAt`, its lifetime. */
  svidIssuedAt?: string;
  device: DeviceInfo;
  /** The agent process (same as the heartbeat's `bootId`). */
  bootId?: string;
  /** Connection number within the agent process: 1, 2, 3... (see `StatusMessage`). */
  connection?: number;
}

export interface HeartbeatMessage extends Envelope {
  type: "heartbeat";
  /** 1, 2, 3... per agent process; a gap means heartbeats were lost. */
  seq: number;
  /** Identifies the agent process, so a restart (seq back to 1) is not counted as loss. */
  bootId?: string;
  svidExpiresAt: string;
  load?: [number, number, number];
  /** The SVID's notBefore (optional, additive; docs/METRICS.md). */
  svidIssuedAt?: string;
  /** The agent's view of its SPIFFE Workload API stream. */
  workloadApi?: "up" | "down";
  /** Messages in the agent's outbound queue, this heartbeat excluded. */
  outboundQueueDepth?: number;
}

/** Bound of `heartbeat.outboundQueueDepth`. */
export const MAX_OUTBOUND_QUEUE_DEPTH = 10_000_000;
export const WORKLOAD_API_STATES = ["up", "down"] as const;

export type RobotStatus = "online" | "offline";

/**
 * Retained on `up/status`, and the MQTT last will. The will is set at every CONNECT with that
 * connection's `bootId` and `connection`, so the server can order statuses without trusting
 * clocks: within one boot, (connection, online < offline) is a total order; a status of another
 * boot than the robot's current one (set by `register`) is stale.
 */
export interface StatusMessage extends Envelope {
  type: "status";
  status: RobotStatus;
  reason?: string;
  bootId?: string;
  connection?: number;
}

export const TASK_REPORT_STATES = [
  "accepted",
  "running",
  "done",
  "refused",
  "failed",
  "cancelled",
] as const;
export type TaskReportState = typeof TASK_REPORT_STATES[number];

/**
 * Why a robot refused a task it could not trust (`task-status.reason`, state `refused`):
 * - `bad-signature`: unsigned, malformed JWS, chain not under the robot's bundle, or signed by
 *   anyone but the configured fleet server;
 * - `wrong-robot`: correctly signed, but addressed to another robot;
 * - `expired`: correctly signed, arrived after its `expiresAt`;
 * - `replay`: correctly signed, but its id was seen before or its `createdAt` is outside the
 *   robot's window.
 * A task refused for an ordinary reason (allow-list, environment, limits) carries no `reason`.
 */
export const REFUSAL_REASONS = ["bad-signature", "wrong-robot", "expired", "replay"] as const;
export type RefusalReason = typeof REFUSAL_REASONS[number];

/** Robot -> server, on `up/task`. */
export interface TaskStatusMessage extends Envelope {
  type: "task-status";
  taskId: string;
  state: TaskReportState;
  /** Required when state is "done". */
  exitCode?: number | null;
  /** Tails, at most MAX_OUTPUT_TAIL characters each. */
  stdout?: string;
  stderr?: string;
  /** Bytes of output cut from the front of the tail (the output was longer). */
  stdoutTruncatedBytes?: number;
  stderrTruncatedBytes?: number;
  /** Required when state is "refused" or "failed". */
  error?: string;
  /** Only with state "refused": the task could not be trusted (see REFUSAL_REASONS). */
  reason?: RefusalReason;
}

/** Server -> robot, on `down/task`. */
export interface TaskMessage extends Envelope {
  type: "task";
  id: string;
  command: string[];
  env: Record<string, string>;
  cwd?: string;
  timeoutSeconds: number;
  createdAt: string;
  /** A robot should refuse the task when it arrives after this (it was not delivered in time). */
  expiresAt?: string;
}

/** Server -> robot, on `down/cancel`. */
export interface CancelMessage extends Envelope {
  type: "cancel";
  taskId: string;
  reason?: string;
}

export type UpMessage = RegisterMessage | HeartbeatMessage | StatusMessage | TaskStatusMessage;
export type DownMessage = TaskMessage | CancelMessage;

/** The `type` each topic kind carries. */
export const UP_TYPE: Record<UpKind, UpMessage["type"]> = {
  register: "register",
  heartbeat: "heartbeat",
  status: "status",
  task: "task-status",
};
export const DOWN_TYPE: Record<DownKind, DownMessage["type"]> = {
  task: "task",
  cancel: "cancel",
};

export type Result<T> = { ok: true; value: T } | { ok: false; error: string };

class Invalid extends Error {}

/** Walks an unknown value with a path, throwing `Invalid` with a precise message. */
class Check {
  constructor(private readonly obj: Record<string, unknown>, private readonly path: string) {}

  static root(value: unknown, path: string): Check {
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
      throw new Invalid(`${path}: expected a JSON object, got ${describe(value)}`);
    }
    return new Check(value as Record<string, unknown>, path);
  }

  fail(key: string, expected: string, got: unknown): never {
    throw new Invalid(`${this.path}.${key}: expected ${expected}, got ${describe(got)}`);
  }

  has(key: string): boolean {
    return this.obj[key] !== undefined;
  }

  string(key: string, opts: { max?: number; min?: number; re?: RegExp; what?: string } = {}) {
    const v = this.obj[key];
    const what = opts.what ??
      `string${opts.max !== undefined ? ` of at most ${opts.max} chars` : ""}`;
    if (typeof v !== "string") this.fail(key, what, v);
    if (v.length < (opts.min ?? 0)) this.fail(key, `non-empty ${what}`, v);
    if (opts.max !== undefined && v.length > opts.max) {
      this.fail(key, what, `a string of ${v.length} chars`);
    }
    if (opts.re && !opts.re.test(v)) this.fail(key, what, v);
    return v;
  }

  optString(key: string, opts: { max?: number; min?: number; re?: RegExp; what?: string } = {}) {
    return this.has(key) ? this.string(key, opts) : undefined;
  }

  int(key: string, min: number, max = Number.MAX_SAFE_INTEGER): number {
    const v = this.obj[key];
    if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
      this.fail(key, `integer in [${min}, ${max}]`, v);
    }
    return v;
  }

  number(key: string, min: number): number {
    const v = this.obj[key];
    if (typeof v !== "number" || !Number.isFinite(v) || v < min) {
      this.fail(key, `number >= ${min}`, v);
    }
    return v;
  }

  timestamp(key: string): string {
    const v = this.obj[key];
    if (typeof v !== "string" || !isTimestamp(v)) {
      this.fail(key, "RFC 3339 UTC timestamp like 2025-01-31T12:00:00.000Z", v);
    }
    return v;
  }

  oneOf<T extends string>(key: string, values: readonly T[]): T {
    const v = this.obj[key];
    if (typeof v !== "string" || !(values as readonly string[]).includes(v)) {
      this.fail(key, `one of ${values.join("|")}`, v);
    }
    return v as T;
  }

  load(key: string): [number, number, number] {
    const v = this.obj[key];
    if (
      !Array.isArray(v) || v.length !== 3 ||
      !v.every((n) => typeof n === "number" && Number.isFinite(n) && n >= 0)
    ) {
      this.fail(key, "array of 3 numbers", v);
    }
    return [v[0], v[1], v[2]];
  }

  argv(key: string): string[] {
    const v = this.obj[key];
    if (!Array.isArray(v) || v.length === 0 || v.length > MAX_COMMAND_ARGS) {
      this.fail(key, `non-empty array of at most ${MAX_COMMAND_ARGS} strings`, v);
    }
    v.forEach((a, i) => {
      if (typeof a !== "string") this.fail(`${key}[${i}]`, "string", a);
      if (a.includes("\0")) this.fail(`${key}[${i}]`, "string without NUL", a);
    });
    if (v[0] === "") this.fail(`${key}[0]`, "non-empty program name", v[0]);
    return v as string[];
  }

  env(key: string): Record<string, string> {
    const v = this.obj[key];
    if (typeof v !== "object" || v === null || Array.isArray(v)) {
      this.fail(key, "object of string values", v);
    }
    const out: Record<string, string> = {};
    for (const [k, val] of Object.entries(v)) {
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k)) {
        this.fail(key, "environment variable names matching [A-Za-z_][A-Za-z0-9_]*", k);
      }
      if (typeof val !== "string") this.fail(`${key}.${k}`, "string", val);
      out[k] = val;
    }
    return out;
  }

  object(key: string): Check {
    const v = this.obj[key];
    if (typeof v !== "object" || v === null || Array.isArray(v)) this.fail(key, "object", v);
    return new Check(v as Record<string, unknown>, `${this.path}.${key}`);
  }

  raw(key: string): unknown {
    return this.obj[key];
  }
}

/** A short, bounded description of a bad value for error messages. */
export function describe(v: unknown): string {
  if (v === undefined) return "nothing";
  if (typeof v === "string") {
    if (v.startsWith("a string of ")) return v;
    const s = JSON.stringify(v.length > 40 ? v.slice(0, 40) + "..." : v);
    return s;
  }
  if (Array.isArray(v)) return `an array of ${v.length}`;
  if (v === null) return "null";
  if (typeof v === "object") return "an object";
  return String(v);
}

const TS_RE = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$/;
export function isTimestamp(s: string): boolean {
  return TS_RE.test(s) && Number.isFinite(Date.parse(s));
}

const SPIFFE_ID_RE = /^spiffe:\/\/[a-z0-9._-]+(\/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*$/;

function envelope(c: Check, type: string): Envelope {
  const v = c.raw("v");
  if (typeof v !== "number" || !Number.isInteger(v) || v < 1) {
    throw new Invalid(`${type}.v: expected protocol version integer >= 1, got ${describe(v)}`);
  }
  if (v > PROTOCOL_VERSION) {
    throw new Invalid(
      `${type}.v: unsupported protocol version ${v} (this side speaks ${PROTOCOL_VERSION})`,
    );
  }
  const t = c.raw("type");
  if (t !== type) {
    throw new Invalid(`${type}.type: expected "${type}", got ${describe(t)}`);
  }
  const robotId = c.raw("robotId");
  if (!isRobotId(robotId)) {
    throw new Invalid(
      `${type}.robotId: expected robot id matching [a-z0-9][a-z0-9-]{0,62}, got ${
        describe(robotId)
      }`,
    );
  }
  return { v, robotId, ts: c.timestamp("ts") };
}

function run<T>(fn: () => T): Result<T> {
  try {
    return { ok: true, value: fn() };
  } catch (err) {
    if (err instanceof Invalid) return { ok: false, error: err.message };
    throw err;
  }
}

function device(c: Check): DeviceInfo {
  return {
    hostname: c.string("hostname", { max: 253 }),
    os: c.string("os", { max: 64 }),
    arch: c.string("arch", { max: 64 }),
    cpus: c.int("cpus", 1, 65536),
    memoryBytes: c.int("memoryBytes", 0),
    load: c.load("load"),
    uptimeSeconds: c.number("uptimeSeconds", 0),
  };
}

export function validateRegister(value: unknown): Result<RegisterMessage> {
  return run(() => {
    const c = Check.root(value, "register");
    const env = envelope(c, "register");
    const msg: RegisterMessage = {
      ...env,
      type: "register",
      spiffeId: c.string("spiffeId", { re: SPIFFE_ID_RE, what: "SPIFFE ID (spiffe://...)" }),
      agentVersion: c.string("agentVersion", { min: 1, max: 64 }),
      svidExpiresAt: c.timestamp("svidExpiresAt"),
      device: device(c.object("device")),
    };
    if (c.has("heartbeatIntervalSeconds")) {
      msg.heartbeatIntervalSeconds = c.int("heartbeatIntervalSeconds", 1, 3600);
    }
    issuedAt(c, msg);
    connectionFields(c, msg);
    return msg;
  });
}

export function validateHeartbeat(value: unknown): Result<HeartbeatMessage> {
  return run(() => {
    const c = Check.root(value, "heartbeat");
    const msg: HeartbeatMessage = {
      ...envelope(c, "heartbeat"),
      type: "heartbeat",
      seq: c.int("seq", 0),
      svidExpiresAt: c.timestamp("svidExpiresAt"),
    };
    const bootId = c.optString("bootId", { max: 64 });
    if (bootId !== undefined) msg.bootId = bootId;
    if (c.has("load")) msg.load = c.load("load");
    issuedAt(c, msg);
    if (c.has("workloadApi")) msg.workloadApi = c.oneOf("workloadApi", WORKLOAD_API_STATES);
    if (c.has("outboundQueueDepth")) {
      msg.outboundQueueDepth = c.int("outboundQueueDepth", 0, MAX_OUTBOUND_QUEUE_DEPTH);
    }
    return msg;
  });
}

/** The optional `svidIssuedAt` of register and heartbeat: a timestamp, not after the expiry. */
function issuedAt(c: Check, msg: { svidExpiresAt: string; svidIssuedAt?: string }): void {
  if (!c.has("svidIssuedAt")) return;
  const v = c.timestamp("svidIssuedAt");
  if (Date.parse(v) > Date.parse(msg.svidExpiresAt)) {
    c.fail("svidIssuedAt", `a time not after svidExpiresAt (${msg.svidExpiresAt})`, v);
  }
  msg.svidIssuedAt = v;
}

export function validateStatus(value: unknown): Result<StatusMessage> {
  return run(() => {
    const c = Check.root(value, "status");
    const msg: StatusMessage = {
      ...envelope(c, "status"),
      type: "status",
      status: c.oneOf("status", ["online", "offline"] as const),
    };
    const reason = c.optString("reason", { max: 256 });
    if (reason !== undefined) msg.reason = reason;
    connectionFields(c, msg);
    return msg;
  });
}

/** The optional `bootId` and `connection` of register and status. */
function connectionFields(c: Check, msg: { bootId?: string; connection?: number }): void {
  const bootId = c.optString("bootId", { min: 1, max: 64 });
  if (bootId !== undefined) msg.bootId = bootId;
  if (c.has("connection")) msg.connection = c.int("connection", 1);
}

export function validateTaskStatus(value: unknown): Result<TaskStatusMessage> {
  return run(() => {
    const c = Check.root(value, "task-status");
    const msg: TaskStatusMessage = {
      ...envelope(c, "task-status"),
      type: "task-status",
      taskId: c.string("taskId", {
        re: TASK_ID_RE,
        what: "task id [A-Za-z0-9][A-Za-z0-9_-]{0,63}",
      }),
      state: c.oneOf("state", TASK_REPORT_STATES),
    };
    if (c.raw("exitCode") === null) msg.exitCode = null;
    else if (c.has("exitCode")) msg.exitCode = c.int("exitCode", -255, 255);
    if (msg.state === "done" && typeof msg.exitCode !== "number") {
      throw new Invalid(
        `task-status.exitCode: expected integer when state is "done", got ${
          describe(c.raw("exitCode"))
        }`,
      );
    }
    const stdout = c.optString("stdout", { max: MAX_OUTPUT_TAIL });
    if (stdout !== undefined) msg.stdout = stdout;
    const stderr = c.optString("stderr", { max: MAX_OUTPUT_TAIL });
    if (stderr !== undefined) msg.stderr = stderr;
    for (const k of ["stdoutTruncatedBytes", "stderrTruncatedBytes"] as const) {
      if (c.has(k)) msg[k] = c.int(k, 0);
    }
    const error = c.optString("error", { max: 4096 });
    if (error !== undefined) msg.error = error;
    if (c.has("reason")) {
      msg.reason = c.oneOf("reason", REFUSAL_REASONS);
      if (msg.state !== "refused") {
        throw new Invalid(
          `task-status.reason: expected only with state "refused", got state "${msg.state}"`,
        );
      }
    }
    if ((msg.state === "refused" || msg.state === "failed") && !msg.error) {
      throw new Invalid(
        `task-status.error: expected non-empty string when state is "${msg.state}", got ${
          describe(c.raw("error"))
        }`,
      );
    }
    return msg;
  });
}

export function validateTask(value: unknown): Result<TaskMessage> {
  return run(() => {
    const c = Check.root(value, "task");
    const msg: TaskMessage = {
      ...envelope(c, "task"),
      type: "task",
      id: c.string("id", { re: TASK_ID_RE, what: "task id [A-Za-z0-9][A-Za-z0-9_-]{0,63}" }),
      command: c.argv("command"),
      env: c.has("env") ? c.env("env") : {},
      timeoutSeconds: c.int("timeoutSeconds", 1, MAX_TIMEOUT_SECONDS),
      createdAt: c.timestamp("createdAt"),
    };
    const cwd = c.optString("cwd", { re: /^\/[^\0]*$/, what: "absolute path", max: 4096 });
    if (cwd !== undefined) msg.cwd = cwd;
    if (c.has("expiresAt")) msg.expiresAt = c.timestamp("expiresAt");
    return msg;
  });
}

export function validateCancel(value: unknown): Result<CancelMessage> {
  return run(() => {
    const c = Check.root(value, "cancel");
    const msg: CancelMessage = {
      ...envelope(c, "cancel"),
      type: "cancel",
      taskId: c.string("taskId", {
        re: TASK_ID_RE,
        what: "task id [A-Za-z0-9][A-Za-z0-9_-]{0,63}",
      }),
    };
    const reason = c.optString("reason", { max: 256 });
    if (reason !== undefined) msg.reason = reason;
    return msg;
  });
}

const UP_VALIDATORS: Record<UpKind, (v: unknown) => Result<UpMessage>> = {
  register: validateRegister,
  heartbeat: validateHeartbeat,
  status: validateStatus,
  task: validateTaskStatus,
};
const DOWN_VALIDATORS: Record<DownKind, (v: unknown) => Result<DownMessage>> = {
  task: validateTask,
  cancel: validateCancel,
};

/** Why a received message was dropped; each reason has its own counter on the server. */
export type DropReason =
  | "bad-topic"
  | "too-large"
  | "bad-json"
  | "unsupported-version"
  | "bad-schema"
  | "robot-id-mismatch";

export type Decoded<T> =
  | { ok: true; robotId: string; message: T }
  | { ok: false; reason: DropReason; error: string };

const utf8 = new TextDecoder("utf-8", { fatal: true });

function decodeJson(payload: Uint8Array): { ok: true; value: unknown } | {
  ok: false;
  reason: DropReason;
  error: string;
} {
  if (payload.byteLength > MAX_PAYLOAD_BYTES) {
    return {
      ok: false,
      reason: "too-large",
      error: `payload of ${payload.byteLength} bytes exceeds ${MAX_PAYLOAD_BYTES}`,
    };
  }
  try {
    return { ok: true, value: JSON.parse(utf8.decode(payload)) };
  } catch (err) {
    return {
      ok: false,
      reason: "bad-json",
      error: `payload is not UTF-8 JSON: ${(err as Error).message}`,
    };
  }
}

function finish<T extends Envelope>(
  robotId: string,
  result: Result<T>,
): Decoded<T> {
  if (!result.ok) {
    const reason = /\.v: unsupported protocol version/.test(result.error)
      ? "unsupported-version"
      : "bad-schema";
    return { ok: false, reason, error: result.error };
  }
  if (result.value.robotId !== robotId) {
    return {
      ok: false,
      reason: "robot-id-mismatch",
      error: `payload robotId ${JSON.stringify(result.value.robotId)} differs from topic robot id ${
        JSON.stringify(robotId)
      }`,
    };
  }
  return { ok: true, robotId, message: result.value };
}

/**
 * Decodes a robot -> server message received on `topic`. The topic's robot id is the
 * authenticated one (the broker ACL enforces it); a payload that claims another is dropped.
 */
export function decodeUp(topic: string, payload: Uint8Array): Decoded<UpMessage> {
  const t = parseTopic(topic);
  if (!t.ok) return { ok: false, reason: "bad-topic", error: t.error };
  if (t.direction !== "up") {
    return { ok: false, reason: "bad-topic", error: `topic ${topic}: expected an up topic` };
  }
  const json = decodeJson(payload);
  if (!json.ok) return json;
  return finish(t.robotId, UP_VALIDATORS[t.kind](json.value));
}

/** Decodes a server -> robot message received on `topic` (used by the agent). */
export function decodeDown(topic: string, payload: Uint8Array): Decoded<DownMessage> {
  const t = parseTopic(topic);
  if (!t.ok) return { ok: false, reason: "bad-topic", error: t.error };
  if (t.direction !== "down") {
    return { ok: false, reason: "bad-topic", error: `topic ${topic}: expected a down topic` };
  }
  const json = decodeJson(payload);
  if (!json.ok) return json;
  return finish(t.robotId, DOWN_VALIDATORS[t.kind](json.value));
}

/** Serializes a message for publishing. */
export function encode(msg: UpMessage | DownMessage): Uint8Array {
  return new TextEncoder().encode(JSON.stringify(msg));
}

/** Keeps the last `max` characters of an output stream (for task-status tails). */
export function tail(text: string, max = MAX_OUTPUT_TAIL): string {
  return text.length <= max ? text : text.slice(text.length - max);
}

export function now(): string {
  return new Date().toISOString();
}
