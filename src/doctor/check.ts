/**
 * The doctor's vocabulary: a check, its result, and the context through which every check
 * reaches the outside world (files, network, processes, SPIRE, clock). Checks never touch
 * `Deno.*` directly, so each one is unit-tested with fakes (see `testing.ts`).
 */
import type { Io } from "../cli/io.ts";
import type { Ports } from "../fleet/ports.ts";
import type { RobotHostPaths } from "../fleet/paths.ts";
import type { AgentDataState } from "../spire/agent_state.ts";
import type { MqttProbeOptions, MqttProbeResult } from "../mqtt/probe.ts";
import type { ProcessRunner } from "../process/mod.ts";

export type Status = "ok" | "warn" | "fail" | "skip" | "crash";
export const STATUSES: readonly Status[] = ["ok", "warn", "fail", "skip", "crash"];

export interface CheckResult {
  status: Status;
  /** One line: what was found. */
  detail: string;
  /** One line: how to fix it (an exact command), for warn and fail. */
  hint?: string;
  /** Extra lines shown with --verbose (log tails, hardening notes, versions). */
  info?: string[];
}

/** A robot host's view: its paths and what its config says (`k8s4r doctor --robot`). */
export interface RobotHostContext {
  paths: RobotHostPaths;
  /** Why the doctor thinks it runs on a robot: "--robot", "--data-dir DIR", "/etc/k8s4r/...". */
  reason: string;
}

export type GroupId =
  | "enrollment"
  | "reachability"
  | "identity"
  | "tools"
  | "config"
  | "spire-server"
  | "spire-agent"
  | "ca-bundle"
  | "broker"
  | "docker"
  | "server"
  | "tasks"
  | "stack";

export const GROUPS: readonly GroupId[] = [
  "tools",
  "config",
  "spire-server",
  "spire-agent",
  "ca-bundle",
  "broker",
  "docker",
  "server",
  "tasks",
  "stack",
];

/** The groups of a robot host's checks (`checks/robot.ts`). */
export const ROBOT_GROUPS: readonly GroupId[] = [
  "enrollment",
  "reachability",
  "identity",
  "tasks",
];

export interface Check {
  /** `group.name`, e.g. `tools.spire-server`. */
  id: string;
  group: GroupId;
  title: string;
  /** Ids of checks that must not have failed/skipped/crashed for this one to run. */
  dependsOn?: string[];
  /** Default: the run's default timeout (2000 ms). */
  timeoutMs?: number;
  /** What the runner reports when this check times out. Every check declares one. */
  timeout: TimeoutSpec;
  run(ctx: CheckContext): Promise<CheckResult>;
}

/** The process a check talks to, so a hang can be pinned on it. */
export type Peer =
  | { name: string; unixSocket: string }
  | { name: string; tcpPort: number };

export interface TimeoutSpec {
  /**
   * One line for the hint of a timed-out check: what the hang means and what to run
   * (`spire-agent accepted the connection on S but never answered: it is stopped or hung. ...`).
   */
  hint(ctx: DoctorContext): string;
  /**
   * Who should have answered. On a timeout the runner finds its pid (the socket's or the
   * port's owner) and its state in /proc/PID/stat: a stopped process (`T`) is named in the
   * detail, and the hint becomes `kill -CONT PID`.
   */
  peer?(ctx: DoctorContext): Peer;
}

// ---------------------------------------------------------------------------------------------
// What the environment looks like to a check.

export interface FileInfo {
  isFile: boolean;
  isDirectory: boolean;
  isSocket: boolean;
  isSymlink: boolean;
  /** Permission bits (mode & 0o7777). */
  mode: number;
  size: number;
  mtimeMs?: number;
  /** Owner's uid. */
  uid?: number;
}

export interface DoctorFs {
  readTextFile(path: string): Promise<string>;
  /** lstat; undefined when the path does not exist. */
  stat(path: string): Promise<FileInfo | undefined>;
  /** A fresh private (0700) directory. */
  makeTempDir(): Promise<string>;
  writeFile(path: string, data: string, mode: number): Promise<void>;
  removeAll(path: string): Promise<void>;
  /** Absolute path of an executable found on PATH, or undefined. */
  which(name: string): Promise<string | undefined>;
  /** The path with every symbolic link resolved. */
  realPath(path: string): Promise<string>;
}

export interface PortOwner {
  /** Local address as printed (`127.0.0.1`, `0.0.0.0`, `::`). */
  address: string;
  port: number;
  pid?: number;
  comm?: string;
}

export interface HttpResponse {
  status: number;
  body: string;
}

