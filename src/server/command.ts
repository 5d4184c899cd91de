/**
 * `k8s4r server`, `k8s4r robots`, `k8s4r task run`.
 */
import { X509Source } from "../spiffe/mod.ts";
import type { Args, CommandSpec } from "../cli/mod.ts";
import { CliError, errorMessage, UsageError } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import { defaultLayout } from "../devenv/layout.ts";
import { brokerSpiffeId } from "../fleet/mod.ts";
import { delay } from "../process/mod.ts";
import { isRobotId } from "../fleet/topics.ts";
import { VERSION } from "../version.ts";
import type { Logger } from "./fleet.ts";
import {
  FleetServer,
  loadMqttCredentials,
  type MqttTlsProvider,
  SERVER_CLIENT_ID,
} from "./fleet_server.ts";
import { parseHostPort } from "./http_api.ts";
import {
  describePostgres,
  loadDatabasePassword,
  parseDatabaseUrl,
  type PostgresConfig,
  redactSecrets,
} from "./registry_postgres.ts";
import { svidTlsProvider } from "./svid_tls.ts";
import { FINAL_STATES } from "./tasks.ts";

/** Log lines on stderr. A connection string's password never reaches one (`redactSecrets`). */
function ioLogger(io: Io, secrets: () => (string | undefined)[] = () => []): Logger {
  const line = (level: string, msg: string) =>
    io.stderr.write(`${new Date().toISOString()} ${level} ${redactSecrets(msg, secrets())}\n`);
  return { info: (m) => line("INFO", m), warn: (m) => line("WARN", m) };
}

/** Where `robots` and `task run` find the server: --server, K8S4R_SERVER_URL, or the default. */
function serverUrl(args: Args, io: Io): string {
  const layout = defaultLayout(io.cwd, io.env);
  const raw = args.string("server") ?? io.env["K8S4R_SERVER_URL"] ??
    `http://127.0.0.1:${layout.ports.http}`;
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    throw new UsageError(`--server: expected a URL like http://127.0.0.1:8090, got '${raw}'`);
  }
  if (u.protocol !== "http:" && u.protocol !== "https:") {
    throw new UsageError(`--server: expected an http:// or https:// URL, got '${raw}'`);
  }
  return raw.replace(/\/+$/, "");
}

async function api<T>(
  base: string,
  path: string,
  init: RequestInit & { signal?: AbortSignal } = {},
): Promise<{ status: number; body: T & { error?: string } }> {
  let res: Response;
  try {
    res = await fetch(`${base}${path}`, {
      ...init,
      headers: { "content-type": "application/json", ...init.headers },
    });
  } catch (err) {
    if (init.signal?.aborted) throw err;
    throw new CliError(
      `cannot reach the fleet server at ${base}: ${errorMessage(err)}`,
      1,
      "is 'k8s4r server' running? (or pass --server URL)",
    );
  }
  const text = await res.text();
  try {
    return { status: res.status, body: JSON.parse(text) };
  } catch {
    throw new CliError(
      `${base}${path}: expected JSON from the fleet server, got HTTP ${res.status}: ${
        text.slice(0, 80)
      }`,
    );
  }
}

const SERVER_FLAG = {
  name: "server",
  type: "string" as const,
  valueName: "URL",
  description: "Fleet server HTTP API (default http://127.0.0.1:8090, env K8S4R_SERVER_URL)",
};

// ---------------------------------------------------------------- server

/** An X.509 SVID source on the Workload API, for `--broker-url mqtts://...`. */
function workloadSource(address: string, spiffeId?: string) {
  return X509Source.create({ address, spiffeId });
}

/**
 * `--database` and its password: undefined for the SQLite default. The password comes from
 * `--database-password-file` (0600) or the environment, never from the URL or argv.
 */
