/**
 * The agent's configuration: `config/agent/plugins.yaml` (the guide's `spire:` section plus
 * `robot:`, `mqtt:`, `tasks:` and `rotation:`), then environment variables, then flags. Flags
 * override env, env overrides the file.
 *
 * Which file: `--config FILE`; else `DIR/agent.yaml` of `--data-dir DIR` (what
 * `k8s4r agent --enroll` wrote); else the project's `config/agent/plugins.yaml`; else the
 * production `/etc/k8s4r/agent.yaml` (src/fleet/paths.ts); else none (the guide's defaults).
 *
 * Every error is one line naming the file, the line, the key and what was expected
 * (`ConfigError`). `${VAR}` and `${VAR:-default}` are interpolated in string values; an unset
 * variable without a default is an error that names it.
 */
import { isAbsolute, resolve } from "node:path";
import { isMap, isScalar, isSeq, LineCounter, parseDocument, type Scalar } from "yaml";
import type { Node, Pair, YAMLMap } from "yaml";
import { ConfigError, UsageError } from "../cli/errors.ts";
import { isRobotId } from "../fleet/topics.ts";
import {
  brokerSpiffeId,
  DEFAULT_AGENT_SOCKET,
  fleetServerSpiffeId,
  robotSpiffeId,
} from "../fleet/mod.ts";
import { GO_DURATION } from "../spire/agent.ts";
import { isLoopbackHost } from "../fleet/addresses.ts";
import { PRODUCTION_AGENT_CONFIG } from "../fleet/paths.ts";
import type { NodeAttestorConfig } from "../spire/node_attestor.ts";
import {
  type BrokerUrl,
  type HostPort,
  parseBrokerUrl,
  parseHostPort,
} from "../fleet/addresses.ts";
import { DEFAULT_CLOCK_SKEW_SECONDS, MAX_TASK_TTL_SECONDS } from "../mqtt/signed.ts";
import { allowEnvEntryError, DEFAULT_ALLOW_ENV } from "./task_sandbox.ts";

export { type BrokerUrl, parseBrokerUrl };

export const SPIRE_LOG_LEVELS = ["DEBUG", "INFO", "WARN", "ERROR"] as const;
export const NODE_ATTESTORS = ["join_token", "x509pop"] as const;
export type SpireLogLevel = typeof SPIRE_LOG_LEVELS[number];

export interface AgentSpireConfig {
  socketPath: string;
  trustDomain: string;
  serverHost: string;
  serverPort: number;
  /** The join token itself (from `${SPIRE_JOIN_TOKEN}`). Never logged, never on argv. */
  joinToken?: string;
  /** A 0600 file holding the join token (alternative to `joinToken`). Absolute. */
  joinTokenFile?: string;
  /** Absolute. The SPIRE agent's data directory. */
  dataDir: string;
  logLevel: SpireLogLevel;
  /** Absolute. The exported SPIRE bundle used for secure bootstrap. */
  trustBundlePath: string;
  /** Supervise our own spire-agent (true) or use one already running at socketPath. */
  manage: boolean;
  /** The managed spire-agent's `experimental.sync_interval`; undefined = SPIRE's default (5 s). */
  syncInterval?: string;
  /** Absolute. The spire-agent binary to run; undefined = look it up (and check its version). */
  agentBin?: string;
  /** How the node attests: a join token (default) or x509pop with a key and certificate. */
  nodeAttestor: NodeAttestorConfig;
  /** The managed spire-agent's Prometheus telemetry exporter (loopback); undefined = none. */
  telemetry?: { host: string; port: number };
}

export interface AgentMqttConfig {
  /** Normalised to `mqtts://host:port`. */
  brokerUrl: string;
  host: string;
  port: number;
  brokerSpiffeId: string;
  heartbeatSeconds: number;
  keepaliveSeconds: number;
  /**
   * MQTT 5 session expiry: how long the broker keeps our session while we are away. Default 0
   * (none): Mosquitto 2.0.11-2.0.21 corrupts its session-expiry list when it reloads (SIGHUP, a
   * renewed broker certificate) while a robot's session is away, and then expires another
   * client's live session or crashes (docs/PROTOCOL.md, "Robot side"). The protocol does not
   * need one: the agent subscribes on every connect and the server sends tasks and cancels on
   * every register.
   */
  sessionExpirySeconds: number;
}

