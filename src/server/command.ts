/**
 * `k8s4r server`, `k8s4r robots`, `k8s4r tasks`, `k8s4r task run|cancel`.
 */
import { networkInterfaces } from "node:os";
import { X509Source } from "../spiffe/mod.ts";
import type { Args, CommandSpec } from "../cli/mod.ts";
import { CliError, ConfigError, errorMessage, UsageError } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import { serverDefaults } from "../fleet/paths.ts";
import {
  brokerSpiffeId,
  CONTROL_AGENT_SOCKET,
  DEFAULT_ROLES_FILE,
  fleetServerSpiffeId,
} from "../fleet/mod.ts";
import { delay } from "../process/mod.ts";
import { isRobotId } from "../fleet/topics.ts";
import { type ApiClient, apiClient } from "../operator/client.ts";
import { VERSION } from "../version.ts";
import { isWildcardHost } from "./auth.ts";
import { isLoopbackHost } from "../fleet/addresses.ts";
import type { DownSigner, Logger } from "./fleet.ts";
import { TaskSigner } from "../mqtt/signed.ts";
import {
  FleetServer,
  loadMqttCredentials,
  type MqttTlsProvider,
  SERVER_CLIENT_ID,
} from "./fleet_server.ts";
import { parseHostPort } from "./http_api.ts";
import { DEFAULT_MAX_CONNECTIONS, svidServerTls } from "./https.ts";
import { type LoginState, openLogin } from "./dashboard_open.ts";
import {
  describePostgres,
  loadDatabasePassword,
  parseDatabaseUrl,
  type PostgresConfig,
  redactSecrets,
} from "./registry_postgres.ts";
import { RolesFile } from "./roles.ts";
import { svidTlsProvider } from "./svid_tls.ts";
import { FINAL_STATES, isTaskState, TASK_STATES } from "./tasks.ts";
import { readSecretFile } from "../fs/secret.ts";

/** Log lines on stderr. A connection string's password never reaches one (`redactSecrets`). */
function ioLogger(io: Io, secrets: () => (string | undefined)[] = () => []): Logger {
  const line = (level: string, msg: string) =>
    io.stderr.write(`${new Date().toISOString()} ${level} ${redactSecrets(msg, secrets())}\n`);
  return { info: (m) => line("INFO", m), warn: (m) => line("WARN", m) };
}

const SERVER_FLAG = {
  name: "server",
  type: "string" as const,
  valueName: "URL",
  description:
    "Fleet server API (default: the URL of the operator's credentials, env K8S4R_SERVER_URL)",
};

const OPERATOR_FLAG = {
  name: "operator",
  type: "string" as const,
  valueName: "NAME",
  description: "Act as this operator (default: admin, or the only one; env K8S4R_OPERATOR)",
};

/** The API client of a command, closed when the command ends. */
async function withApi<T>(args: Args, io: Io, fn: (api: ApiClient) => Promise<T>): Promise<T> {
  const api = await apiClient(io, {
    server: args.string("server"),
    operator: args.string("operator"),
  });
  try {
    return await fn(api);
  } finally {
    api.close();
  }
}

/** A non-2xx answer as a one-line error (the API's JSON `error`). */
function apiError(what: string, r: { status: number; body: { error?: string } }): CliError {
  const hint = r.status === 401
    ? "the server does not accept this certificate: renew it with 'k8s4r operator login'"
    : r.status === 403
    ? "ask for a role on the control host: k8s4r operator add NAME --role operator"
    : undefined;
  return new CliError(`${what}: HTTP ${r.status}: ${r.body.error ?? "no detail"}`, 1, hint);
}

// ---------------------------------------------------------------- server

/**
 * The fleet server's own identity from the control host's SPIRE agent. Fails with what to do
 * when no SVID arrives.
 */
async function serverIdentity(io: Io, address: string, spiffeId: string, timeoutMs: number) {
  try {
    return await X509Source.create({
      address: address.startsWith("unix:") ? address : `unix://${address}`,
      spiffeId,
      timeoutMs,
      signal: io.signal,
    });
  } catch (err) {
    throw new CliError(
      `no X.509 SVID for ${spiffeId} from the Workload API at ${address} within ${
        Math.round(timeoutMs / 1000)
      } s: ${errorMessage(err)}`,
      1,
      `is the control host's SPIRE agent running there (--socket-path)? Does an entry give ${spiffeId} to this process? e.g. spire-server entry create -parentID <control host node ID> -spiffeID ${spiffeId} -selector unix:uid:${
        Deno.uid() ?? 0
      } -dns localhost`,
    );
  }
}

