/**
 * Shared helpers of the end-to-end suite: one real stack (real SPIRE, real Mosquitto, the real
 * CLI as `deno run -A main.ts ...`) per test file, in a temp project dir on free ports, with the
 * Workload API sockets in a short temp dir.
 *
 * Cleanup is layered: the file's last test stops and cleans the stack and asserts that nothing
 * survived; a module-level `unload` listener (synchronous) stops whatever is left by its pid
 * files and SIGKILLs every process this run ever recorded, so a failing or crashing test never
 * leaves processes or listening ports behind.
 */
import { isLoopbackAddress, listeningSockets } from "../../src/doctor/proc_net.ts";
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import mqtt from "mqtt";
import {
  defaultLayout,
  type DevenvFiles,
  devenvFiles,
  type Layout,
  layoutEnv,
  robotLayout,
} from "../../src/devenv/layout.ts";
import {
  isRecordAlive,
  type PidRecord,
  processStartTime,
  readPidFile,
  realRunner,
  waitFor,
} from "../../src/process/mod.ts";
import { SpireServerCli } from "../../src/spire/server.ts";
import { fetchClient, loadCredentials } from "../../src/operator/credentials.ts";
import { probeMqtt } from "../../src/mqtt/probe.ts";
import { freeMonitoringPorts, freePorts } from "../helpers/ports.ts";

export const REPO = fileURLToPath(new URL("../..", import.meta.url));
export const MAIN = `${REPO}main.ts`;
export const SPIRE_BIN_DIR = `${Deno.env.get("HOME")}/.cache/k8s4r/spire/1.13.3/bin`;
export const SPIRE_SERVER = `${SPIRE_BIN_DIR}/spire-server`;
export const TRUST_DOMAIN = "k8s4r.example.org";
export const ROBOTS = ["robot-001", "robot-002"];
/** A robot id of the trust domain that no agent of the stack uses (`spareRobotSvid`). */
export const SPARE_ROBOT = "robot-099";

/** One measured value, in a greppable line the closing note can quote. */
export function metric(name: string, value: number | string): void {
  console.log(`E2E-METRIC ${name}=${value}`);
}

export interface CmdResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface RobotView {
  id: string;
  online: boolean;
  spiffeId: string;
  firstSeen: string;
  lastSeen: string;
  offlineReason: string | null;
  svidExpiresAt: string;
  agentVersion: string;
  heartbeatIntervalSeconds: number;
  heartbeats: { received: number; missing: number };
  device: Record<string, unknown>;
}

export interface TaskView {
  id: string;
  robotId: string;
  state: string;
  exitCode: number | null;
  stdout: string;
  stderr: string;
  error?: string | null;
  finishedAt?: string | null;
}

export interface Stats {
  mqtt: { connected: boolean };
  messages: {
    received: Record<string, number>;
    dropped: Record<string, number>;
    droppedTotal: number;
    /** `refused` task reports by reason (`task`: no reason). */
    refusals: Record<string, number>;
    staleTaskReports: number;
    unknownTaskReports: number;
  };
  robots: { total: number; online: number };
}

export interface Svid {
  cert: string;
  key: string;
  ca: string;
}

const TERMINAL = new Set(["done", "failed", "refused", "expired", "cancelled", "timeout"]);

/** Every pid ever recorded by any stack of this module, for the last-resort cleanup. */
const everyStack = new Set<E2eStack>();
globalThis.addEventListener("unload", () => {
  for (const s of everyStack) s.emergencyStopSync();
});

/** Children of a process, from /proc/<pid>/task/<tid>/children (every thread). */
export function childrenOf(pid: number): number[] {
  const out: number[] = [];
  let tasks: Deno.DirEntry[] = [];
  try {
    tasks = [...Deno.readDirSync(`/proc/${pid}/task`)];
  } catch {
    return out;
  }
  for (const t of tasks) {
    try {
      const text = Deno.readTextFileSync(`/proc/${pid}/task/${t.name}/children`).trim();
      if (text) out.push(...text.split(/\s+/).map(Number));
    } catch { /* thread gone */ }
  }
  return out;
}

/** A process and all its descendants, with start times (a reused pid is never confused). */
export function processTree(pid: number): Map<number, number> {
  const seen = new Map<number, number>();
  const queue = [pid];
  while (queue.length) {
    const p = queue.shift()!;
    if (seen.has(p)) continue;
    const st = processStartTime(p);
    if (st === undefined) continue;
    seen.set(p, st);
    queue.push(...childrenOf(p));
  }
  return seen;
}