async function databaseConfig(args: Args, io: Io): Promise<PostgresConfig | undefined> {
  const raw = args.string("database");
  const pwFile = args.string("database-password-file");
  if (raw === undefined) {
    if (pwFile !== undefined) {
      throw new UsageError("--database-password-file: only with --database postgres://...");
    }
    return undefined;
  }
  if (args.string("data-dir") !== undefined) {
    throw new UsageError(
      "--data-dir: the SQLite registry's directory; with --database the registry is in PostgreSQL",
    );
  }
  let config: PostgresConfig;
  try {
    config = parseDatabaseUrl(raw, io.env["USER"] || io.env["LOGNAME"] || "postgres");
  } catch (err) {
    throw new UsageError(errorMessage(err));
  }
  try {
    config.password = await loadDatabasePassword(pwFile, io.env);
  } catch (err) {
    throw new CliError(errorMessage(err), 1);
  }
  return config;
}

async function runServer(args: Args, io: Io): Promise<number> {
  const layout = defaultLayout(io.cwd, io.env);
  const postgres = await databaseConfig(args, io);
  const log = ioLogger(io, () => [postgres?.password]);
  const brokerUrl = args.string("broker-url") ?? `mqtt://127.0.0.1:${layout.ports.mqttPlain}`;
  let url: URL;
  try {
    url = new URL(brokerUrl);
  } catch {
    throw new UsageError(
      `--broker-url: expected mqtt://HOST:PORT or mqtts://HOST:PORT, got '${brokerUrl}'`,
    );
  }
  if (url.protocol !== "mqtt:" && url.protocol !== "mqtts:") {
    throw new UsageError(`--broker-url: expected mqtt:// or mqtts://, got '${brokerUrl}'`);
  }
  let http: { hostname: string; port: number };
  try {
    http = parseHostPort(args.string("http-addr") ?? `127.0.0.1:${layout.ports.http}`);
  } catch (err) {
    throw new UsageError(errorMessage(err));
  }
  const hb = args.number("heartbeat-interval");
  if (hb !== undefined && (!Number.isInteger(hb) || hb < 1)) {
    throw new UsageError(`--heartbeat-interval: expected a positive integer, got ${hb}`);
  }

  let username: string | undefined;
  let password: string | undefined;
  let tls: MqttTlsProvider | undefined;
  let closeSource: (() => void | Promise<void>) | undefined;
  if (url.protocol === "mqtt:") {
    const credFile = args.string("mqtt-credentials");
    const envUser = io.env["K8S4R_MQTT_USERNAME"];
    const envPwFile = io.env["K8S4R_MQTT_PASSWORD_FILE"];
    try {
      if (!credFile && envUser && envPwFile) {
        username = envUser;
        password = (await Deno.readTextFile(envPwFile)).replace(/\r?\n$/, "");
        if (!password) throw new Error(`${envPwFile}: password file is empty`);
      } else {
        const c = await loadMqttCredentials(credFile ?? layout.serverCredentialsFile);
        username = c.username;
        password = c.password;
      }
    } catch (err) {
      throw new CliError(errorMessage(err), 1);
    }
  } else {
    const address = args.string("socket-path") ?? io.env["SPIFFE_ENDPOINT_SOCKET"] ??
      "unix:///tmp/spire-agent/agent.sock";
    const source = await workloadSource(
      address.startsWith("unix:") ? address : `unix://${address}`,
      args.string("spiffe-id"),
    ).catch((err) => {
      throw new CliError(`cannot get an X.509 SVID from ${address}: ${errorMessage(err)}`);
    });
    closeSource = () => source.close();
    tls = svidTlsProvider(
      source,
      args.string("broker-spiffe-id") ?? brokerSpiffeId(layout.trustDomain),
    );
  }

  const dataDir = args.string("data-dir") ?? layout.serverDataDir;
  let fatal: ((err: Error) => void) | undefined;
  const fatalP = new Promise<never>((_, reject) => (fatal = reject));
  fatalP.catch(() => {});
  let server: FleetServer;
  try {
    server = await FleetServer.start({
      brokerUrl,
      username,
      password,
      tls,
      clientId: args.string("client-id") ??
        (args.bool("shared-subscription")
          ? `${SERVER_CLIENT_ID}-${Deno.hostname().toLowerCase()}`
          : SERVER_CLIENT_ID),
      sharedSubscription: args.bool("shared-subscription"),
      dataDir,
      postgres,
      http,
      fleet: { heartbeatIntervalSeconds: hb },
      logger: log,
      version: VERSION,
      onFatal: (err) =>
        fatal?.(
          new CliError(
            `the MQTT broker refused the login at ${brokerUrl}: ${err.message}`,
            1,
            "check the credentials file (--mqtt-credentials) or run 'k8s4r devenv start'",
          ),
        ),
    });
  } catch (err) {
    await closeSource?.();
    if (err instanceof CliError) throw err;
    throw new CliError(
      `cannot start the fleet server: ${redactSecrets(errorMessage(err), [postgres?.password])}`,
    );
  }
  const where = postgres ? `registry ${describePostgres(postgres)}` : `data in ${dataDir}`;
  log.info(`HTTP API on ${server.http!.url}, ${where}, broker ${brokerUrl}`);
  const stopped = new Promise<void>((resolve) => {
    if (io.signal.aborted) resolve();
    io.signal.addEventListener("abort", () => resolve(), { once: true });
  });
  try {
    await Promise.race([stopped, fatalP]);
  } finally {
    await server.close();
    await closeSource?.();
    log.info("fleet server stopped");
  }
  return 0;
}