/** The warning for a non-loopback --http-addr: what becomes reachable from the network. */
export function exposureWarning(addr: { hostname: string; port: number }): string | undefined {
  if (isLoopbackHost(addr.hostname)) return undefined;
  const where = isWildcardHost(addr.hostname)
    ? `every address of this machine (${addr.hostname || "*"}:${addr.port})`
    : `${addr.hostname}:${addr.port}`;
  return `--http-addr ${addr.hostname}:${addr.port} is not a loopback address: the fleet server's HTTPS API is exposed on ${where}: /healthz (server version and fleet counters) to anyone who can connect, and robots, tasks, task creation (commands run on robots) and cancel to every holder of an operator certificate of this trust domain that has a role. Bind to 127.0.0.1 unless remote operators need it.`;
}

function machineAddresses(): string[] {
  const out: string[] = [];
  for (const list of Object.values(networkInterfaces())) {
    for (const a of list ?? []) out.push(a.address);
  }
  return out;
}

/**
 * Signs tasks and cancels with the server's SVID: at every publish, with the SVID current then
 * (a task may wait up to 7 days; an SVID lives about an hour). The server has no unsigned mode:
 * without an SVID it does not start (`serverIdentity`), and while its SVID is expired nothing is
 * sent (tasks stay pending, counted in `signErrors`, and go out once a new SVID arrives).
 */