export { isLoopbackAddress, listeningSockets };

/** Connects with mqtt.js, no automatic reconnect; rejects on error or refusal. */
export function mqttConnect(url: string, opts: mqtt.IClientOptions): Promise<mqtt.MqttClient> {
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(url, { reconnectPeriod: 0, connectTimeout: 5000, ...opts });
    let done = false;
    const fail = (e: Error) => {
      if (done) return;
      done = true;
      c.end(true);
      reject(e);
    };
    c.once("connect", () => {
      if (done) return;
      done = true;
      resolve(c);
    });
    c.once("error", fail);
    c.once("close", () => fail(new Error("connection closed before CONNACK")));
  });
}

/**
 * Why the broker refused one CONNECT (its CONNACK code, or its TLS alert to a client that did
 * trust it), or false when it let the client in. Anything that says nothing about the broker's
 * policy (nothing listens, a timeout, a client that did not trust the broker) throws, so that
 * "refused" is never "broken". One attempt with the MQTT probe (src/mqtt/probe.ts).
 */
export async function refused(
  url: string,
  opts: {
    ca?: string;
    cert?: string;
    key?: string;
    servername?: string;
    clientId?: string;
    username?: string;
    password?: string;
  },
): Promise<string | false> {
  const u = new URL(url);
  const secure = u.protocol === "mqtts:";
  const r = await probeMqtt({
    host: u.hostname,
    port: Number(u.port),
    clientId: opts.clientId,
    username: opts.username,
    password: opts.password,
    timeoutMs: 5000,
    tls: secure
      ? { ca: opts.ca ?? "", cert: opts.cert, key: opts.key, servername: opts.servername }
      : undefined,
  });
  if (r.ok) return false;
  if (r.outcome === "refused") return r.detail;
  if (secure && r.tls?.handshake && r.tls.authorized) {
    if (r.outcome === "tls-error" || r.outcome === "closed") return r.detail;
  }
  if (!secure && r.outcome === "closed") return r.detail;
  throw new Error(`${url}: not a refusal by the broker: ${r.outcome}: ${r.detail}`);
}

export class E2eStack {
  readonly layout: Layout;
  readonly files: DevenvFiles;
  readonly env: Record<string, string>;
  /** Every pid of ours seen during the run, with its start time. */
  readonly seen = new Map<number, number>();
  started = false;
  /** Names of the cases that failed: their logs are kept for the post-mortem. */
  readonly failures: string[] = [];
  private torn = false;

  private constructor(
    readonly dir: string,
    readonly sockDir: string,
    readonly ports: {
      spire: number;
      plain: number;
      tls: number;
      http: number;
      /** The first telemetry port (SPIRE exporters, agents' /metrics) and Prometheus'. */
      telemetry: number;
      prometheus: number;
      /** `--ha`: PostgreSQL and the two SPIRE servers' own ports. */
      postgres?: number;
      spire1?: number;
      spire2?: number;
      http2?: number;
      http3?: number;
    },
    /** The robots `start()` runs (`devenv start --robots N`). */
    readonly robotIds: string[] = ROBOTS,
    /** `devenv start --ha`. */
    readonly ha = false,
    /** More `devenv start` flags (`--advertise ADDR`, `--attestation x509pop`). */
    readonly extraStartArgs: string[] = [],
  ) {
    this.env = {
      ...Deno.env.toObject(),
      NO_COLOR: "1",
      ...layoutEnv(
        {
          spireServer: ports.spire,
          mqttPlain: ports.plain,
          mqttTls: ports.tls,
          http: ports.http,
          telemetry: ports.telemetry,
          prometheus: ports.prometheus,
        },
        {
          agentSocketDir: sockDir,
          ha: ha
            ? {
              postgresPort: ports.postgres!,
              spireServerPorts: [ports.spire1!, ports.spire2!],
              httpPorts: [ports.http2!, ports.http3!],
            }
            : undefined,
        },
      ),
    };
    // Never let a caller's environment point a child at another stack or a real token.
    delete this.env.SPIRE_JOIN_TOKEN;
    delete this.env.ROBOT_ID;
    delete this.env.MQTT_BROKER_URL;
    delete this.env.K8S4R_PROJECT_DIR;
    delete this.env.K8S4R_OPERATOR;
    delete this.env.K8S4R_SERVER_URL;
    delete this.env.K8S4R_ROLES_FILE;
    delete this.env.K8S4R_SPIRE_SERVER_SOCKET;
    // devenv's admin operator lands here, never in the developer's own ~/.config.
    this.env.XDG_CONFIG_HOME = `${dir}/xdg`;
    this.layout = defaultLayout(dir, this.env);
    this.files = devenvFiles(this.layout, this.env);
  }