export interface AgentConfig {
  /** The file that was read (absolute), or undefined when none existed and none was asked. */
  file?: string;
  robotId: string;
  /** `spiffe://<td>/robot/<robotId>`. */
  spiffeId: string;
  spire: AgentSpireConfig;
  mqtt: AgentMqttConfig;
  tasks: AgentTasksConfig;
  rotation: {
    /** Reconnect with a fresh SVID at the latest this long before the current one expires. */
    marginSeconds: number;
  };
  /**
   * The durable outbound queue (results and heartbeats waiting for the broker's PUBACK, in
   * `<stateDir>/outbox.log`). When full, the oldest heartbeats are dropped; results never are
   * (when results alone fill it, new tasks are refused until it drains).
   */
  queue: {
    maxMessages: number;
    maxBytes: number;
  };
  /**
   * Absolute. Where the k8s4r agent keeps its own state: task ids, running tasks, the outbound
   * queue, a transient token file.
   */
  stateDir: string;
  /**
   * The agent's own Prometheus page (docs/METRICS.md): `metrics.listen` (or `--metrics-listen`),
   * a loopback `HOST:PORT`; undefined = not served (the heartbeat still carries the telemetry).
   */
  metrics: { listen?: { hostname: string; port: number } };
}

export interface AgentTasksConfig {
  /**
   * `["*"]` allows every executable; otherwise names (allowing the file the name resolves to
   * with the agent's PATH) or absolute paths.
   */
  allow: string[];
  /**
   * Environment variables a task may set: names, or prefixes ending in `*` (default
   * `DEFAULT_ALLOW_ENV`: LANG, LANGUAGE, LC_*, TZ). A task setting any other is refused.
   */
  allowEnv: string[];
  /** Grace between SIGTERM and SIGKILL when a task times out or is cancelled. */
  killGraceSeconds: number;
  /** Run tasks as this unprivileged user (name or uid); unset: as the agent's own uid. */
  user?: string;
  /** Their group (default: the user's primary group). */
  group?: string;
  /** The fleet server's SPIFFE ID: the only signer accepted. */
  signerSpiffeId: string;
  /** Allowed difference between the robot's and the server's clocks. */
  clockSkewSeconds: number;
  /** Tasks created longer ago than this (plus the skew) are refused as replays. */
  maxAgeSeconds: number;
  /** Tasks running at once; more are refused (`busy`). */
  maxConcurrent: number;
  /** rlimits of each task. */
  cpuSeconds: number;
  memoryBytes: number;
  openFiles: number;
  /** RLIMIT_NPROC of the task user (only with `user`). */
  maxProcesses: number;
}

/** Command-line overrides (flags win over env and file). */
export interface AgentFlags {
  robotId?: string;
  config?: string;
  brokerUrl?: string;
  socket?: string;
  dataDir?: string;
  joinTokenFile?: string;
  heartbeatSeconds?: number;
  noManageSpire?: boolean;
  /** `--spire-sync-interval`: a Go duration (the dev stack passes a short one). */
  spireSyncInterval?: string;
  /** `--spire-agent-bin`: the spire-agent to run (the dev stack passes the one it checked). */
  spireAgentBin?: string;
  /** `--metrics-listen HOST:PORT` (loopback), or "" to serve no metrics page. */
  metricsListen?: string;
  /** `--spire-telemetry HOST:PORT`: the managed spire-agent's Prometheus exporter (loopback). */
  spireTelemetry?: string;
}

export const DEFAULT_CONFIG_PATH = "config/agent/plugins.yaml";

// ---------------------------------------------------------------------------------------------
// Interpolation

const VAR_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/**
 * Replaces `${VAR}` and `${VAR:-default}`. `$$` is a literal `$`. Throws an Error with what
 * was expected; the caller turns it into a ConfigError with file, line and key.
 */