function serverSigner(source: X509Source): DownSigner {
  return new TaskSigner(source);
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

/**
 * `k8s4r server`. `makeSigner` is a parameter only so that the benchmark can measure the path
 * before signing side by side (bench/unsigned_server.ts); the CLI always signs with the SVID
 * (`serverSigner`), and no flag, setting or environment variable selects anything else.
 */
export async function runServer(
  args: Args,
  io: Io,
  makeSigner: (source: X509Source) => DownSigner = serverSigner,
): Promise<number> {
  const defaults = serverDefaults(io.cwd, io.env);
  const postgres = await databaseConfig(args, io);
  if (args.bool("shared-subscription") && !postgres) {
    throw new UsageError(
      "--shared-subscription: replicas share one registry, which needs --database postgres://...; " +
        "on SQLite each server would keep its own and mark the others' robots offline (run one server)",
    );
  }
  const log = ioLogger(io, () => [postgres?.password]);
  const brokerUrl = args.string("broker-url") ?? `mqtt://127.0.0.1:${defaults.mqttPlainPort}`;
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
    http = parseHostPort(args.string("http-addr") ?? `127.0.0.1:${defaults.httpPort}`);
  } catch (err) {
    throw new UsageError(errorMessage(err));
  }
  const maxConnections = args.number("http-max-connections");
  if (maxConnections !== undefined && (!Number.isInteger(maxConnections) || maxConnections < 1)) {
    throw new UsageError(
      `--http-max-connections: expected a positive integer, got ${maxConnections}`,
    );
  }
  const hb = args.number("heartbeat-interval");
  if (hb !== undefined && (!Number.isInteger(hb) || hb < 1)) {
    throw new UsageError(`--heartbeat-interval: expected a positive integer, got ${hb}`);
  }
  const svidTimeout = args.number("svid-timeout") ?? 30;
  if (!(svidTimeout > 0)) {
    throw new UsageError(
      `--svid-timeout: expected a positive number of seconds, got ${svidTimeout}`,
    );
  }
  const loginTtlRaw = args.number("dashboard-login-ttl") ??
    (io.env["K8S4R_DASHBOARD_LOGIN_TTL"] ? Number(io.env["K8S4R_DASHBOARD_LOGIN_TTL"]) : 120);
  if (!Number.isInteger(loginTtlRaw) || loginTtlRaw < 1 || loginTtlRaw > 900) {
    throw new UsageError(
      `--dashboard-login-ttl: expected whole seconds in [1, 900], got ${loginTtlRaw}`,
    );
  }
  const rolesPath = args.string("roles") ?? io.env["K8S4R_ROLES_FILE"] ?? DEFAULT_ROLES_FILE;
  const roles = new RolesFile(rolesPath);
  const first = roles.current();
  if (!first.ok) {
    throw new ConfigError(
      rolesPath,
      undefined,
      undefined,
      first.error.replace(`${rolesPath}: `, ""),
    );
  }
  if (first.missing) {
    log.warn(
      `${rolesPath} does not exist: every API request is refused (403) until 'k8s4r operator add' writes it`,
    );
  }
  roles.onChange = (s) =>
    s.ok
      ? log.info(
        `roles: ${
          s.missing
            ? `${rolesPath} is gone, nobody has a role`
            : `${s.config.operators.size} operator(s) from ${rolesPath}`
        }`,
      )
      : log.warn(`roles: ${s.error}; every API request is refused until it is fixed`);
  const warning = exposureWarning(http);
  if (warning) log.warn(warning);

  let username: string | undefined;
  let password: string | undefined;
  let tls: MqttTlsProvider | undefined;
  if (url.protocol === "mqtt:") {
    const credFile = args.string("mqtt-credentials");
    const envUser = io.env["K8S4R_MQTT_USERNAME"];
    const envPwFile = io.env["K8S4R_MQTT_PASSWORD_FILE"];
    try {
      if (!credFile && envUser && envPwFile) {
        username = envUser;
        password = (await readSecretFile(envPwFile, "MQTT password file")).replace(/\r?\n$/, "");
        if (!password) throw new Error(`${envPwFile}: MQTT password file is empty`);
      } else {
        const c = await loadMqttCredentials(credFile ?? defaults.credentialsFile);
        username = c.username;
        password = c.password;
      }
    } catch (err) {
      throw new CliError(errorMessage(err), 1);
    }
  }

  // The server's own identity: it serves HTTPS, signs tasks and cancels, and (mqtts://) logs
  // in to the broker with it.
  const address = args.string("socket-path") ?? io.env["SPIFFE_ENDPOINT_SOCKET"] ??
    CONTROL_AGENT_SOCKET;
  const spiffeId = args.string("spiffe-id") ?? fleetServerSpiffeId(defaults.trustDomain);
  const source = await serverIdentity(io, address, spiffeId, svidTimeout * 1000);
  const closeSource = () => source.close();
  let server: FleetServer | undefined;
  let signErrorsSeen = 0;
  source.onUpdate(() => {
    const s = source.getX509Svid();
    log.info(
      `SVID ${s.id} rotated: serial ${s.serialNumber}, valid until ${s.notAfter.toISOString()}`,
    );
    // Something could not be signed with the old one (it had expired): send it now.
    const errors = server?.fleet.stats.signErrors ?? 0;
    if (server && errors > signErrorsSeen) {
      signErrorsSeen = errors;
      void server.fleet.dispatchAllOnline();
    }
  });
  if (url.protocol === "mqtts:") {
    tls = svidTlsProvider(
      source,
      args.string("broker-spiffe-id") ?? brokerSpiffeId(defaults.trustDomain),
    );
  }
  const svid = source.getX509Svid();
  log.info(
    `identity ${svid.id} (serial ${svid.serialNumber}, valid until ${svid.notAfter.toISOString()}) from ${address}`,
  );

  const dataDir = args.string("data-dir") ?? defaults.dataDir;
  let fatal: ((err: Error) => void) | undefined;
  const fatalP = new Promise<never>((_, reject) => (fatal = reject));
  fatalP.catch(() => {});
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
      http: {
        ...http,
        tls: svidServerTls(source),
        bundles: source,
        roles,
        trustDomain: svid.id.trustDomain.name,
        dnsNames: () => source.getX509Svid().dnsNames,
        interfaceAddresses: isWildcardHost(http.hostname) ? machineAddresses() : [],
        maxConnections,
      },
      fleet: { heartbeatIntervalSeconds: hb, signer: makeSigner(source) },
      // The CAs of the server's own trust domain (the metrics' trust bundle series).
      trustBundle: () =>
        source.getX509BundleForTrustDomain(svid.id.trustDomain)?.authorities.map((c) => ({
          notBefore: new Date(c.validFrom),
          notAfter: new Date(c.validTo),
        })),
      logger: log,
      version: VERSION,
      dashboard: { loginTtlMs: loginTtlRaw * 1000 },
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
    await closeSource();
    if (err instanceof CliError) throw err;
    throw new CliError(
      `cannot start the fleet server: ${redactSecrets(errorMessage(err), [postgres?.password])}`,
    );
  }
  const where = postgres ? `registry ${describePostgres(postgres)}` : `data in ${dataDir}`;
  log.info(
    `HTTPS API on ${server.http!.url} (listening on ${server.http!.addr.hostname}:${
      server.http!.addr.port
    }), roles ${rolesPath}, ${where}, broker ${brokerUrl}`,
  );
  const stopped = new Promise<void>((resolve) => {
    if (io.signal.aborted) resolve();
    io.signal.addEventListener("abort", () => resolve(), { once: true });
  });
  try {
    await Promise.race([stopped, fatalP]);
  } finally {
    await server.close();
    await closeSource();
    log.info("fleet server stopped");
  }
  return 0;
}