export const serverCommand: CommandSpec = {
  name: "server",
  summary: "Run the fleet server (MQTT on 127.0.0.1:1883, HTTP API on 127.0.0.1:8090)",
  description: `Tracks robots (register, heartbeats, online/offline) in a registry and sends them
tasks over MQTT. Runs until SIGINT/SIGTERM, then disconnects cleanly; its persistent MQTT
session keeps messages robots send meanwhile.

The registry is SQLite in --data-dir by default, or PostgreSQL with --database
postgres://USER@HOST:PORT/DB (unix socket: postgres://USER@/DB?host=/run/postgresql). The
database password is never part of the URL: --database-password-file FILE (mode 0600), or
K8S4R_DATABASE_PASSWORD, or PGPASSWORD.

MQTT credentials for mqtt:// come from --mqtt-credentials FILE (JSON {"username","password"},
mode 0600; default .dev-env/server-mqtt.json), or K8S4R_MQTT_USERNAME plus
K8S4R_MQTT_PASSWORD_FILE. With mqtts:// the server uses an X.509 SVID from the Workload API.`,
  flags: [
    {
      name: "broker-url",
      type: "string",
      valueName: "URL",
      description: "MQTT broker (default mqtt://127.0.0.1:1883; mqtts:// uses an SVID)",
    },
    {
      name: "mqtt-credentials",
      type: "string",
      valueName: "FILE",
      description: "JSON {username, password}, 0600 (default .dev-env/server-mqtt.json)",
    },
    {
      name: "http-addr",
      type: "string",
      valueName: "HOST:PORT",
      description: "HTTP API address (default 127.0.0.1:8090)",
    },
    {
      name: "data-dir",
      type: "string",
      valueName: "DIR",
      description: "Registry directory (default .dev-env/server-data)",
    },
    {
      name: "database",
      type: "string",
      valueName: "URL",
      description:
        "PostgreSQL registry, postgres://USER@HOST:PORT/DB (default: SQLite in --data-dir)",
    },
    {
      name: "database-password-file",
      type: "string",
      valueName: "FILE",
      description: "The PostgreSQL password, mode 0600 (or K8S4R_DATABASE_PASSWORD, PGPASSWORD)",
    },
    {
      name: "shared-subscription",
      type: "boolean",
      description: "Subscribe via $share/k8s4r/... so several servers split the load (MQTT 5)",
    },
    {
      name: "client-id",
      type: "string",
      valueName: "ID",
      description: "MQTT client id of the persistent session (default k8s4r-server)",
    },
    {
      name: "heartbeat-interval",
      type: "number",
      valueName: "S",
      description: "Heartbeat interval for robots that do not announce one (default 10)",
    },
    {
      name: "socket-path",
      type: "string",
      valueName: "PATH",
      description: "Workload API socket for mqtts:// (default /tmp/spire-agent/agent.sock)",
    },
    {
      name: "spiffe-id",
      type: "string",
      valueName: "ID",
      description: "Which SVID to use for mqtts:// when several match",
    },
    {
      name: "broker-spiffe-id",
      type: "string",
      valueName: "ID",
      description:
        "The broker's expected SPIFFE ID for mqtts:// (default spiffe://<td>/mqtt-broker)",
    },
  ],
  run: runServer,
};