export function interpolate(text: string, env: Record<string, string | undefined>): string {
  let out = "";
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "$" && text[i + 1] === "$") {
      out += "$";
      i += 2;
      continue;
    }
    if (c === "$" && text[i + 1] === "{") {
      const end = text.indexOf("}", i + 2);
      if (end < 0) throw new Error(`unterminated \${ in ${JSON.stringify(text)}`);
      const body = text.slice(i + 2, end);
      const sep = body.indexOf(":-");
      const name = sep >= 0 ? body.slice(0, sep) : body;
      if (!VAR_NAME.test(name)) {
        throw new Error(
          `expected \${NAME} or \${NAME:-default} with NAME like SPIRE_JOIN_TOKEN, got \${${body}}`,
        );
      }
      const value = env[name];
      if (sep >= 0) {
        out += value !== undefined && value !== "" ? value : body.slice(sep + 2);
      } else {
        if (value === undefined) {
          throw new Error(
            `environment variable ${name} is not set (use \${${name}:-default} for a default)`,
          );
        }
        out += value;
      }
      i = end + 1;
      continue;
    }
    out += c;
    i++;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The file

type Kind =
  | { t: "string"; nonEmpty?: boolean }
  | { t: "bool" }
  | { t: "int"; min: number; max: number }
  | { t: "enum"; values: readonly string[] }
  | { t: "list" };

const SCHEMA: Record<string, Record<string, Kind>> = {
  spire: {
    socketPath: { t: "string", nonEmpty: true },
    trustDomain: { t: "string", nonEmpty: true },
    serverAddr: { t: "string", nonEmpty: true },
    joinToken: { t: "string" },
    joinTokenFile: { t: "string" },
    dataDir: { t: "string", nonEmpty: true },
    logLevel: { t: "enum", values: SPIRE_LOG_LEVELS },
    trustBundlePath: { t: "string", nonEmpty: true },
    manage: { t: "bool" },
    nodeAttestor: { t: "enum", values: NODE_ATTESTORS },
    x509popKeyPath: { t: "string", nonEmpty: true },
    x509popCertPath: { t: "string", nonEmpty: true },
  },
  mqtt: {
    brokerUrl: { t: "string", nonEmpty: true },
    brokerSpiffeId: { t: "string" },
    heartbeatSeconds: { t: "int", min: 1, max: 3600 },
    keepaliveSeconds: { t: "int", min: 5, max: 3600 },
    sessionExpirySeconds: { t: "int", min: 0, max: 7 * 24 * 3600 },
  },
  tasks: {
    allow: { t: "list" },
    allowEnv: { t: "list" },
    killGraceSeconds: { t: "int", min: 1, max: 600 },
    user: { t: "string" },
    group: { t: "string" },
    signerSpiffeId: { t: "string" },
    clockSkewSeconds: { t: "int", min: 0, max: 3600 },
    maxAgeSeconds: { t: "int", min: 60, max: 30 * 24 * 3600 },
    maxConcurrent: { t: "int", min: 1, max: 256 },
    cpuSeconds: { t: "int", min: 1, max: 7 * 24 * 3600 },
    memoryBytes: { t: "int", min: 16 * 1024 * 1024, max: 2 ** 50 },
    openFiles: { t: "int", min: 16, max: 1 << 20 },
    maxProcesses: { t: "int", min: 1, max: 1 << 22 },
  },
  rotation: {
    marginSeconds: { t: "int", min: 1, max: 24 * 3600 },
  },
  queue: {
    maxMessages: { t: "int", min: 10, max: 1_000_000 },
    maxBytes: { t: "int", min: 1024 * 1024, max: 1024 * 1024 * 1024 },
  },
  robot: {
    id: { t: "string", nonEmpty: true },
  },
  metrics: {
    listen: { t: "string" },
  },
};

/** Defaults of the task sandbox (docs/PROTOCOL.md, "Task sandbox"). */
export const DEFAULT_TASK_LIMITS = {
  maxConcurrent: 4,
  cpuSeconds: 3600,
  memoryBytes: 1024 * 1024 * 1024,
  openFiles: 1024,
  maxProcesses: 256,
} as const;