export const serverCommand: CommandSpec = {
  name: "server",
  summary: "Run the fleet server (MQTT on 127.0.0.1:1883, HTTPS API on https://localhost:8090)",
  description: `Tracks robots (register, heartbeats, online/offline) in a registry and sends them
tasks over MQTT. Runs until SIGINT/SIGTERM, then disconnects cleanly; its persistent MQTT
session keeps messages robots send meanwhile.

The registry is SQLite in --data-dir by default, or PostgreSQL with --database
postgres://USER@HOST:PORT/DB (unix socket: postgres://USER@/DB?host=/run/postgresql). The
database password is never part of the URL: --database-password-file FILE (mode 0600), or
K8S4R_DATABASE_PASSWORD, or PGPASSWORD.

MQTT credentials for mqtt:// come from --mqtt-credentials FILE (JSON {"username","password"},
mode 0600; default .dev-env/server-mqtt.json), or K8S4R_MQTT_USERNAME plus
K8S4R_MQTT_PASSWORD_FILE (mode 0600). Each secret file must be this user's (or root's) and
readable by nobody else. With mqtts:// the server logs in with its own SVID.

Its identity: the X.509 SVID spiffe://<td>/fleet-server from the control host's SPIRE agent
(--socket-path), followed across rotations. It serves the HTTPS API (clients must present an
operator SVID; roles from --roles, re-read on change), and signs every task and cancel.`,
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
      description:
        "HTTPS API address (default 127.0.0.1:8090; anything but loopback prints a warning)",
    },
    {
      name: "http-max-connections",
      type: "number",
      valueName: "N",
      description:
        `Open HTTPS connections at most; one more is closed at once (default ${DEFAULT_MAX_CONNECTIONS})`,
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
        "PostgreSQL registry, postgres://USER@HOST:PORT/DB[?sslmode=verify-full&sslrootcert=CA.pem] or postgres://USER@/DB?host=/socket/dir (default: SQLite in --data-dir)",
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
      description:
        "Run as one of several replicas on the --database registry: split the robots' messages via $share/<group>/... (MQTT 5; the group name is derived from the broker password)",
    },
    {
      name: "client-id",
      type: "string",
      valueName: "ID",
      description:
        "MQTT client id of the persistent session (default k8s4r-server; over mqtts:// the broker uses the SVID's CN)",
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
      description:
        `Workload API of the control host's SPIRE agent: the server's SVID (default ${CONTROL_AGENT_SOCKET}, env SPIFFE_ENDPOINT_SOCKET)`,
    },
    {
      name: "spiffe-id",
      type: "string",
      valueName: "ID",
      description: "The server's SPIFFE ID (default spiffe://<td>/fleet-server)",
    },
    {
      name: "broker-spiffe-id",
      type: "string",
      valueName: "ID",
      description:
        "The broker's expected SPIFFE ID for mqtts:// (default spiffe://<td>/mqtt-broker)",
    },
    {
      name: "roles",
      type: "string",
      valueName: "FILE",
      description:
        `Roles config, re-read on change (default ${DEFAULT_ROLES_FILE}, env K8S4R_ROLES_FILE)`,
    },
    {
      name: "svid-timeout",
      type: "number",
      valueName: "S",
      description: "How long to wait for the server's SVID at start (default 30)",
    },
    {
      name: "dashboard-login-ttl",
      type: "number",
      valueName: "S",
      description:
        "How long a one-time dashboard login URL stays valid (default 120, env K8S4R_DASHBOARD_LOGIN_TTL)",
    },
  ],
  run: (args, io) => runServer(args, io),
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
  flags: [SERVER_FLAG, OPERATOR_FLAG, { name: "json", type: "boolean", description: "Print JSON" }],
  run: (args, io) =>
    withApi(args, io, async (api) => {
      const r = await api.request<{ robots: RobotView[] }>("GET", "/api/robots", {
        signal: io.signal,
      });
      if (r.status !== 200) throw apiError("GET /api/robots", r);
      if (args.bool("json")) {
        io.stdout.write(JSON.stringify(r.body.robots, null, 2) + "\n");
        return 0;
      }
      if (r.body.robots.length === 0) {
        io.stdout.write("no robots have registered yet\n");
        return 0;
      }
      io.stdout.write(renderRobotsTable(r.body.robots));
      return 0;
    }),
};