// ---------------------------------------------------------------- robots

export interface RobotView {
  id: string;
  /** Absent from servers that predate it. */
  state?: "online" | "offline" | "unknown";
  unknownSince?: string | null;
  online: boolean;
  lastSeen: string;
  svidExpiresAt: string | null;
  offlineReason: string | null;
  agentVersion: string | null;
}

/** "12s ago", "in 42m": coarse, human durations. */
export function humanDuration(ms: number): string {
  const s = Math.round(Math.abs(ms) / 1000);
  const txt = s < 60
    ? `${s}s`
    : s < 3600
    ? `${Math.floor(s / 60)}m`
    : s < 86400
    ? `${Math.floor(s / 3600)}h${
      Math.floor((s % 3600) / 60) ? `${Math.floor((s % 3600) / 60)}m` : ""
    }`
    : `${Math.floor(s / 86400)}d`;
  return ms < 0 ? `${txt} ago` : `in ${txt}`;
}

/** "online", "offline (connection lost)", "unknown since 12:00:00Z (5s ago), last online". */
export function robotStateText(r: RobotView, now = Date.now()): string {
  const state = r.state ?? (r.online ? "online" : "offline");
  if (state === "unknown") {
    const since = r.unknownSince ? Date.parse(r.unknownSince) : NaN;
    return `unknown${
      Number.isFinite(since)
        ? ` since ${r.unknownSince!.replace(/\.\d+Z$/, "Z")} (${humanDuration(since - now)})`
        : ""
    }, last ${r.online ? "online" : "offline"}`;
  }
  return state === "offline" && r.offlineReason ? `offline (${r.offlineReason})` : state;
}

export function renderRobotsTable(robots: RobotView[], now = Date.now()): string {
  const rows = [["ID", "STATE", "LAST SEEN", "SVID EXPIRES"]];
  for (const r of robots) {
    const seen = Date.parse(r.lastSeen);
    const exp = r.svidExpiresAt ? Date.parse(r.svidExpiresAt) : NaN;
    rows.push([
      r.id,
      robotStateText(r, now),
      Number.isFinite(seen)
        ? `${r.lastSeen.replace(/\.\d+Z$/, "Z")} (${humanDuration(seen - now)})`
        : "-",
      Number.isFinite(exp)
        ? `${r.svidExpiresAt!.replace(/\.\d+Z$/, "Z")} (${exp < now ? "EXPIRED " : ""}${
          humanDuration(exp - now)
        })`
        : "-",
    ]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => i === r.length - 1 ? c : c.padEnd(widths[i])).join("  "))
    .join("\n") + "\n";
}

export const robotsCommand: CommandSpec = {
  name: "robots",
  summary: "List robots known to the fleet server",
  flags: [SERVER_FLAG, { name: "json", type: "boolean", description: "Print JSON" }],
  async run(args, io) {
    const base = serverUrl(args, io);
    const { status, body } = await api<{ robots: RobotView[] }>(base, "/api/robots", {
      signal: io.signal,
    });
    if (status !== 200) {
      throw new CliError(`fleet server answered HTTP ${status}: ${body.error ?? "no detail"}`);
    }
    if (args.bool("json")) {
      io.stdout.write(JSON.stringify(body.robots, null, 2) + "\n");
      return 0;
    }
    if (body.robots.length === 0) {
      io.stdout.write("no robots have registered yet\n");
      return 0;
    }
    io.stdout.write(renderRobotsTable(body.robots));
    return 0;
  },
};

// ---------------------------------------------------------------- task run