/** Defaults of the outbound queue: ~27 h of heartbeats at 10 s, or 128 full-size results. */
export const DEFAULT_QUEUE_MAX_MESSAGES = 10_000;
export const DEFAULT_QUEUE_MAX_BYTES = 32 * 1024 * 1024;

type Value = string | boolean | number | string[];
/** Values read from the file, by "section.key", with the line each came from. */
export type FileValues = Map<string, { value: Value; line: number }>;

const TRUST_DOMAIN_RE = /^[a-z0-9._-]+$/;

function describeNode(node: unknown): string {
  if (isScalar(node)) {
    const v = node.value;
    if (v === null) return "nothing";
    return typeof v === "string" ? JSON.stringify(v) : String(v);
  }
  if (isMap(node)) return "a mapping";
  if (isSeq(node)) return "a list";
  return "nothing";
}

/** Parses and type-checks the YAML text. Exported for tests. */
export function parseAgentYaml(
  text: string,
  file: string,
  env: Record<string, string | undefined>,
): FileValues {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false, uniqueKeys: true });
  const lineOf = (node: Node | Pair | null | undefined): number | undefined => {
    const range = (node as { range?: [number, number, number] } | null | undefined)?.range;
    return range ? lineCounter.linePos(range[0]).line : undefined;
  };
  if (doc.errors.length > 0) {
    const e = doc.errors[0];
    const line = e.linePos?.[0]?.line ?? lineCounter.linePos(e.pos[0]).line;
    throw new ConfigError(file, line, undefined, `invalid YAML: ${e.message.split("\n")[0]}`);
  }
  const out: FileValues = new Map();
  const root = doc.contents;
  if (root === null || (isScalar(root) && root.value === null)) return out; // empty file
  if (!isMap(root)) {
    throw new ConfigError(
      file,
      lineOf(root),
      undefined,
      `expected a mapping with sections ${Object.keys(SCHEMA).join(", ")}, got ${
        describeNode(root)
      }`,
    );
  }
  for (const pair of (root as YAMLMap<unknown, unknown>).items) {
    const keyNode = pair.key as Scalar | null;
    const section = String(isScalar(keyNode) ? keyNode.value : keyNode);
    const line = lineOf(keyNode as Node);
    const spec = SCHEMA[section];
    if (!spec) {
      throw new ConfigError(
        file,
        line,
        section,
        `unknown section; expected one of ${Object.keys(SCHEMA).join(", ")}`,
      );
    }
    const value = pair.value as Node | null;
    if (value === null || (isScalar(value) && value.value === null)) continue; // "spire:" alone
    if (!isMap(value)) {
      throw new ConfigError(file, line, section, `expected a mapping, got ${describeNode(value)}`);
    }
    for (const item of (value as YAMLMap<unknown, unknown>).items) {
      const kNode = item.key as Scalar | null;
      const key = String(isScalar(kNode) ? kNode.value : kNode);
      const kLine = lineOf(kNode as Node);
      const full = `${section}.${key}`;
      const kind = spec[key];
      if (!kind) {
        throw new ConfigError(
          file,
          kLine,
          full,
          `unknown key; expected one of ${Object.keys(spec).join(", ")}`,
        );
      }
      const vNode = item.value as Node | null;
      const vLine = lineOf(vNode) ?? kLine ?? 0;
      out.set(full, {
        value: checkValue(vNode, kind, file, vLine, full, env, (n) => lineOf(n) ?? vLine),
        line: vLine,
      });
    }
  }
  return out;
}