  /**
   * A temp project with a copy of config/ (heartbeats every `heartbeatSeconds`), free ports;
   * `robots` robots (default 2: robot-001, robot-002).
   */
  static async create(
    opts: { heartbeatSeconds?: number; robots?: number; ha?: boolean; startArgs?: string[] } = {},
  ): Promise<E2eStack> {
    // Short paths: unix socket paths are limited to 107 bytes.
    const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-e2e-" });
    // As a checkout: the task user (devenv's k8s4r-task) may pass through to what a test hands
    // it; devenv's own state (.dev-env, .spire-data, xdg) is 0700 below it.
    await Deno.chmod(dir, 0o755);
    const sockDir = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8e" });
    // As devenv's /tmp/spire-agent: other users (the task user) reach the sockets, and get
    // PermissionDenied from the Workload API, but cannot replace them.
    await Deno.chmod(sockDir, 0o755);
    for (const sub of ["spire", "agent", "prometheus"]) {
      await Deno.mkdir(`${dir}/config/${sub}`, { recursive: true });
      for (const e of Deno.readDirSync(`${REPO}config/${sub}`)) {
        if (e.isFile) {
          await Deno.copyFile(`${REPO}config/${sub}/${e.name}`, `${dir}/config/${sub}/${e.name}`);
        }
      }
    }
    const yamlPath = `${dir}/config/agent/plugins.yaml`;
    const yaml = await Deno.readTextFile(yamlPath);
    const hb = opts.heartbeatSeconds ?? 1;
    const patched = yaml.replace(/^(\s*heartbeatSeconds:\s*)\d+/m, `$1${hb}`);
    assert.notEqual(patched, yaml, `${yamlPath}: no mqtt.heartbeatSeconds to set`);
    await Deno.writeTextFile(yamlPath, patched);
    const [spire, plain, tls, http, postgres, spire1, spire2, http2, http3] = freePorts(9);
    const n = opts.robots ?? ROBOTS.length;
    const monitoring = freeMonitoringPorts(n, opts.ha ?? false);
    const ports = opts.ha
      ? { spire, plain, tls, http, postgres, spire1, spire2, http2, http3, ...monitoring }
      : { spire, plain, tls, http, ...monitoring };
    const ids = Array.from({ length: n }, (_, i) => `robot-${String(i + 1).padStart(3, "0")}`);
    const s = new E2eStack(dir, sockDir, ports, ids, opts.ha ?? false, opts.startArgs);
    everyStack.add(s);
    return s;
  }

  // ---- running the CLI