export interface DoctorNet {
  /** Who listens on a TCP port (from /proc/net/tcp{,6} and /proc/PID/fd). */
  listeningOwner(port: number): Promise<PortOwner | undefined>;
  httpGet(url: string, timeoutMs: number): Promise<HttpResponse>;
  /** An MQTT CONNECT over TCP or (m)TLS: real `probeMqtt` of src/mqtt/probe.ts. */
  mqttProbe(opts: MqttProbeOptions): Promise<MqttProbeResult>;
  /** A TCP connect, then close. Resolves with the error's code and message instead of throwing. */
  tcpConnect(host: string, port: number, timeoutMs: number): Promise<TcpResult>;
  /**
   * A TLS handshake (ALPN `h2`, as gRPC speaks), then close: whether the server's chain verified
   * against `ca`, and the chain. The server's name is not checked: the caller checks its
   * SPIFFE ID.
   */
  tlsHandshake(opts: TlsHandshakeOptions): Promise<TlsHandshakeResult>;
}

export interface TcpResult {
  ok: boolean;
  /** `ECONNREFUSED`, `EHOSTUNREACH`, `ETIMEDOUT`, ... */
  code?: string;
  error?: string;
}

export interface TlsHandshakeOptions {
  host: string;
  port: number;
  /** PEM CA certificates. */
  ca: string;
  timeoutMs: number;
}

export interface TlsHandshakeResult {
  handshake: boolean;
  authorized: boolean;
  /** OpenSSL's code: `CERT_NOT_YET_VALID`, `CERT_HAS_EXPIRED`, `UNABLE_TO_VERIFY_LEAF_SIGNATURE`. */
  authorizationError?: string;
  /** DER, leaf first. */
  peerChain: Uint8Array[];
  code?: string;
  error?: string;
}

/** A process as /proc/PID/stat shows it. */
export interface ProcessInfo {
  pid: number;
  comm: string;
  /** R running, S sleeping, D waiting on I/O, T stopped (SIGSTOP, Ctrl-Z), t traced, Z zombie. */
  state: string;
}

/** Processes, read from /proc (real: `adapters.ts`). */
export interface DoctorProc {
  /** The pid serving the listening unix socket at `path` (/proc/net/unix + /proc/PID/fd). */
  unixSocketOwner(path: string): Promise<number | undefined>;
  /** /proc/PID/stat; undefined when the process is gone or not visible. */
  stat(pid: number): Promise<ProcessInfo | undefined>;
}

export interface SpireBinaries {
  server: string;
  agent: string;
  /** Where they were found: "cache", "PATH", "env". */
  source: string;
  version?: string;
}

export interface HealthResult {
  /** grpc.health.v1 status name: SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN. */
  status: string;
}

export interface FetchedSvid {
  spiffeId: string;
  /** DER, leaf first. */
  chain: Uint8Array[];
  /** PKCS#8 DER. */
  key: Uint8Array;
  /** DER CA certificates of the SVID's trust domain. */
  bundle: Uint8Array[];
}

export interface ChainVerification {
  ok: boolean;
  error?: string;
}

/** The SPIRE/SPIFFE pieces, behind one small interface (real: `adapters.ts`). */
export interface DoctorSpire {
  findBinaries(): Promise<SpireBinaries | undefined>;
  /** grpc.health.v1.Health/Check over a unix socket. Throws when unreachable. */
  health(socketPath: string, timeoutMs: number): Promise<HealthResult>;
  isAttested(agentDataDir: string): Promise<boolean>;
  /** First X509SVIDResponse of the Workload API. Throws on error (PermissionDenied...). */
  fetchX509Svids(socketPath: string, timeoutMs: number): Promise<FetchedSvid[]>;
  verifyChain(chain: Uint8Array[], bundle: Uint8Array[], nowMs: number): ChainVerification;
  /** What a SPIRE agent left in its data dir (src/spire/agent_state.ts). */
  agentData(dataDir: string): Promise<AgentDataState | undefined>;
}

export type BrokerMode = "native" | "docker";

export interface DoctorOptions {
  robotId: string;
  broker: BrokerMode;
  /** Hardening findings are warnings (otherwise info lines). */
  production: boolean;
  /** Per-check default timeout. */
  timeoutMs: number;
  /** Docker container name of the broker in docker mode. */
  container: string;
}

/**
 * The control host's paths the checks read: the dev stack's layout, handed in by the CLI
 * composition (src/cli/doctor_paths.ts), so the doctor never imports devenv.
 */