// ---------------------------------------------------------------- tasks

export interface TaskListView {
  id: string;
  robotId: string;
  state: string;
  command: string[];
  createdAt: string;
  createdBy: string | null;
  exitCode: number | null;
}

/** The operator's name for `spiffe://<td>/operator/<name>`, else the whole ID. */
function shortId(id: string | null): string {
  if (!id) return "-";
  const m = /^spiffe:\/\/[^/]+\/operator\/([^/]+)$/.exec(id);
  return m ? m[1] : id;
}

export function renderTasksTable(tasks: TaskListView[]): string {
  const rows = [["ID", "ROBOT", "STATE", "CREATED", "CREATED BY", "COMMAND"]];
  for (const t of tasks) {
    const state = t.state === "done" && t.exitCode !== null && t.exitCode !== 0
      ? `done (exit ${t.exitCode})`
      : t.state;
    const cmd = t.command.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : JSON.stringify(a))).join(
      " ",
    );
    rows.push([
      t.id,
      t.robotId,
      state,
      t.createdAt.replace(/\.\d+Z$/, "Z"),
      shortId(t.createdBy),
      cmd.length > 60 ? cmd.slice(0, 57) + "..." : cmd,
    ]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => i === r.length - 1 ? c : c.padEnd(widths[i])).join("  "))
    .join("\n") + "\n";
}

export const MAX_TASKS_LIMIT = 100_000;

async function runTasks(args: Args, io: Io): Promise<number> {
  const robot = args.string("robot");
  if (robot !== undefined && !isRobotId(robot)) {
    throw new UsageError(`tasks: --robot expects a robot id like robot-001, got '${robot}'`);
  }
  const state = args.string("state");
  if (state !== undefined && !isTaskState(state)) {
    throw new UsageError(`tasks: --state expects one of ${TASK_STATES.join(", ")}, got '${state}'`);
  }
  const limit = args.number("limit") ?? 50;
  if (!Number.isInteger(limit) || limit < 1 || limit > MAX_TASKS_LIMIT) {
    throw new UsageError(
      `tasks: --limit expects an integer in 1..${MAX_TASKS_LIMIT}, got ${limit}`,
    );
  }
  return await withApi(args, io, async (api) => {
    const tasks: TaskListView[] = [];
    let cursor: string | null = null;
    let more = false;
    do {
      const q = new URLSearchParams();
      if (robot) q.set("robot", robot);
      if (state) q.set("state", state);
      q.set("limit", String(Math.min(1000, limit - tasks.length + 1)));
      if (cursor) q.set("cursor", cursor);
      const r: {
        status: number;
        body: { tasks: TaskListView[]; nextCursor: string | null; error?: string };
      } = await api.request("GET", `/api/tasks?${q}`, { signal: io.signal });
      if (r.status !== 200) throw apiError("GET /api/tasks", r);
      tasks.push(...r.body.tasks);
      cursor = r.body.nextCursor;
      more = cursor !== null || tasks.length > limit;
    } while (cursor !== null && tasks.length < limit);
    const shown = tasks.slice(0, limit);
    if (args.bool("json")) {
      io.stdout.write(JSON.stringify(shown, null, 2) + "\n");
      return 0;
    }
    if (shown.length === 0) {
      io.stdout.write("no tasks\n");
      return 0;
    }
    io.stdout.write(renderTasksTable(shown));
    if (more) io.stderr.write(`k8s4r: showing the newest ${limit}; more with --limit N\n`);
    return 0;
  });
}