interface TaskView {
  id: string;
  robotId: string;
  state: string;
  exitCode: number | null;
  stdout: string;
  stderr: string;
  error: string | null;
}

const FINAL = new Set<string>(FINAL_STATES);

async function runTask(args: Args, io: Io): Promise<number> {
  const robot = args.positionals[0];
  if (!isRobotId(robot)) {
    throw new UsageError(
      `task run: invalid robot id '${robot}' (expected [a-z0-9][a-z0-9-]{0,62}, e.g. robot-001)`,
    );
  }
  if (args.rest.length === 0) {
    throw new UsageError("task run: missing command; usage: k8s4r task run ROBOT -- CMD ARGS...");
  }
  const timeout = args.number("timeout") ?? 60;
  if (!Number.isInteger(timeout) || timeout < 1) {
    throw new UsageError(
      `task run: --timeout expects a positive integer of seconds, got ${timeout}`,
    );
  }
  const ttl = args.number("ttl") ?? 300;
  if (!Number.isInteger(ttl) || ttl < 1) {
    throw new UsageError(`task run: --ttl expects a positive integer of seconds, got ${ttl}`);
  }
  const base = serverUrl(args, io);
  const created = await api<{ id: string }>(base, `/api/robots/${robot}/tasks`, {
    method: "POST",
    body: JSON.stringify({ command: args.rest, timeoutSeconds: timeout, ttlSeconds: ttl }),
    signal: io.signal,
  });
  if (created.status !== 201) {
    throw new CliError(
      `cannot create the task on ${robot}: ${created.body.error ?? `HTTP ${created.status}`}`,
    );
  }
  const id = created.body.id;
  let task: TaskView | undefined;
  let warned = false;
  const startedWaiting = Date.now();
  while (true) {
    const r = await api<TaskView>(base, `/api/tasks/${id}`, { signal: io.signal });
    if (r.status !== 200) {
      throw new CliError(`task ${id}: fleet server answered HTTP ${r.status}: ${r.body.error}`);
    }
    task = r.body;
    if (FINAL.has(task.state)) break;
    if (!warned && task.state === "pending" && Date.now() - startedWaiting > 3000) {
      warned = true;
      io.stderr.write(
        `k8s4r: task ${id} is waiting for ${robot} to come online (expires in ${ttl}s)\n`,
      );
    }
    await delay(200, io.signal);
  }
  if (task.stdout) io.stdout.write(task.stdout);
  if (task.stderr) io.stderr.write(task.stderr);
  switch (task.state) {
    case "done": {
      const code = task.exitCode;
      if (code === null) return 1;
      return code < 0 ? 128 + Math.min(-code, 127) : Math.min(code, 255);
    }
    case "refused":
      throw new CliError(`task ${id} was refused by ${robot}: ${task.error ?? "no reason given"}`);
    case "failed":
      throw new CliError(`task ${id} failed on ${robot}: ${task.error ?? "no reason given"}`);
    default:
      throw new CliError(
        `task ${id} expired: ${robot} did not receive it within ${ttl}s`,
        1,
        `is ${robot} online? see 'k8s4r robots'`,
      );
  }
}

export const taskCommand: CommandSpec = {
  name: "task",
  summary: "Run tasks on robots",
  subcommands: [{
    name: "run",
    summary: "Run a command on a robot and wait for its result",
    description: `Creates a task through the fleet server's API, waits for its result and prints the
command's stdout (and stderr to stderr). Exits with the command's exit code; a refused, failed
or expired task is an error (exit 1).

Example: k8s4r task run robot-001 -- uname -a`,
    positionals: [{ name: "robot", description: "Robot id, e.g. robot-001" }],
    acceptsRest: true,
    flags: [
      {
        name: "timeout",
        type: "number",
        valueName: "S",
        description: "Seconds the command may run on the robot (default 60)",
      },
      {
        name: "ttl",
        type: "number",
        valueName: "S",
        description: "Seconds the task may wait for an offline robot (default 300)",
      },
      SERVER_FLAG,
    ],
    run: runTask,
  }],
};