export interface ControlHostPaths {
  /** The project directory (holds config/). */
  root: string;
  trustDomain: string;
  ports: Ports;
  spireServerSocket: string;
  spireServerConfig: string;
  agentPluginsYaml: string;
  caBundleFile: string;
  mosquittoDir: string;
  serverCredentialsFile: string;
  files: {
    spireServerLog: string;
    serverLog: string;
    mosquittoLog: string;
    brokerIdentityLog: string;
    /** `{mode, cmd, args}` of the running broker. */
    brokerStateFile: string;
  };
  /** The broker's container name in docker mode. */
  brokerContainer: string;
}

/** One robot's paths on the control host (a dev-stack robot). */
export interface RobotPaths {
  robotId: string;
  spiffeId: string;
  nodeSpiffeId: string;
  agentSocket: string;
  agentDataDir: string;
  joinTokenFile: string;
  logFile: string;
}

/**
 * One component of the dev stack's component table, as the doctor sees it: the CLI
 * composition (src/cli/doctor_paths.ts) hands these in, so the doctor iterates the very table
 * `devenv start`, `status` and `stop` iterate, without importing devenv.
 */
export interface StackComponentCheck {
  name: string;
  status(): Promise<{
    running: boolean;
    healthy: boolean;
    pid: number | null;
    endpoint: string;
    detail: string;
  }>;
  /** What to do when it is down or unhealthy (one line). */
  hint(): string;
}

/** The dev stack's components for a project directory ([] when there is no dev stack). */
export type StackComponents = (io: Io) => StackComponentCheck[];

/** How the CLI composition maps a project directory to those paths. */
export type StackPaths = (
  cwd: string,
  env: Record<string, string | undefined>,
  robotId: string,
) => { layout: ControlHostPaths; robot: RobotPaths };

/** Everything a run shares. */
export interface DoctorContext {
  io: Io;
  env: Record<string, string | undefined>;
  layout: ControlHostPaths;
  robot: RobotPaths;
  /** On a robot host: what the robot's own files say (see robot_host.ts). */
  robotHost?: RobotHostContext;
  options: DoctorOptions;
  fs: DoctorFs;
  net: DoctorNet;
  proc: DoctorProc;
  spire: DoctorSpire;
  runner: ProcessRunner;
  clock: { now(): number };
  /** The doctor's own uid (files of a robot's data dir must be its). */
  uid: number;
  /**
   * Work several checks need (the Workload API fetch, the mTLS handshake) runs once per run:
   * the first caller starts it, the others await the same promise.
   */
  memo<T>(key: string, fn: () => Promise<T>): Promise<T>;
}

/** What one check receives: the shared context plus its own deadline. */
export interface CheckContext extends DoctorContext {
  /** Aborted when this check times out. */
  signal: AbortSignal;
  /**
   * The deadline for the calls this check makes: its budget plus `CALL_GRACE_MS`, so that a
   * hang always ends as the runner's timeout (which carries the timeout hint and the peer's
   * state), never as a call's own "deadline exceeded" without them. `signal` ends the calls
   * that take one at the budget.
   */
  timeoutMs: number;
}

/** How much longer than its check a call may wait (see `CheckContext.timeoutMs`). */
export const CALL_GRACE_MS = 250;

export function ok(detail: string, info?: string[]): CheckResult {
  return info?.length ? { status: "ok", detail, info } : { status: "ok", detail };
}
export function warn(detail: string, hint: string, info?: string[]): CheckResult {
  return info?.length ? { status: "warn", detail, hint, info } : { status: "warn", detail, hint };
}
export function fail(detail: string, hint: string, info?: string[]): CheckResult {
  return info?.length ? { status: "fail", detail, hint, info } : { status: "fail", detail, hint };
}
export function skip(detail: string): CheckResult {
  return { status: "skip", detail };
}

/** A memo that runs each key once. */
export function makeMemo(): <T>(key: string, fn: () => Promise<T>) => Promise<T> {
  const cache = new Map<string, Promise<unknown>>();
  return <T>(key: string, fn: () => Promise<T>): Promise<T> => {
    let p = cache.get(key) as Promise<T> | undefined;
    if (!p) {
      p = fn();
      // Nobody may be awaiting yet; keep an unawaited rejection from being "unhandled".
      p.catch(() => {});
      cache.set(key, p);
    }
    return p;
  };
}

export { formatDuration } from "../fleet/duration.ts";

/** Paths relative to the project root, for messages. */
export function rel(ctx: DoctorContext, path: string): string {
  const root = ctx.layout.root.endsWith("/") ? ctx.layout.root : ctx.layout.root + "/";
  return path.startsWith(root) ? path.slice(root.length) : path;
}