export const tasksCommand: CommandSpec = {
  name: "tasks",
  summary: "List tasks, newest first (paged through the API)",
  description: `Shows who created each task (the operator's SPIFFE ID, by name). Pages through the
API's task list (cursor-based) until --limit tasks are shown.

Example: k8s4r tasks --robot robot-001 --state running`,
  flags: [
    { name: "robot", type: "string", valueName: "ID", description: "Only this robot's tasks" },
    {
      name: "state",
      type: "string",
      valueName: "STATE",
      description: `Only tasks in this state (${TASK_STATES.join(", ")})`,
    },
    { name: "limit", type: "number", valueName: "N", description: "Show at most N (default 50)" },
    { name: "json", type: "boolean", description: "Print JSON" },
    SERVER_FLAG,
    OPERATOR_FLAG,
  ],
  run: runTasks,
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
  return await withApi(args, io, async (api) => {
    const created = await api.request<{ id: string }>("POST", `/api/robots/${robot}/tasks`, {
      body: { command: args.rest, timeoutSeconds: timeout, ttlSeconds: ttl },
      signal: io.signal,
    });
    if (created.status !== 201) {
      const e = apiError(`cannot create the task on ${robot}`, created);
      throw new CliError(
        `cannot create the task on ${robot}: ${created.body.error ?? `HTTP ${created.status}`}`,
        1,
        e.hint,
      );
    }
    const id = created.body.id;
    let task: TaskView | undefined;
    let warned = false;
    const startedWaiting = Date.now();
    while (true) {
      const r = await api.request<TaskView>("GET", `/api/tasks/${id}`, { signal: io.signal });
      if (r.status !== 200) throw apiError(`task ${id}`, r);
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
        throw new CliError(
          `task ${id} was refused by ${robot}: ${task.error ?? "no reason given"}`,
        );
      case "failed":
        throw new CliError(`task ${id} failed on ${robot}: ${task.error ?? "no reason given"}`);
      case "cancelled":
        throw new CliError(`task ${id} was cancelled: ${task.error ?? "no reason given"}`);
      default:
        throw new CliError(
          `task ${id} expired: ${robot} did not receive it within ${ttl}s`,
          1,
          `is ${robot} online? see 'k8s4r robots'`,
        );
    }
  });
}

async function runCancel(args: Args, io: Io): Promise<number> {
  const id = args.positionals[0];
  if (!id || !/^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/.test(id)) {
    throw new UsageError(`task cancel: invalid task id '${id ?? ""}' (see 'k8s4r tasks')`);
  }
  return await withApi(args, io, async (api) => {
    const r = await api.request<{ id: string; state: string; outcome: string }>(
      "POST",
      `/api/tasks/${id}/cancel`,
      { body: {}, signal: io.signal },
    );
    if (r.status !== 202) throw apiError(`cannot cancel task ${id}`, r);
    if (r.body.outcome === "withdrawn") {
      io.stdout.write(`task ${id} cancelled (it had not been sent to its robot)\n`);
      return 0;
    }
    if (!args.bool("wait")) {
      io.stdout.write(`task ${id}: cancel sent to its robot (state ${r.body.state})\n`);
      return 0;
    }
    const deadline = Date.now() + (args.number("wait-timeout") ?? 30) * 1000;
    while (true) {
      const t = await api.request<TaskView>("GET", `/api/tasks/${id}`, { signal: io.signal });
      if (t.status !== 200) throw apiError(`task ${id}`, t);
      if (FINAL.has(t.body.state)) {
        io.stdout.write(`task ${id}: ${t.body.state}${t.body.error ? ` (${t.body.error})` : ""}\n`);
        return t.body.state === "cancelled" ? 0 : 1;
      }
      if (Date.now() > deadline) {
        throw new CliError(
          `task ${id} is still ${t.body.state}: its robot has not reported the cancel`,
          1,
          "is the robot online? see 'k8s4r robots'; the cancel is sent again when it comes back",
        );
      }
      await delay(200, io.signal);
    }
  });
}