  /** The real CLI in the project dir, with the stack's env (plus `opts.env` for this call). */
  async k8s4r(
    args: string[],
    opts: { timeoutMs?: number; env?: Record<string, string> } = {},
  ): Promise<CmdResult> {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--quiet", "--config", `${REPO}deno.json`, MAIN, ...args],
      cwd: this.dir,
      env: { ...this.env, ...opts.env },
      clearEnv: true,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(opts.timeoutMs ?? 180_000),
    }).output();
    const d = new TextDecoder();
    return { code: out.code, stdout: d.decode(out.stdout), stderr: d.decode(out.stderr) };
  }

  devenv(...args: string[]): Promise<CmdResult> {
    return this.k8s4r(["devenv", ...args, "--project-dir", this.dir]);
  }

  /** The CLI's env on the control host: devenv's roles file, SPIRE admin socket, server URL. */
  controlEnv(): Record<string, string> {
    return {
      K8S4R_ROLES_FILE: this.layout.serverRolesFile,
      K8S4R_SPIRE_SERVER_SOCKET: this.layout.spireServerSocket,
      K8S4R_SERVER_URL: this.api,
    };
  }

  async mustDevenv(...args: string[]): Promise<CmdResult> {
    const r = await this.devenv(...args);
    assert.equal(r.code, 0, `devenv ${args.join(" ")} exited ${r.code}:\n${r.stdout}\n${r.stderr}`);
    return r;
  }

  /**
   * Replaces the agents' `tasks.allow` list (before `start`): e.g. only the absolute path of a
   * test's own task script instead of `["*"]`.
   */
  async setTaskAllow(allow: string[]): Promise<void> {
    const yamlPath = this.layout.agentPluginsYaml;
    const yaml = await Deno.readTextFile(yamlPath);
    const patched = yaml.replace(/^(\s*allow:\s*).*$/m, `$1${JSON.stringify(allow)}`);
    assert.notEqual(patched, yaml, `${yamlPath}: no tasks.allow to set`);
    await Deno.writeTextFile(yamlPath, patched);
  }

  /** `devenv start --robots N --broker native`; fails with devenv's own words when it cannot. */
  async start(): Promise<CmdResult> {
    const r = await this.devenv(...this.startArgs());
    this.remember();
    assert.equal(
      r.code,
      0,
      `the stack did not come up (SPIRE binaries in ${SPIRE_BIN_DIR}, mosquitto on PATH?):\n` +
        `${r.stdout}\n${r.stderr}`,
    );
    return r;
  }

  /** The arguments of `devenv start` for this stack (restarts only what is dead). */
  startArgs(): string[] {
    return [
      "start",
      "--robots",
      String(this.robotIds.length),
      "--broker",
      "native",
      ...(this.ha ? ["--ha"] : []),
      ...this.extraStartArgs,
    ];
  }

  async doctor(): Promise<{ code: number; report: DoctorReport; raw: CmdResult }> {
    const r = await this.k8s4r(["doctor", "--json", "--broker", "native"]);
    let report: DoctorReport;
    try {
      report = JSON.parse(r.stdout);
    } catch {
      throw new Error(`doctor --json printed no JSON (exit ${r.code}):\n${r.stdout}\n${r.stderr}`);
    }
    return { code: r.code, report, raw: r };
  }

  /**
   * Returns a function that declares one e2e case as its own Deno.test. Cases run in order; every
   * case after the first requires the stack to be up, and a failing case is remembered so the
   * teardown can keep its logs. The stack's processes outlive each case by design, so Deno's
   * op/resource sanitizers are off; teardown checks that nothing of ours survives.
   */
  caseRegistrar(prefix: string): (name: string, fn: () => Promise<void>) => void {
    let first = true;
    return (name, fn) => {
      const isFirst = first;
      first = false;
      Deno.test({
        name: `${prefix}${name}`,
        sanitizeOps: false,
        sanitizeResources: false,
        fn: async () => {
          if (!isFirst) this.requireStarted();
          try {
            await fn();
          } catch (err) {
            this.failures.push(name);
            throw err;
          }
        },
      });
    };
  }

  requireStarted(): void {
    assert.ok(this.started, "the stack did not start (see the first test's failure)");
  }

  // ---- HTTP API

  /** `localhost`: the name the server's certificate carries (it listens on 127.0.0.1). */
  get api(): string {
    return `https://localhost:${this.ports.http}`;
  }

  #clients = new Map<string, Deno.HttpClient>();

  /** A fetch client as operator `name` (devenv's admin by default), trusting its bundle. */
  async operatorClient(name = "admin"): Promise<Deno.HttpClient> {
    let c = this.#clients.get(name);
    if (!c) {
      c = fetchClient(await loadCredentials(this.env, name));
      this.#clients.set(name, c);
    }
    return c;
  }

  /** Drops cached clients (after `operator login` replaced a certificate). */
  closeClients(): void {
    for (const c of this.#clients.values()) c.close();
    this.#clients.clear();
  }

  /** A request to the API as devenv's admin operator (JSON content type when there is a body). */
  async http<T>(
    path: string,
    init: RequestInit & { operator?: string } = {},
  ): Promise<{ status: number; body: T }> {
    const headers = new Headers(init.headers);
    if (init.body !== undefined && !headers.has("content-type")) {
      headers.set("content-type", "application/json");
    }
    const res = await fetch(`${this.api}${path}`, {
      ...init,
      headers,
      client: await this.operatorClient(init.operator),
      signal: init.signal ?? AbortSignal.timeout(5000),
    });
    const text = await res.text();
    let body: T;
    try {
      body = JSON.parse(text);
    } catch {
      throw new Error(`${path}: ${res.status}, not JSON: ${text.slice(0, 200)}`);
    }
    return { status: res.status, body };
  }

  async robot(id: string): Promise<RobotView> {
    const r = await this.http<RobotView>(`/api/robots/${id}`);
    assert.equal(r.status, 200, `GET /api/robots/${id}: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body;
  }

  async robots(): Promise<RobotView[]> {
    const r = await this.http<{ robots: RobotView[] }>(`/api/robots`);
    assert.equal(r.status, 200);
    return r.body.robots;
  }

  async stats(): Promise<Stats> {
    const r = await this.http<Stats>(`/api/stats`);
    assert.equal(r.status, 200);
    return r.body;
  }

  async createTask(
    robotId: string,
    command: string[],
    timeoutSeconds = 30,
    more: { env?: Record<string, string>; ttlSeconds?: number } = {},
  ): Promise<string> {
    const r = await this.http<{ id: string }>(`/api/robots/${robotId}/tasks`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ command, timeoutSeconds, ...more }),
    });
    assert.equal(r.status, 201, `POST task: ${r.status} ${JSON.stringify(r.body)}`);
    assert.equal(typeof r.body.id, "string");
    return r.body.id;
  }

  async task(id: string): Promise<TaskView> {
    const r = await this.http<TaskView>(`/api/tasks/${id}`);
    assert.equal(r.status, 200);
    return r.body;
  }

  /** Polls until the task is in a terminal state; returns it. */
  async waitTask(id: string, timeoutMs = 60_000): Promise<TaskView> {
    let last: TaskView | undefined;
    await waitFor(async () => {
      last = await this.task(id);
      return TERMINAL.has(last.state);
    }, { timeoutMs, intervalMs: 200, what: `task ${id} to finish` }).catch((err) => {
      throw new Error(`${(err as Error).message}; last: ${JSON.stringify(last)}`);
    });
    return last!;
  }

  /** Waits until every robot is online; returns how long that took (ms). */
  async waitOnline(robots = this.robotIds, timeoutMs = 60_000): Promise<number> {
    const t0 = Date.now();
    await waitFor(async () => {
      for (const id of robots) if (!(await this.robot(id)).online) return false;
      return true;
    }, { timeoutMs, intervalMs: 200, what: `${robots.join(", ")} online` });
    return Date.now() - t0;
  }

  /** Waits until robot `id` has received `n` more heartbeats than now; returns the view. */
  async waitHeartbeats(id: string, n: number, timeoutMs = 30_000): Promise<RobotView> {
    const base = (await this.robot(id)).heartbeats.received;
    let v: RobotView | undefined;
    await waitFor(async () => {
      v = await this.robot(id);
      return v.heartbeats.received >= base + n;
    }, { timeoutMs, intervalMs: 200, what: `${n} more heartbeats from ${id}` });
    return v!;
  }

  /** Asserts `heartbeats.missing` is 0 for every robot; prints the metric. */
  async assertNoLostHeartbeats(label: string): Promise<void> {
    let lost = 0;
    const detail: string[] = [];
    for (const id of ROBOTS) {
      const r = await this.robot(id);
      lost += r.heartbeats.missing;
      detail.push(`${id}: received ${r.heartbeats.received}, missing ${r.heartbeats.missing}`);
    }
    metric(`${label}.heartbeats_lost`, lost);
    assert.equal(lost, 0, `lost heartbeats (${detail.join("; ")})`);
  }

  // ---- processes

  pid(pidFile: string): PidRecord | undefined {
    const rec = readPidFile(pidFile);
    return rec && isRecordAlive(rec) ? rec : undefined;
  }

  agentPidFile(robotId: string): string {
    return robotLayout(this.layout, robotId, this.env).pidFile;
  }

  agentLogFile(robotId: string): string {
    return robotLayout(this.layout, robotId, this.env).logFile;
  }

  robotSocket(robotId: string): string {
    return `${this.sockDir}/${robotId}/agent.sock`;
  }

  /** The spire-agent child of robot `id`'s k8s4r agent. */
  spireAgentOf(robotId: string): { pid: number; startTime: number } | undefined {
    const agent = this.pid(this.agentPidFile(robotId));
    if (!agent) return undefined;
    for (const [pid, st] of processTree(agent.pid)) {
      if (pid === agent.pid) continue;
      let cmdline = "";
      try {
        cmdline = Deno.readTextFileSync(`/proc/${pid}/cmdline`);
      } catch {
        continue;
      }
      if (cmdline.split("\0")[0].endsWith("spire-agent")) return { pid, startTime: st };
    }
    return undefined;
  }

  /** Records every live process named by a pid file, and its descendants. */
  remember(): void {
    let names: string[] = [];
    try {
      names = [...Deno.readDirSync(this.layout.devEnvDir)].map((e) => e.name)
        .filter((n) => n.endsWith(".pid"));
    } catch { /* nothing started yet */ }
    for (const n of names) {
      const rec = this.pid(`${this.layout.devEnvDir}/${n}`);
      if (!rec) continue;
      for (const [pid, st] of processTree(rec.pid)) this.seen.set(pid, st);
    }
  }

  /** The seen processes that are still the same process. */
  survivors(): number[] {
    return [...this.seen].filter(([pid, st]) => processStartTime(pid) === st).map(([p]) => p);
  }

  spireCli(): SpireServerCli {
    return new SpireServerCli(realRunner, SPIRE_SERVER, this.layout.spireServerSocket);
  }

  /** Runs spire-server's CLI against this stack's admin socket (never through a shell). */
  async spireServer(...args: string[]): Promise<CmdResult> {
    const out = await new Deno.Command(SPIRE_SERVER, {
      args: [...args, "-socketPath", this.layout.spireServerSocket],
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(30_000),
    }).output();
    const d = new TextDecoder();
    return { code: out.code, stdout: d.decode(out.stdout), stderr: d.decode(out.stderr) };
  }

  /** A robot's X.509 SVID from its Workload API socket, via `k8s4r identity fetch --write`. */
  async fetchSvid(robotId: string): Promise<Svid & { serial: string; notAfter: string }> {
    const dir = await Deno.makeTempDir({ prefix: "k8s4r-e2e-svid-" });
    try {
      const r = await this.k8s4r([
        "identity",
        "fetch",
        "--socket",
        this.robotSocket(robotId),
        "--spiffe-id",
        `spiffe://${TRUST_DOMAIN}/robot/${robotId}`,
        "--write",
        dir,
        "--json",
      ]);
      assert.equal(r.code, 0, `identity fetch ${robotId}: ${r.stdout}\n${r.stderr}`);
      const j = JSON.parse(r.stdout);
      return {
        cert: await Deno.readTextFile(`${dir}/svid.pem`),
        key: await Deno.readTextFile(`${dir}/svid.key`),
        ca: await Deno.readTextFile(`${dir}/bundle.pem`),
        serial: j.svids[0].serialNumber,
        notAfter: j.svids[0].notAfter,
      };
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  }

  /**
   * An SVID of this stack's SPIRE (`x509 mint`, CN = `robotId`) for a robot id no agent runs
   * as. The broker makes a certificate's CN its MQTT client id, so a test client holding a
   * RUNNING robot's SVID would take that agent's session over (and be kicked back by the
   * agent's reconnect): probes of the broker's rules use a spare identity instead.
   */
  async spareRobotSvid(robotId = SPARE_ROBOT): Promise<Svid> {
    if (ROBOTS.includes(robotId)) throw new Error(`${robotId} has an agent: not a spare id`);
    const m = await this.spireCli().mintX509({
      spiffeId: `spiffe://${TRUST_DOMAIN}/robot/${robotId}`,
      dnsNames: [robotId],
      ttlSeconds: 3600,
    });
    return { cert: m.certPem, key: m.keyPem, ca: m.bundlePem };
  }

  async serverCreds(): Promise<{ username: string; password: string }> {
    return JSON.parse(await Deno.readTextFile(this.layout.serverCredentialsFile));
  }

  /** A client on the plain listener with the fleet server's own login. */
  async serverClient(clientId: string): Promise<mqtt.MqttClient> {
    const creds = await this.serverCreds();
    return await mqttConnect(`mqtt://127.0.0.1:${this.ports.plain}`, {
      username: creds.username,
      password: creds.password,
      clientId,
      clean: true,
    });
  }

  /** An mTLS client on the robot listener. */
  tlsClient(svid: Svid, clientId: string): Promise<mqtt.MqttClient> {
    return mqttConnect(`mqtts://127.0.0.1:${this.ports.tls}`, {
      ca: svid.ca,
      cert: svid.cert,
      key: svid.key,
      servername: "localhost",
      clientId,
      clean: true,
      protocolVersion: 4,
    });
  }

  // ---- teardown

  /**
   * After a failure: copies every log of the stack to a kept directory (the temp project is
   * deleted) and prints its path and the agents' and server's last lines.
   */
  keepLogs(): void {
    if (!this.failures.length) return;
    try {
      const keep = Deno.makeTempDirSync({ dir: "/tmp", prefix: "k8s4r-e2e-logs-" });
      for (const root of [this.layout.devEnvDir, this.layout.spireDataDir]) {
        for (const f of walkFiles(root, (n) => n.endsWith(".log"))) {
          const name = f.slice(this.dir.length + 1).replaceAll("/", "__");
          Deno.copyFileSync(f, `${keep}/${name}`);
          if (/(agent[^/]*|server)\.log$/.test(f) && !f.includes("spire")) {
            const tail = Deno.readTextFileSync(f).split("\n").slice(-25).join("\n");
            console.log(`---- last lines of ${f}\n${tail}`);
          }
        }
      }
      console.log(`E2E logs of the failed cases (${this.failures.join("; ")}) kept in ${keep}`);
    } catch (err) {
      console.log(`could not keep the logs: ${(err as Error).message}`);
    }
  }

  /** The last test: stop, clean, and nothing of ours left running or listening. */
  async teardown(): Promise<void> {
    this.closeClients();
    this.remember();
    const stop = await this.devenv("stop");
    this.keepLogs();
    const clean = await this.devenv("clean");
    this.torn = true;
    const alive = this.survivors();
    const ports = new Set(listeningSockets().map((s) => s.port));
    const stillListening = Object.values(this.ports).filter((p) => ports.has(p));
    // Whatever the assertions say, nothing survives this test.
    this.emergencyStopSync();
    assert.equal(stop.code, 0, `devenv stop: ${stop.stdout}\n${stop.stderr}`);
    assert.equal(clean.code, 0, `devenv clean: ${clean.stdout}\n${clean.stderr}`);
    assert.ok(this.seen.size >= 6, `only ${this.seen.size} processes were ever recorded`);
    metric("teardown.processes_recorded", this.seen.size);
    assert.deepEqual(alive, [], `processes survived stop: ${alive.join(", ")}`);
    assert.deepEqual(stillListening, [], `ports still listening: ${stillListening.join(", ")}`);
    for (const p of [this.layout.devEnvDir, this.layout.spireDataDir]) {
      assert.throws(() => Deno.statSync(p), Deno.errors.NotFound, `${p} left behind by clean`);
    }
  }

  /**
   * Synchronous last resort (unload, or after teardown): `devenv stop` by the pid files, then
   * SIGKILL anything recorded that is still the same process, then remove the temp dirs.
   */
  emergencyStopSync(): void {
    everyStack.delete(this);
    if (!this.torn) {
      this.torn = true;
      try {
        this.remember();
        new Deno.Command(Deno.execPath(), {
          args: ["run", "-A", "--quiet", MAIN, "devenv", "stop", "--project-dir", this.dir],
          cwd: this.dir,
          env: this.env,
          clearEnv: true,
          stdout: "null",
          stderr: "null",
        }).outputSync();
      } catch { /* best effort */ }
      this.keepLogs();
    }
    for (const pid of this.survivors()) {
      try {
        Deno.kill(pid, "SIGKILL");
      } catch { /* gone */ }
    }
    for (const d of [this.dir, this.sockDir]) {
      try {
        Deno.removeSync(d, { recursive: true });
      } catch { /* gone */ }
    }
  }
}

export interface DoctorReport {
  checks: {
    id: string;
    group: string;
    title: string;
    status: string;
    detail: string;
    hint: string | null;
  }[];
  summary: { ok: number; warn: number; fail: number; skip: number; crash: number };
}

/** Every *.log file under dir, recursively. */
export function* walkFiles(dir: string, pred: (name: string) => boolean): Generator<string> {
  let entries: Deno.DirEntry[] = [];
  try {
    entries = [...Deno.readDirSync(dir)];
  } catch {
    return;
  }
  for (const e of entries) {
    const p = `${dir}/${e.name}`;
    if (e.isDirectory) yield* walkFiles(p, pred);
    else if (e.isFile && pred(e.name)) yield p;
  }
}

/** Polls `probe` and returns the elapsed ms once it holds. */
export async function timeUntil(
  probe: () => Promise<boolean> | boolean,
  what: string,
  timeoutMs = 60_000,
  intervalMs = 100,
): Promise<number> {
  const t0 = Date.now();
  await waitFor(probe, { timeoutMs, intervalMs, what });
  return Date.now() - t0;
}