function checkValue(
  node: Node | null,
  kind: Kind,
  file: string,
  line: number,
  key: string,
  env: Record<string, string | undefined>,
  lineOf: (node: Node) => number,
): Value {
  const fail = (expected: string): never => {
    throw new ConfigError(file, line, key, `expected ${expected}, got ${describeNode(node)}`);
  };
  const str = (n: unknown, what: string): string => {
    if (!isScalar(n) || typeof n.value !== "string") return fail(what);
    try {
      return interpolate(n.value, env);
    } catch (err) {
      throw new ConfigError(file, line, key, (err as Error).message);
    }
  };
  switch (kind.t) {
    case "string": {
      const s = str(node, "a string");
      if (kind.nonEmpty && s === "") {
        throw new ConfigError(file, line, key, 'expected a non-empty string, got ""');
      }
      return s;
    }
    case "bool": {
      if (isScalar(node) && typeof node.value === "boolean") return node.value;
      if (isScalar(node) && typeof node.value === "string") {
        const s = str(node, "true or false");
        if (s === "true" || s === "false") return s === "true";
        throw new ConfigError(file, line, key, `expected true or false, got ${JSON.stringify(s)}`);
      }
      return fail("true or false");
    }
    case "int": {
      let n: unknown = isScalar(node) ? node.value : undefined;
      if (typeof n === "string") {
        const s = str(node, "an integer");
        n = /^-?\d+$/.test(s.trim()) ? Number(s) : s;
      }
      if (typeof n !== "number" || !Number.isInteger(n) || n < kind.min || n > kind.max) {
        throw new ConfigError(
          file,
          line,
          key,
          `expected an integer in ${kind.min}..${kind.max}, got ${
            typeof n === "string" ? JSON.stringify(n) : describeNode(node)
          }`,
        );
      }
      return n;
    }
    case "enum": {
      const s = str(node, `one of ${kind.values.join(", ")}`);
      if (!kind.values.includes(s)) {
        throw new ConfigError(
          file,
          line,
          key,
          `expected one of ${kind.values.join(", ")}, got ${JSON.stringify(s)}`,
        );
      }
      return s;
    }
    case "list": {
      if (!isSeq(node)) return fail("a list of strings");
      return node.items.map((item) => {
        if (!isScalar(item) || typeof item.value !== "string" || item.value === "") {
          throw new ConfigError(
            file,
            lineOf(item as Node),
            key,
            `expected a list of non-empty strings, got an item ${describeNode(item)}`,
          );
        }
        return str(item, "a string");
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Putting file, env and flags together

export interface LoadOptions {
  cwd: string;
  env: Record<string, string | undefined>;
  flags: AgentFlags;
  /** The production config looked for last. Default `/etc/k8s4r/agent.yaml`; tests move it. */
  productionConfig?: string;
}

/**
 * The config file to read when no `--config` is given, in order: `DIR/agent.yaml` of
 * `--data-dir DIR`, the project's `config/agent/plugins.yaml`, the production config. Undefined
 * when none exists.
 */
export async function findAgentConfigFile(
  opts: LoadOptions,
): Promise<{ file: string; display: string } | undefined> {
  const candidates: { file: string; display: string }[] = [];
  if (opts.flags.dataDir !== undefined) {
    const f = resolve(opts.cwd, opts.flags.dataDir, "agent.yaml");
    candidates.push({ file: f, display: f });
  }
  candidates.push({ file: resolve(opts.cwd, DEFAULT_CONFIG_PATH), display: DEFAULT_CONFIG_PATH });
  const prod = opts.productionConfig ?? PRODUCTION_AGENT_CONFIG;
  candidates.push({ file: prod, display: prod });
  for (const c of candidates) {
    try {
      if ((await Deno.stat(c.file)).isFile) return c;
    } catch { /* not there */ }
  }
  return undefined;
}

/** Reads the file (if present), applies env and flags, validates the result. */
export async function loadAgentConfig(opts: LoadOptions): Promise<AgentConfig> {
  const { cwd, env, flags } = opts;
  const explicit = flags.config !== undefined;
  const found = explicit ? undefined : await findAgentConfigFile(opts);
  const file = explicit
    ? resolve(cwd, flags.config!)
    : found?.file ?? resolve(cwd, DEFAULT_CONFIG_PATH);
  const display = explicit ? flags.config! : found?.display ?? DEFAULT_CONFIG_PATH;
  let text: string | undefined;
  try {
    text = await Deno.readTextFile(file);
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound) || explicit) {
      throw new ConfigError(
        display,
        undefined,
        undefined,
        err instanceof Deno.errors.NotFound
          ? "file not found"
          : `cannot read: ${(err as Error).message}`,
      );
    }
  }
  return agentConfigFromText(text, {
    cwd,
    env,
    flags,
    file: text !== undefined ? file : undefined,
    display,
  }).config;
}

/**
 * What `loadAgentConfig` does once the file is read (`text` undefined: no file): parse,
 * type-check, apply env and flags. Pure, so `k8s4r doctor` judges a plugins.yaml exactly as
 * the agent does. `values` are the file's own settings, with their lines.
 */
export function agentConfigFromText(
  text: string | undefined,
  opts: LoadOptions & { file?: string; display: string },
): { config: AgentConfig; values: FileValues } {
  const values: FileValues = text !== undefined
    ? parseAgentYaml(text, opts.display, opts.env)
    : new Map();
  return { config: buildConfig(values, opts), values };
}

function tasksConfig(
  get: <T extends Value>(key: string, d: T) => T,
  lineOf: (key: string) => number | undefined,
  display: string,
  trustDomain: string,
): AgentTasksConfig {
  // No allow-list: the agent runs no task at all (every task is refused).
  const allow = get("tasks.allow", [] as string[]);
  for (const e of allow) {
    if (e !== "*" && e.includes("/") && !isAbsolute(e)) {
      throw new ConfigError(
        display,
        lineOf("tasks.allow"),
        "tasks.allow",
        `expected "*", program names or absolute paths, got ${JSON.stringify(e)}`,
      );
    }
  }
  const allowEnv = get("tasks.allowEnv", [...DEFAULT_ALLOW_ENV] as string[]);
  for (const e of allowEnv) {
    const error = allowEnvEntryError(e);
    if (error) throw new ConfigError(display, lineOf("tasks.allowEnv"), "tasks.allowEnv", error);
  }
  const signer = get("tasks.signerSpiffeId", "") || fleetServerSpiffeId(trustDomain);
  if (!/^spiffe:\/\/[a-z0-9._-]+\/\S+$/.test(signer)) {
    throw new ConfigError(
      display,
      lineOf("tasks.signerSpiffeId"),
      "tasks.signerSpiffeId",
      `expected a SPIFFE ID like ${fleetServerSpiffeId(trustDomain)}, got ${
        JSON.stringify(signer)
      }`,
    );
  }
  const user = get("tasks.user", "") || undefined;
  const group = get("tasks.group", "") || undefined;
  if (group !== undefined && user === undefined) {
    throw new ConfigError(
      display,
      lineOf("tasks.group"),
      "tasks.group",
      "expected tasks.user too (the group of the user tasks run as)",
    );
  }
  return {
    allow,
    allowEnv,
    killGraceSeconds: get("tasks.killGraceSeconds", 5),
    user,
    group,
    signerSpiffeId: signer,
    clockSkewSeconds: get("tasks.clockSkewSeconds", DEFAULT_CLOCK_SKEW_SECONDS),
    maxAgeSeconds: get("tasks.maxAgeSeconds", MAX_TASK_TTL_SECONDS),
    maxConcurrent: get("tasks.maxConcurrent", DEFAULT_TASK_LIMITS.maxConcurrent),
    cpuSeconds: get("tasks.cpuSeconds", DEFAULT_TASK_LIMITS.cpuSeconds),
    memoryBytes: get("tasks.memoryBytes", DEFAULT_TASK_LIMITS.memoryBytes),
    openFiles: get("tasks.openFiles", DEFAULT_TASK_LIMITS.openFiles),
    maxProcesses: get("tasks.maxProcesses", DEFAULT_TASK_LIMITS.maxProcesses),
  };
}

function buildConfig(
  values: FileValues,
  o: LoadOptions & { file?: string; display: string },
): AgentConfig {
  const { env, flags, cwd, display } = o;
  const get = <T extends Value>(key: string, d: T): T => (values.get(key)?.value as T) ?? d;
  const lineOf = (key: string) => values.get(key)?.line;
  const abs = (p: string) => (isAbsolute(p) ? p : resolve(cwd, p));

  // Robot id: flag, then ROBOT_ID, then the file's robot.id (what --enroll wrote).
  const robotId = flags.robotId ?? (env["ROBOT_ID"] || undefined) ?? get("robot.id", "");
  if (robotId === undefined || robotId === "") {
    throw new UsageError(
      "agent: --robot-id ID (or ROBOT_ID) is required",
      "on a robot host, enroll first: k8s4r agent --enroll FILE (it writes robot.id to agent.yaml)",
    );
  }
  if (!flags.robotId && !env["ROBOT_ID"] && !isRobotId(robotId)) {
    throw new ConfigError(
      display,
      lineOf("robot.id"),
      "robot.id",
      `expected [a-z0-9][a-z0-9-]{0,62}, got ${JSON.stringify(robotId)}`,
    );
  }
  if (!isRobotId(robotId)) {
    throw new UsageError(
      `agent: robot id ${JSON.stringify(robotId)}: expected [a-z0-9][a-z0-9-]{0,62}`,
    );
  }

  const trustDomain = get("spire.trustDomain", "k8s4r.example.org");
  if (!TRUST_DOMAIN_RE.test(trustDomain)) {
    throw new ConfigError(
      display,
      lineOf("spire.trustDomain"),
      "spire.trustDomain",
      `expected a trust domain of lowercase letters, digits, '.', '-', '_', got ${
        JSON.stringify(trustDomain)
      }`,
    );
  }
  const serverAddr = get("spire.serverAddr", "localhost:8081");
  let sa: HostPort;
  try {
    sa = parseHostPort(serverAddr);
  } catch (err) {
    throw new ConfigError(
      display,
      lineOf("spire.serverAddr"),
      "spire.serverAddr",
      (err as Error).message,
    );
  }

  // Broker URL: flag, then MQTT_BROKER_URL, then file (which usually interpolates the env).
  let brokerRaw: string;
  let brokerWhere: (msg: string) => Error;
  if (flags.brokerUrl !== undefined) {
    brokerRaw = flags.brokerUrl;
    brokerWhere = (m) => new UsageError(`agent: --broker-url: ${m}`);
  } else if (env["MQTT_BROKER_URL"]) {
    brokerRaw = env["MQTT_BROKER_URL"]!;
    brokerWhere = (m) => new UsageError(`agent: MQTT_BROKER_URL: ${m}`);
  } else {
    brokerRaw = get("mqtt.brokerUrl", "ssl://localhost:8883");
    brokerWhere = (m) => new ConfigError(display, lineOf("mqtt.brokerUrl"), "mqtt.brokerUrl", m);
  }
  let broker: BrokerUrl;
  try {
    broker = parseBrokerUrl(brokerRaw);
  } catch (err) {
    throw brokerWhere((err as Error).message);
  }

  const brokerId = get("mqtt.brokerSpiffeId", "") || brokerSpiffeId(trustDomain);
  if (!/^spiffe:\/\/[a-z0-9._-]+\/\S+$/.test(brokerId)) {
    throw new ConfigError(
      display,
      lineOf("mqtt.brokerSpiffeId"),
      "mqtt.brokerSpiffeId",
      `expected a SPIFFE ID like spiffe://${trustDomain}/mqtt-broker, got ${
        JSON.stringify(brokerId)
      }`,
    );
  }

  let heartbeatSeconds: number = get<number>("mqtt.heartbeatSeconds", 10);
  if (flags.heartbeatSeconds !== undefined) {
    const h = flags.heartbeatSeconds;
    if (!Number.isInteger(h) || h < 1 || h > 3600) {
      throw new UsageError(`agent: --heartbeat-seconds expects an integer in 1..3600, got ${h}`);
    }
    heartbeatSeconds = h;
  }

  if (flags.spireSyncInterval !== undefined && !GO_DURATION.test(flags.spireSyncInterval)) {
    throw new UsageError(
      `agent: --spire-sync-interval expects a Go duration like 500ms or 5s, got '${flags.spireSyncInterval}'`,
    );
  }

  const dataDir = abs(flags.dataDir ?? get("spire.dataDir", "./.spire-data/agent"));
  // SPIRE_JOIN_TOKEN wins over the file's literal; the guide's file interpolates it anyway.
  const joinToken = env["SPIRE_JOIN_TOKEN"] || get("spire.joinToken", "") || undefined;
  const jtf = flags.joinTokenFile ?? (get("spire.joinTokenFile", "") || undefined);
  const attestor = get("spire.nodeAttestor", "join_token") as typeof NODE_ATTESTORS[number];
  let nodeAttestor: NodeAttestorConfig = { type: "join_token" };
  if (attestor === "x509pop") {
    const key = get("spire.x509popKeyPath", "");
    const cert = get("spire.x509popCertPath", "");
    for (const [k, v] of [["spire.x509popKeyPath", key], ["spire.x509popCertPath", cert]]) {
      if (!v) {
        throw new ConfigError(
          display,
          lineOf("spire.nodeAttestor"),
          k,
          "expected a path: spire.nodeAttestor x509pop needs x509popKeyPath and x509popCertPath",
        );
      }
    }
    nodeAttestor = { type: "x509pop", privateKeyPath: abs(key), certificatePath: abs(cert) };
  }

  // The loopback metrics page: flag, then the file. Only a loopback address: robots must not open
  // a port to their network (the fleet sees the same values through the heartbeat).
  let metricsListen: { hostname: string; port: number } | undefined;
  const ml = flags.metricsListen ?? get("metrics.listen", "");
  if (ml !== "") {
    const where = flags.metricsListen !== undefined
      ? (m: string) => new UsageError(`agent: --metrics-listen: ${m}`)
      : (m: string) => new ConfigError(display, lineOf("metrics.listen"), "metrics.listen", m);
    let hp: HostPort;
    try {
      hp = parseHostPort(ml, "127.0.0.1:9803");
    } catch (err) {
      throw where((err as Error).message);
    }
    if (!isLoopbackHost(hp.host)) {
      throw where(
        `expected a loopback address (127.0.0.1, [::1], localhost), got ${JSON.stringify(ml)}`,
      );
    }
    metricsListen = { hostname: hp.host, port: hp.port };
  }
  let telemetry: { host: string; port: number } | undefined;
  if (flags.spireTelemetry !== undefined && flags.spireTelemetry !== "") {
    let hp: HostPort;
    try {
      hp = parseHostPort(flags.spireTelemetry, "127.0.0.1:9802");
    } catch (err) {
      throw new UsageError(`agent: --spire-telemetry: ${(err as Error).message}`);
    }
    if (!isLoopbackHost(hp.host)) {
      throw new UsageError(
        `agent: --spire-telemetry: expected a loopback address, got ${
          JSON.stringify(flags.spireTelemetry)
        }`,
      );
    }
    telemetry = hp;
  }

  return {
    file: o.file,
    robotId,
    spiffeId: robotSpiffeId(trustDomain, robotId),
    spire: {
      socketPath: abs(flags.socket ?? get("spire.socketPath", DEFAULT_AGENT_SOCKET)),
      trustDomain,
      serverHost: sa.host,
      serverPort: sa.port,
      joinToken,
      joinTokenFile: jtf !== undefined ? abs(jtf) : undefined,
      dataDir,
      logLevel: get("spire.logLevel", "INFO") as SpireLogLevel,
      trustBundlePath: abs(
        get("spire.trustBundlePath", "./config/mosquitto/certs/spire-ca.crt"),
      ),
      manage: flags.noManageSpire ? false : get("spire.manage", true),
      syncInterval: flags.spireSyncInterval,
      agentBin: flags.spireAgentBin !== undefined ? abs(flags.spireAgentBin) : undefined,
      nodeAttestor,
      telemetry,
    },
    mqtt: {
      brokerUrl: broker.url,
      host: broker.host,
      port: broker.port,
      brokerSpiffeId: brokerId,
      heartbeatSeconds,
      keepaliveSeconds: get("mqtt.keepaliveSeconds", 30),
      sessionExpirySeconds: get("mqtt.sessionExpirySeconds", 0),
    },
    tasks: tasksConfig(get, lineOf, display, trustDomain),
    rotation: { marginSeconds: get("rotation.marginSeconds", 300) },
    queue: {
      maxMessages: get("queue.maxMessages", DEFAULT_QUEUE_MAX_MESSAGES),
      maxBytes: get("queue.maxBytes", DEFAULT_QUEUE_MAX_BYTES),
    },
    stateDir: resolve(dataDir, "k8s4r-agent"),
    metrics: { listen: metricsListen },
  };
}