export const taskCommand: CommandSpec = {
  name: "task",
  summary: "Run and cancel tasks on robots",
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
      OPERATOR_FLAG,
    ],
    run: runTask,
  }, {
    name: "cancel",
    summary: "Cancel a task: never sent if still pending, else its robot kills it",
    description:
      `A pending task that was not sent yet is cancelled at once and never sent. Otherwise
the server sends its robot a signed cancel (now, or when the robot comes back); the robot kills
the task's process group and reports it cancelled. Needs the operator role.

Example: k8s4r task cancel 6f1c...   (ids: k8s4r tasks)`,
    positionals: [{ name: "id", description: "Task id" }],
    flags: [
      { name: "wait", type: "boolean", description: "Wait until the robot reports the task's end" },
      {
        name: "wait-timeout",
        type: "number",
        valueName: "S",
        description: "With --wait: give up after S seconds (default 30)",
      },
      SERVER_FLAG,
      OPERATOR_FLAG,
    ],
    run: runCancel,
  }],
};

// ---------------------------------------------------------------- dashboard

/** True when a desktop session can show a browser (X11 or Wayland). */
export function hasDisplay(env: Record<string, string | undefined>): boolean {
  return !!(env["DISPLAY"] || env["WAYLAND_DISPLAY"]);
}

async function runDashboard(args: Args, io: Io): Promise<number> {
  return await withApi(args, io, async (api) => {
    const r = await api.request<
      { path: string; id: string; expiresAt: string; operator: string; role: string }
    >(
      "POST",
      "/api/dashboard/login",
      { body: {}, signal: io.signal },
    );
    if (r.status !== 201) throw apiError("POST /api/dashboard/login", r);
    const url = `${api.baseUrl}${r.body.path}`;
    io.stdout.write(`${url}\n`);
    const expiresAt = Date.parse(r.body.expiresAt);
    const left = Math.round((expiresAt - Date.now()) / 1000);
    io.stderr.write(
      `k8s4r: a one-time login for ${r.body.operator} (${r.body.role}): it works once, within ${left}s; the browser then keeps a session cookie\n`,
    );
    if (args.bool("print-url")) return 0;
    if (!hasDisplay(io.env)) {
      io.stderr.write("k8s4r: no display (DISPLAY, WAYLAND_DISPLAY): open the URL in a browser\n");
      return 0;
    }
    // Never on xdg-open's command line (any local user reads argv): a private page leads there.
    await openLogin(url, io, {
      expiresAt,
      state: async () => {
        const s = await api.request<{ state: LoginState }>(
          "GET",
          `/api/dashboard/logins/${encodeURIComponent(r.body.id)}`,
          { signal: io.signal },
        );
        return s.status === 200 ? s.body.state : "pending";
      },
    });
    return 0;
  });
}

export const dashboardCommand: CommandSpec = {
  name: "dashboard",
  summary: "Open the fleet dashboard in a browser (a one-time login URL)",
  description: `Asks the fleet server, over this operator's client certificate, for a one-time
login URL and prints it. When a display exists it also opens it in the desktop's browser,
through a private page (0600, removed once the browser used the login) so the URL is never on
a command line, and waits for the browser to log in. The URL works once and expires within
minutes; its page asks to confirm (a link preview gets nothing); the browser then holds a
session cookie (HttpOnly, Secure, SameSite=Strict) that acts as this operator, with the role the server's roles config gives it.
The server's certificate is a SPIRE SVID: a browser trusts it once the fleet's CA is imported
(README, "Dashboard").

Example: k8s4r dashboard --print-url`,
  flags: [
    { name: "print-url", type: "boolean", description: "Only print the URL, do not open it" },
    SERVER_FLAG,
    OPERATOR_FLAG,
  ],
  run: runDashboard,
};
