/**
 * The dev stack as one declarative table: every component with its pid file, how it is
 * spawned, its readiness probe, what it needs first, its stop order, its logs and its `status`
 * row. `start` runs the table as a dependency graph (independent components in parallel),
 * `status`, `stop` and `logs` iterate it, and so can `doctor`. A new component (a PostgreSQL,
 * more SPIRE or fleet servers, a Prometheus) is one more row: nothing that iterates changes.
 *
 * Two kinds of rows:
 * - a **daemon** is a process devenv starts detached, with a pid file (pid + start time). `start`
 *   leaves a healthy one alone, restarts a dead or unhealthy one, and waits on its probe;
 * - a **step** is work `start` itself does (find the binaries, create identities, export the
 *   bundle); it has no process.
 */
import { X509Certificate } from "node:crypto";
import { hostname } from "node:os";
import { basename, join } from "node:path";
import { CliError, errorMessage } from "../cli/errors.ts";
import { agentRunArgs, agentV8FlagsEnv } from "../agent/runtime_flags.ts";
import { DEFAULT_TASK_USER, ensureTaskUser, switchUserMissing } from "../agent/task_user.ts";
import {
  brokerSpiffeId,
  defaultServerUrl,
  fleetServerDnsNames,
  fleetServerSpiffeId,
} from "../fleet/mod.ts";
import { ensureOperator } from "../operator/command.ts";
import { fetchClient, loadCredentials } from "../operator/credentials.ts";
import { type Daemon, isRecordAlive, readPidFile, tailFile, waitFor } from "../process/mod.ts";
import { X509Source } from "../spiffe/mod.ts";
import { isAttested } from "../spire/agent.ts";
import {
  ensureSpireBinaries,
  findSpireBinaries,
  type SpireBinaries,
  spireCacheBinDir,
} from "../spire/binaries.ts";
import { type DesiredEntry, SpireServerCli } from "../spire/server.ts";
import {
  brokerCommand,
  brokerFilesUsable,
  type BrokerRuntime,
  ensureAdminCredentials,
  probeBroker,
  resolveBrokerRuntime,
  restartBroker,
  saveBrokerCommand,
  savedBrokerCommand,
  startBroker,
  withBrokerLock,
  writeBrokerConfig,
} from "./broker.ts";
import { pemFingerprint, readBrokerIdentityStatus } from "../broker/identity.ts";
import {
  type BrokerModeFlag,
  type DevenvContext,
  knownRobots,
  PROBE_INTERVAL_MS,
  readState,
  robotLayouts,
  selfCommand,
  type StackMode,
  withAdvertise,
  writeState,
} from "./context.ts";
import { writeFileAtomic } from "../fs/atomic.ts";
import { describeTarget } from "../postgres/local_cluster.ts";
import {
  fleetDatabaseStep,
  fleetTarget,
  haproxyComponent,
  postgresComponent,
  probePostgres,
  rootCaStep,
  spireDatabaseStep,
} from "./components_ha.ts";
import { spireServerPlace } from "./spire_server_run.ts";
import {
  brokerTlsBinds,
  type DevenvFiles,
  type Layout,
  type RobotLayout,
  spireServerHost,
} from "./layout.ts";
import { ensureFactoryCa, factoryCaFiles } from "../control/factory_ca.ts";
import { renderControlConfig } from "../control/config.ts";
import { httpGetJson, type ProbeResult } from "./probes.ts";
import type { ComponentStatus } from "./render.ts";
import {
  awaitPrometheusRules,
  monitoringOn,
  probePrometheus,
  PROMETHEUS_OPERATOR,
  prometheusSummary,
  prometheusUrl,
  SCRAPE_ROLE,
  writePrometheusConfig,
} from "./monitoring.ts";

/**
 * SPIRE's timing in the dev stack; production keeps SPIRE's defaults, and
 * `devenv start --spire-defaults` runs the dev stack with them too.
 *
 * - With the defaults (5 s each) a newly attested agent waits 5-10 s for its first SVID: the
 *   server answers agents from an entry cache it refreshes every `cache_reload_interval`, and
 *   the agent asks every `sync_interval`. The events-based cache refreshes from the datastore's
 *   change events instead of reloading every entry, so 100 ms stays cheap with 1000s of entries.
 * - SPIRE admits one node attestation per second per client IP (`ratelimit.attestation`): on
 *   one host every agent comes from 127.0.0.1, so the broker's and N robots' agents attesting
 *   at once would take N + 1 seconds.
 */
export const DEV_SPIRE_TIMING = {
  /** spire-server `experimental.cache_reload_interval`. */
  serverCacheReloadInterval: "100ms",
  /** spire-server `experimental.events_based_cache`. */
  serverEventsBasedCache: true,
  /** spire-server `ratelimit.attestation`. */
  serverAttestationRateLimit: false,
  /** spire-agent `experimental.sync_interval` (the broker's and every robot's). */
  agentSyncInterval: "500ms",
} as const;

export interface StartOptions {
  robots: string[];
  broker: BrokerModeFlag;
  /** Robot SVID TTL (seconds) on their registration entries; undefined = server default. */
  svidTtl?: number;
  brokerSvidTtl?: number;
  /** The fleet server's SVID TTL (seconds) on its entry; undefined = server default. */
  serverSvidTtl?: number;
  /** SPIRE CA TTL (seconds) for a server this start launches; undefined = config file's. */
  caTtl?: number;
  /** The URL agents connect to (MQTT_BROKER_URL); default `ssl://localhost:<tls port>`. */
  brokerUrl?: string;
  /** Join token lifetime. */
  tokenTtlSeconds?: number;
  /** How long to wait for each robot to be online. */
  onlineTimeoutMs?: number;
  /** Run SPIRE with its own default intervals instead of `DEV_SPIRE_TIMING`. */
  spireDefaults?: boolean;
  /** Also run Prometheus (monitoring.ts), scraping everything with the alert rules. */
  monitoring?: boolean;
  /** `--ha`: PostgreSQL, two SPIRE servers behind haproxy (implies `rootCa`). */
  ha?: boolean;
  /** `--root-ca`: SPIRE's CA under the root CA of `.spire-data/ca` (made if missing). */
  rootCa?: boolean;
  /** The stack's mode, resolved by `start` (flags and the saved state). */
  mode?: StackMode;
  /** The SPIRE servers' `agent_ttl` in seconds (applies when they (re)start). */
  agentTtl?: number;
  /** `--advertise ADDR` (also in ctx.layout.advertise). */
  advertise?: string;
  /** `--attestation x509pop`: a factory CA and SPIRE's x509pop NodeAttestor. */
  x509pop?: boolean;
}

/**
 * The mode of an existing stack: the one its state file records, else what its pid files
 * show (a stack whose state file was lost still stops completely).
 */
export function stackMode(ctx: DevenvContext): StackMode {
  const saved = readState(ctx)?.mode;
  if (saved) return saved;
  const f = ctx.files;
  const ha = [f.postgresPid, f.spireServer2Pid, f.haproxyPid, f.server2Pid].some((p) => {
    try {
      return Deno.statSync(p).isFile;
    } catch {
      return false;
    }
  });
  return { ha, rootCa: ha };
}

/**
 * What the rows read: the context, the robots of this table, and things several rows need,
 * each looked up at most once (the binaries, the SPIRE server's health and bundle).
 */
export class StackView {
  readonly api: string;
  #memo: {
    bins?: Promise<SpireBinaries | undefined>;
    spireHealthy?: Promise<boolean>;
    liveSocket?: Promise<string | undefined>;
    bundle?: Promise<string>;
  } = {};

  readonly mode: StackMode;

  constructor(
    readonly ctx: DevenvContext,
    readonly robots: readonly RobotLayout[],
    mode?: StackMode,
    /** Prometheus is a row of this table (`--monitoring`, or the last start had it). */
    readonly monitoring: boolean = monitoringOn(ctx),
  ) {
    // `localhost`: the name the server's certificate carries (it listens on 127.0.0.1).
    this.api = defaultServerUrl(ctx.layout.ports.http);
    this.mode = mode ?? stackMode(ctx);
  }

  /** GET on the fleet server's API as devenv's `admin` operator (its credentials). */
  async apiGet(path: string, timeoutMs = 2000): ReturnType<typeof httpGetJson> {
    let client: Deno.HttpClient;
    try {
      client = fetchClient(await loadCredentials(this.ctx.io.env, DEVENV_OPERATOR));
    } catch (err) {
      return { ok: false, status: 0, body: undefined, detail: errorMessage(err) };
    }
    try {
      return await httpGetJson(`${this.api}${path}`, timeoutMs, client);
    } finally {
      client.close();
    }
  }

  /**
   * GET /healthz (no client certificate), trusting the exported bundle, of the fleet server on
   * `port` (default the first; the HA stack's replicas have their own).
   */
  async healthz(
    timeoutMs = 2000,
    port = this.ctx.layout.ports.http,
  ): ReturnType<typeof httpGetJson> {
    let client: Deno.HttpClient;
    try {
      client = Deno.createHttpClient({
        caCerts: [await Deno.readTextFile(this.ctx.layout.caBundleFile)],
      });
    } catch (err) {
      return { ok: false, status: 0, body: undefined, detail: errorMessage(err) };
    }
    try {
      return await httpGetJson(`${defaultServerUrl(port)}/healthz`, timeoutMs, client);
    } finally {
      client.close();
    }
  }

  /** The same stack with other robots; what was looked up already is shared. */
  withRobots(robots: readonly RobotLayout[]): StackView {
    const v = new StackView(this.ctx, robots, this.mode, this.monitoring);
    v.#memo = this.#memo;
    return v;
  }

  bins(): Promise<SpireBinaries | undefined> {
    return this.#memo.bins ??= findSpireBinaries(this.ctx.io).catch(() => undefined);
  }

  setBins(bins: SpireBinaries): void {
    this.#memo.bins = Promise.resolve(bins);
  }

  async cli(socket?: string): Promise<SpireServerCli | undefined> {
    socket ??= this.ctx.layout.spireServerSocket;
    const bins = await this.bins();
    return bins ? new SpireServerCli(this.ctx.io.runner, bins.server, socket) : undefined;
  }

  /**
   * The admin socket of a SPIRE server that runs (our pid file) and whose health check says
   * SERVING: the first of the HA stack's two that does; undefined when none does.
   */
  liveSpireSocket(): Promise<string | undefined> {
    return this.#memo.liveSocket ??= (async () => {
      const { files, layout } = this.ctx;
      const servers: [string, string][] = [[files.spireServerPid, layout.spireServerSocket]];
      if (this.mode.ha) servers.push([files.spireServer2Pid, layout.ha.spireServer2Socket]);
      for (const [pid, socket] of servers) {
        if (!isRecordAlive(readPidFile(pid))) continue;
        if (await (await this.cli(socket))?.healthy()) return socket;
      }
      return undefined;
    })();
  }

  /** A SPIRE server runs and serves (either one on the HA stack: they share everything). */
  spireHealthy(): Promise<boolean> {
    return this.#memo.spireHealthy ??= this.liveSpireSocket().then((s) => s !== undefined);
  }

  /** SPIRE's current trust bundle (one `bundle show` per view). */
  bundlePem(): Promise<string> {
    return this.#memo.bundle ??= (async () => {
      const cli = await this.cli(await this.liveSpireSocket());
      if (!cli) throw new CliError("SPIRE binaries not found");
      return await cli.bundlePem();
    })();
  }

  /** Forgets the SPIRE server's health: the next call asks again. */
  refresh(): void {
    this.#memo.spireHealthy = undefined;
    this.#memo.liveSocket = undefined;
  }
}

/** The operator `devenv start` creates, so that `k8s4r robots` and `task run` just work. */
export const DEVENV_OPERATOR = "admin";

/**
 * The view `status`, `stop` and `logs` use: every robot this stack knows, at the address the
 * stack was started to advertise (sticky, like its mode: haproxy's frontend and the SPIRE
 * server listen there, not on loopback).
 */
export function stackView(ctx: DevenvContext): StackView {
  const advertise = readState(ctx)?.advertise;
  const c = advertise && !ctx.layout.advertise ? withAdvertise(ctx, advertise) : ctx;
  return new StackView(c, robotLayouts(c, knownRobots(c)));
}

/** One `start`: the view plus what steps hand to later rows. */
export class StartRun extends StackView {
  readonly self = selfCommand();
  /** The environment of every child: the layout (ports, paths) and no colour. */
  readonly childEnv: Record<string, string>;
  readonly uid = Deno.uid() ?? 0;
  /** Set by the `spire-binaries` step. */
  spire: SpireBinaries | undefined;
  /** Set by the `broker-runtime` step. */
  brokerRuntime: BrokerRuntime | undefined;
  /** Set by the `task-user` step: the user the robots' tasks run as (`tasks.user`), if any. */
  taskUser: string | undefined;
  #memo = new Map<string, Promise<unknown>>();

  constructor(
    ctx: DevenvContext,
    robots: readonly RobotLayout[],
    readonly opts: StartOptions,
  ) {
    super(ctx, robots, opts.mode, opts.monitoring ?? false);
    this.childEnv = { ...ctx.layoutEnv, NO_COLOR: "1" };
  }

  get brokerUrl(): string {
    return this.opts.brokerUrl ?? `ssl://localhost:${this.ctx.layout.ports.mqttTls}`;
  }

  /** The SPIRE settings this start gives the components it launches (undefined = SPIRE's). */
  get timing(): {
    cacheReloadInterval?: string;
    eventsBasedCache?: boolean;
    attestationRateLimit?: boolean;
    syncInterval?: string;
  } {
    return this.opts.spireDefaults ? {} : {
      cacheReloadInterval: DEV_SPIRE_TIMING.serverCacheReloadInterval,
      eventsBasedCache: DEV_SPIRE_TIMING.serverEventsBasedCache,
      attestationRateLimit: DEV_SPIRE_TIMING.serverAttestationRateLimit,
      syncInterval: DEV_SPIRE_TIMING.agentSyncInterval,
    };
  }

  /** Runs `fn` once per start for `key`; later calls get the same promise. */
  once<T>(key: string, fn: () => Promise<T>): Promise<T> {
    if (!this.#memo.has(key)) this.#memo.set(key, fn());
    return this.#memo.get(key) as Promise<T>;
  }

  async requireCli(): Promise<SpireServerCli> {
    const cli = await this.cli(await this.liveSpireSocket());
    if (!cli) throw new CliError("SPIRE binaries not found (run `k8s4r devenv install`)");
    return cli;
  }
}

/** A dependency that is skipped when `unless` says it is not needed this time. */
export interface Need {
  on: string;
  /** Asked when the component is about to start; true = do not wait for `on`. */
  unless: (run: StartRun) => Promise<boolean>;
}

export interface LogSource {
  name: string;
  file: string;
}

export interface Component {
  /** The name in `start`, `status`, `stop` and `logs` output. */
  name: string;
  kind: "daemon" | "step";
  /** What must be ready before this one is (re)started. */
  needs: readonly (string | Need)[];
  /** Daemons: `stop` goes by increasing rank; equal ranks stop together. */
  stopRank?: number;
  /** Daemons: `{pid, startTime, ...}` of the process devenv started. */
  pidFile?: string;
  logs?: readonly LogSource[];
  /** Daemons: starts it and resolves once its readiness probe passes. */
  spawn?: (run: StartRun) => Promise<Daemon>;
  /** Daemons: health, used for a component that is already running and by `status`. */
  probe?: (view: StackView) => Promise<ProbeResult>;
  /**
   * Daemons that are never replaced while they run (the agents): `start` waits on this instead
   * of restarting an unhealthy one.
   */
  awaitRunning?: (run: StartRun) => Promise<string>;
  /** Steps: the work; returns what it did. */
  run?: (run: StartRun) => Promise<string>;
  /** Daemons: text appended to the start line (endpoint, mode, SVID...). */
  summary?: (run: StartRun) => Promise<string> | string;
  /** Daemons: wraps the check-and-start (the broker's lock). */
  exclusive?: <T>(run: StartRun, fn: () => Promise<T>) => Promise<T>;
  /** The `status` row; none for steps that have nothing to show. */
  status?: (view: StackView) => Promise<ComponentStatus>;
  /** Daemons: what `stop` sends first (default SIGTERM; SIGKILL follows after the grace). */
  stopSignal?: Deno.Signal;
  /** What the doctor says to do when this component is down or unhealthy. */
  hint?: (view: StackView) => string;
}

/** The table for `view.robots`. Order is the order of `status` and `logs`. */
export function devenvComponents(view: StackView): Component[] {
  const agents = view.robots.map((r) => agentComponent(view, r));
  const { ha, rootCa } = view.mode;
  return [
    spireBinariesStep(),
    brokerRuntimeStep(view),
    ...(ha ? [postgresComponent(view), spireDatabaseStep(view), fleetDatabaseStep(view)] : []),
    ...(rootCa ? [rootCaStep(view)] : []),
    factoryCaStep(view),
    spireServerComponent(view, 1),
    ...(ha ? [spireServerComponent(view, 2), haproxyComponent(view)] : []),
    identitiesStep(view),
    caBundleStep(view),
    brokerIdentityComponent(view),
    mosquittoComponent(view),
    operatorsStep(view),
    controlHostStep(view),
    serverComponent(view, 1),
    ...(ha ? [serverComponent(view, 2), serverComponent(view, 3)] : []),
    taskUserStep(),
    ...agents,
    {
      name: "robots online",
      kind: "step",
      needs: agents.map((a) => a.name),
      run: () => Promise.resolve(`${agents.length} online`),
    },
    ...(view.monitoring ? [prometheusComponent(view)] : []),
  ];
}

export function needName(n: string | Need): string {
  return typeof n === "string" ? n : n.on;
}

// ---------------------------------------------------------------------------------------------
// Rows

/** What identifies a binary on disk: a replaced or rebuilt file differs in one of these. */
async function fileStamp(path: string): Promise<string> {
  const st = await Deno.stat(path);
  return `${st.ino}:${st.size}:${st.mtime?.getTime()}`;
}

/**
 * The inputs of the binary lookup: another value of any of these may find other binaries (the
 * cache directory wins over PATH, so whether it holds a spire-server counts too).
 */
async function lookupKey(env: Record<string, string | undefined>): Promise<string> {
  let cached = false;
  try {
    cached = (await Deno.stat(join(spireCacheBinDir(env), "spire-server"))).isFile;
  } catch { /* no cache (or no HOME) */ }
  return JSON.stringify([
    ...["K8S4R_SPIRE_BIN_DIR", "XDG_CACHE_HOME", "HOME", "PATH"].map((k) => env[k] ?? ""),
    cached,
  ]);
}

/**
 * The SPIRE binaries, version-checked by `ensureSpireBinaries` (two `--version` runs, ~55 ms)
 * only when they changed since the last start: `.dev-env/spire-binaries.json` remembers what
 * was checked, with each file's inode, size and mtime.
 */
async function spireBinaries(run: StartRun): Promise<SpireBinaries> {
  const { io, files } = run.ctx;
  const key = await lookupKey(io.env);
  try {
    const c = JSON.parse(await Deno.readTextFile(files.spireBinariesFile));
    if (
      c?.key === key && typeof c.server === "string" && typeof c.agent === "string" &&
      c.stamps?.server === await fileStamp(c.server) &&
      c.stamps?.agent === await fileStamp(c.agent)
    ) {
      return c.bins as SpireBinaries;
    }
  } catch { /* not checked yet, or the files changed */ }
  const bins = await ensureSpireBinaries(io, (l) => io.stderr.write(`  ${l}\n`));
  const record = {
    key,
    server: bins.server,
    agent: bins.agent,
    stamps: { server: await fileStamp(bins.server), agent: await fileStamp(bins.agent) },
    bins,
  };
  await writeFileAtomic(files.spireBinariesFile, JSON.stringify(record, null, 2) + "\n", 0o600);
  return bins;
}

function spireBinariesStep(): Component {
  return {
    name: "spire-binaries",
    kind: "step",
    needs: [],
    async run(run) {
      run.spire = await spireBinaries(run);
      run.setBins(run.spire);
      return `${run.spire.server} (${run.spire.source})`;
    },
  };
}

function brokerRuntimeStep(view: StackView): Component {
  const { files } = view.ctx;
  return {
    name: "broker-runtime",
    kind: "step",
    needs: [],
    async run(run) {
      const saved = savedBrokerCommand(run.ctx);
      // A running broker keeps its mode; otherwise resolve --broker now.
      const alive = isRecordAlive(readPidFile(files.mosquittoPid));
      const mode: BrokerModeFlag = alive && saved ? saved.mode : run.opts.broker;
      run.brokerRuntime = await resolveBrokerRuntime(run.ctx.io, mode);
      return run.brokerRuntime.description;
    },
  };
}

/**
 * The user the robots' tasks run as (`tasks.user`, through K8S4R_TASK_USER in plugins.yaml): a
 * system user whose uid no registration entry selects, so a task asking the Workload API for an
 * identity gets PermissionDenied. Created when missing (`useradd --system`, idempotent); kept by
 * `stop` and `clean` (other stacks on this host may use it). Needs root: without it, tasks run as
 * the agent's own uid, which the robots' entries select, and the step says so.
 */
function taskUserStep(): Component {
  return {
    name: "task-user",
    kind: "step",
    needs: [],
    async run(run) {
      const missing = switchUserMissing();
      if (run.uid !== 0 || missing.length > 0) {
        run.taskUser = undefined;
        const why = run.uid !== 0 ? `not root (uid ${run.uid})` : `lacks ${missing.join(", ")}`;
        const text =
          `${why}: tasks run as uid ${run.uid}, the agents' own, which the robots' registration entries select: a task can fetch its robot's SVID and private key from the Workload API. Run devenv start as root for a separate task user (${DEFAULT_TASK_USER})`;
        run.ctx.io.stderr.write(`warning: task-user: ${text}\n`);
        return text;
      }
      const u = await ensureTaskUser(run.ctx.io.runner, DEFAULT_TASK_USER);
      run.taskUser = u.name;
      return `${u.name} (uid ${u.uid}${
        u.created ? ", created" : ""
      }): tasks run as it; no entry selects it, so the Workload API refuses it`;
    },
  };
}

function pidInfo(file: string): { running: boolean; pid: number | null } {
  const rec = readPidFile(file);
  const running = isRecordAlive(rec);
  return { running, pid: running ? rec!.pid : null };
}

/**
 * Why a SPIRE server does not serve, in its own words: the last error it logged (e.g.
 * `datastore-sql: dial unix .dev-env/postgres/.s.PGSQL.55432: connect: no such file or directory`). SPIRE's `/ready`
 * endpoint is refreshed only once a minute, so it would lag behind by that much.
 */
export async function lastSpireError(logFile: string): Promise<string | undefined> {
  const lines = (await tailFile(logFile, 40)).split("\n").reverse();
  const line = lines.find((l) => /level=error/.test(l));
  if (!line) return undefined;
  const m = /error="((?:[^"\\]|\\.)*)"/.exec(line) ?? /msg="((?:[^"\\]|\\.)*)"/.exec(line);
  const text = (m?.[1] ?? line).split("\\n")[0].replaceAll('\\"', '"');
  return text.length > 200 ? text.slice(0, 200) + "..." : text;
}

/** SPIRE server `n` (2 only on the HA stack, where both share the PostgreSQL datastore). */
export function spireServerComponent(view: StackView, n: 1 | 2 = 1): Component {
  const { ctx } = view;
  const { layout } = ctx;
  const { ha, rootCa } = view.mode;
  const place = spireServerPlace(ctx, n, ha);
  const name = n === 1 ? "spire-server" : "spire-server-2";
  // `--advertise ADDR`: the one server of a plain stack binds it; on the HA stack haproxy does
  // (its frontend is the SPIRE port) and the servers behind it stay on loopback.
  const endpoint = `${ha ? "127.0.0.1" : spireServerHost(layout)}:${place.port}`;
  const healthy = async (v: StackView) => await (await v.cli(place.socket))?.healthy() ?? false;
  return {
    name,
    kind: "daemon",
    needs: [
      "spire-binaries",
      "factory-ca",
      ...(ha ? ["spire-database"] : []),
      ...(rootCa ? ["root-ca"] : []),
      // The first server of a new datastore creates SPIRE's schema: the second waits for it.
      ...(n === 2 ? ["spire-server"] : []),
    ],
    stopRank: 90,
    pidFile: place.pid,
    logs: [{ name, file: place.log }],
    async probe(v) {
      return { ok: await healthy(v), detail: "gRPC health check" };
    },
    hint: (v) =>
      ha && !probePostgres(v).ok
        ? `PostgreSQL, the SPIRE servers' datastore, is down: \`k8s4r devenv start\` starts it ` +
          "again; the servers serve again as soon as it is back (see `k8s4r devenv logs postgres`)"
        : `${name} does not serve: see \`k8s4r devenv logs ${name}\`; \`k8s4r devenv start\` ` +
          "restarts it",
    async spawn(run) {
      const cli = await run.cli(place.socket);
      if (!cli) throw new CliError("SPIRE binaries not found (run `k8s4r devenv install`)");
      const { caTtl, agentTtl } = run.opts;
      const { cacheReloadInterval: interval, attestationRateLimit, eventsBasedCache } = run.timing;
      // Detached through `devenv spire-server`, which redacts join tokens from SPIRE's log.
      return await run.ctx.io.runner.spawn({
        name,
        cmd: run.self.cmd,
        args: [
          ...run.self.args,
          "devenv",
          "spire-server",
          "--project-dir",
          layout.root,
          // Checked by the spire-binaries step a moment ago: the child need not check again.
          "--spire-server-bin",
          run.spire!.server,
          ...(n === 2 ? ["--server", "2"] : []),
          ...(ha ? ["--ha"] : []),
          ...(rootCa ? ["--root-ca"] : []),
          ...(caTtl !== undefined ? ["--ca-ttl", String(caTtl)] : []),
          ...(agentTtl !== undefined ? ["--agent-ttl", `${agentTtl}s`] : []),
          ...(interval ? ["--cache-reload-interval", interval] : []),
          ...(attestationRateLimit === false ? ["--no-attestation-rate-limit"] : []),
          ...(eventsBasedCache ? ["--events-based-cache"] : []),
          ...(run.opts.x509pop ? ["--x509pop-ca", factoryCaFiles(layout.factoryCaDir).cert] : []),
        ],
        cwd: layout.root,
        env: run.childEnv,
        logFile: place.log,
        pidFile: place.pid,
        detached: true,
        ready: () => cli.healthy(),
        readyTimeoutMs: 60_000,
        readyIntervalMs: PROBE_INTERVAL_MS,
      });
    },
    summary: () => endpoint + (ha ? " (PostgreSQL datastore)" : ""),
    async status(v) {
      const p = pidInfo(place.pid);
      const ok = p.running && await healthy(v);
      const err = p.running && !ok ? await lastSpireError(place.log) : undefined;
      const why = err ? `last error: ${err}` : "";
      return {
        name,
        ...p,
        healthy: ok,
        endpoint,
        detail: p.running
          ? (ok ? "gRPC health SERVING" : ["health check fails", why].filter(Boolean).join("; "))
          : "",
      };
    },
  };
}

/** Join tokens for nodes that never attested, and every registration entry, before any agent. */
function identitiesStep(view: StackView): Component {
  const { layout, files } = view.ctx;
  return {
    name: "identities",
    kind: "step",
    needs: ["spire-server"],
    async run(run) {
      const cli = await run.requireCli();
      const tokenTtl = run.opts.tokenTtlSeconds ?? 600;
      const nodes = [
        ...run.robots.map((r) => ({
          nodeId: r.nodeSpiffeId,
          dataDir: r.agentDataDir,
          tokenFile: r.joinTokenFile,
        })),
        {
          nodeId: files.brokerNodeSpiffeId,
          dataDir: files.brokerAgentDataDir,
          tokenFile: files.brokerJoinTokenFile,
        },
      ];
      const selectors = [`unix:uid:${run.uid}`];
      // The broker's names; an advertised address too. SPIRE writes every one as a DNS-type
      // SAN, an IP address included (DNS:10.0.0.1, not IP:10.0.0.1): robots check the broker by
      // its SPIFFE ID, not its name, so they do not care (docs/CONTROL_HOST.md).
      const dns = ["localhost", hostname(), ...(layout.advertise ? [layout.advertise] : [])]
        .filter((v, i, a) => v && a.indexOf(v) === i);
      const desired: DesiredEntry[] = [
        ...run.robots.map((r) => ({
          spiffeId: r.spiffeId,
          parentId: r.nodeSpiffeId,
          selectors,
          dnsNames: [r.robotId],
          x509SvidTtl: run.opts.svidTtl,
        })),
        {
          spiffeId: brokerSpiffeId(layout.trustDomain),
          parentId: files.brokerNodeSpiffeId,
          selectors,
          dnsNames: dns,
          x509SvidTtl: run.opts.brokerSvidTtl,
        },
        // The fleet server's own SVID, from the control host's agent (broker-identity's).
        {
          spiffeId: fleetServerSpiffeId(layout.trustDomain),
          parentId: files.brokerNodeSpiffeId,
          selectors,
          dnsNames: fleetServerDnsNames(),
          x509SvidTtl: run.opts.serverSvidTtl,
        },
      ];
      // Tokens and entries are independent spire-server calls: run them all at once.
      const [tokens, results] = await Promise.all([
        Promise.all(nodes.map(async (n) => {
          if (await isAttested(n.dataDir)) return 0;
          const t = await cli.generateJoinToken(n.nodeId, tokenTtl);
          // The token goes only into this 0600 file (dir 0700); never argv, env or a log.
          await writeFileAtomic(n.tokenFile, t.value + "\n", 0o600, 0o700);
          return 1;
        })),
        cli.reconcileEntries(desired),
      ]);
      const count = (k: string) => results.filter((r) => r === k).length;
      return `${tokens.reduce((a: number, b) => a + b, 0)} join token(s); entries: ${
        count("created")
      } created, ${count("updated")} updated, ${count("unchanged")} unchanged`;
    },
  };
}

/** The exported trust bundle: what the broker uses as cafile and agents bootstrap from. */
function caBundleStep(view: StackView): Component {
  const { layout } = view.ctx;
  return {
    name: "ca-bundle",
    kind: "step",
    // On the HA stack each server adds its own CA to the shared bundle when it starts (without
    // a root CA the bundle holds both): export once both are up.
    needs: ["spire-server", ...(view.mode.ha ? ["spire-server-2"] : [])],
    async run(run) {
      const pem = await run.bundlePem();
      let current: string | undefined;
      try {
        current = await Deno.readTextFile(layout.caBundleFile);
      } catch { /* first export */ }
      if (current !== undefined && pemFingerprint(current) === pemFingerprint(pem)) {
        return `unchanged (${layout.caBundleFile})`;
      }
      await writeFileAtomic(layout.caBundleFile, pem, 0o644, 0o755);
      if (current === undefined) return `exported to ${layout.caBundleFile}`;
      // A new cafile needs a broker restart (Mosquitto 2.0 does not reload it on SIGHUP).
      const broker = await restartBroker(run.ctx);
      return `changed, exported to ${layout.caBundleFile}; ${broker}`;
    },
    async status(v) {
      const row: ComponentStatus = {
        name: "ca-bundle",
        running: false,
        pid: null,
        healthy: false,
        endpoint: layout.caBundleFile,
        detail: "not exported",
      };
      try {
        const exported = pemFingerprint(await Deno.readTextFile(layout.caBundleFile));
        row.running = exported !== undefined;
        row.detail = "exported";
        if (await v.spireHealthy()) {
          const current = pemFingerprint(await v.bundlePem());
          row.healthy = exported !== undefined && exported === current;
          row.detail = row.healthy
            ? "fresh (equals SPIRE's bundle)"
            : "STALE: differs from SPIRE's bundle";
        } else {
          row.detail = "freshness unknown: SPIRE server down";
        }
      } catch (err) {
        if (!(err instanceof Deno.errors.NotFound)) row.detail = errorMessage(err);
      }
      return row;
    },
  };
}

/** "2025-01-01T00:00:00.000Z (in 42m)". */
export function expiryText(notAfter: Date, now = Date.now()): string {
  const s = Math.round((notAfter.getTime() - now) / 1000);
  const rel = s <= 0
    ? "expired"
    : s < 120
    ? `in ${s}s`
    : s < 7200
    ? `in ${Math.round(s / 60)}m`
    : `in ${Math.round(s / 3600)}h`;
  return `${notAfter.toISOString()} (${rel})`;
}

/** Healthy = its status file names an unexpired SVID that is the one in the cert file. */
export async function probeBrokerIdentity(ctx: DevenvContext): Promise<ProbeResult> {
  const s = await readBrokerIdentityStatus(ctx.files.brokerIdentityStatus);
  if (!s) return { ok: false, detail: "no status yet" };
  const rec = readPidFile(ctx.files.brokerIdentityPid);
  if (!rec || rec.pid !== s.pid) {
    return { ok: false, detail: "status was written by another process" };
  }
  if (Date.parse(s.notAfter) <= Date.now()) {
    return { ok: false, detail: `SVID expired ${s.notAfter}` };
  }
  try {
    const cert = new X509Certificate(await Deno.readTextFile(ctx.files.brokerCertFile));
    if (
      cert.serialNumber.toLowerCase().replace(/^0+/, "") !==
        s.serial.toLowerCase().replace(/^0+/, "")
    ) {
      return { ok: false, detail: "certificate file does not match the status" };
    }
  } catch (err) {
    return { ok: false, detail: `certificate file: ${errorMessage(err)}` };
  }
  return { ok: true, detail: `serial ${s.serial}, expires ${s.notAfter}` };
}

function brokerIdentityComponent(view: StackView): Component {
  const { ctx } = view;
  const { layout, files } = ctx;
  return {
    name: "broker-identity",
    kind: "daemon",
    // Its spire-agent dials the SPIRE port: haproxy's on the HA stack.
    needs: ["spire-binaries", "identities", "ca-bundle", ...(view.mode.ha ? ["haproxy"] : [])],
    // Before mosquitto, so that it cannot start the broker again while it is being stopped.
    stopRank: 30,
    pidFile: files.brokerIdentityPid,
    logs: [
      { name: "broker-identity", file: files.brokerIdentityLog },
      { name: "spire-agent-broker", file: files.brokerAgentLog },
    ],
    probe: () => probeBrokerIdentity(ctx),
    spawn(run) {
      const interval = run.timing.syncInterval;
      return run.ctx.io.runner.spawn({
        name: "broker-identity",
        cmd: run.self.cmd,
        args: [
          ...run.self.args,
          "devenv",
          "broker-identity",
          "--project-dir",
          layout.root,
          "--spire-agent-bin",
          run.spire!.agent,
          ...(interval ? ["--spire-sync-interval", interval] : []),
        ],
        cwd: layout.root,
        env: run.childEnv,
        logFile: files.brokerIdentityLog,
        pidFile: files.brokerIdentityPid,
        detached: true,
        ready: async () => (await probeBrokerIdentity(ctx)).ok,
        readyTimeoutMs: 60_000,
        readyIntervalMs: PROBE_INTERVAL_MS,
      });
    },
    async summary() {
      const s = await readBrokerIdentityStatus(files.brokerIdentityStatus);
      return `SVID serial ${s?.serial ?? "?"} until ${s?.notAfter ?? "?"}`;
    },
    async status() {
      const p = pidInfo(files.brokerIdentityPid);
      const probe = p.running ? await probeBrokerIdentity(ctx) : { ok: false, detail: "" };
      const s = await readBrokerIdentityStatus(files.brokerIdentityStatus);
      return {
        name: "broker-identity",
        ...p,
        healthy: p.running && probe.ok,
        endpoint: files.brokerAgentSocket,
        detail: p.running
          ? s
            ? `SVID ${s.spiffeId} expires ${
              expiryText(new Date(s.notAfter))
            }, last renewal ${s.lastRenewal} (renewals: ${s.renewals})${
              s.lastError ? `; last error: ${s.lastError}` : ""
            }`
            : probe.detail
          : "",
      };
    },
  };
}

function mosquittoComponent(view: StackView): Component {
  const { ctx } = view;
  const { layout, files } = ctx;
  // A restart finds the broker's certificate of the last run on disk: while it is valid, the
  // broker needs neither broker-identity (which renews it and sends SIGHUP once it runs) nor
  // the bundle export (which restarts the broker if the bundle really changed).
  const certOnDisk = (run: StartRun) =>
    run.once("broker files usable", async () => (await brokerFilesUsable(ctx)).ok);
  return {
    name: "mosquitto",
    kind: "daemon",
    needs: [
      "broker-runtime",
      { on: "broker-identity", unless: certOnDisk },
      { on: "ca-bundle", unless: certOnDisk },
    ],
    stopRank: 40,
    pidFile: files.mosquittoPid,
    logs: [{ name: "mosquitto", file: files.mosquittoLog }],
    // Under the broker lock: broker-identity's watchdog may be reviving a dead broker too.
    exclusive: (_run, fn) => withBrokerLock(ctx, fn),
    probe: () => probeBroker(ctx),
    async spawn(run) {
      const cmd = brokerCommand(ctx, run.brokerRuntime!);
      await writeBrokerConfig(ctx, run.brokerRuntime!);
      await saveBrokerCommand(ctx, cmd);
      return await startBroker(ctx, cmd);
    },
    async summary(run) {
      const st = readState(ctx);
      const saved = savedBrokerCommand(ctx);
      if (st) await writeState(ctx, { ...st, broker: saved });
      return `${saved?.mode ?? run.brokerRuntime?.mode}, mTLS ${
        brokerTlsBinds(layout).map((b) => `${b}:${layout.ports.mqttTls}`).join(" ")
      }, password 127.0.0.1:${layout.ports.mqttPlain}`;
    },
    async status() {
      const p = pidInfo(files.mosquittoPid);
      const probe = p.running ? await probeBroker(ctx) : { ok: false, detail: "" };
      let certDetail = "";
      try {
        const cert = new X509Certificate(await Deno.readTextFile(files.brokerCertFile));
        certDetail = `cert serial ${cert.serialNumber} expires ${
          expiryText(new Date(cert.validTo))
        }`;
      } catch { /* no cert yet */ }
      return {
        name: "mosquitto",
        ...p,
        healthy: p.running && probe.ok,
        endpoint: `${
          brokerTlsBinds(layout).map((b) => `mqtts://${b}:${layout.ports.mqttTls}`).join(" ")
        } mqtt://127.0.0.1:${layout.ports.mqttPlain}`,
        detail: p.running
          ? [savedBrokerCommand(ctx)?.mode ?? "", probe.ok ? "" : probe.detail, certDetail]
            .filter(Boolean).join("; ")
          : "",
      };
    },
  };
}

/** `--attestation x509pop`: devenv plays the factory CA (key 0600 under .dev-env/factory-ca/). */
function factoryCaStep(view: StackView): Component {
  const { layout } = view.ctx;
  return {
    name: "factory-ca",
    kind: "step",
    needs: [],
    async run(run) {
      if (!run.opts.x509pop) return "not used (join tokens only)";
      const files = factoryCaFiles(layout.factoryCaDir);
      const r = await ensureFactoryCa(files, "k8s4r dev factory CA");
      return `${r} ${files.cert} (key 0600); SPIRE's x509pop attestor trusts it`;
    },
  };
}

/**
 * `.dev-env/control-host.json`: what `k8s4r robot add|list|remove` need (the SPIRE admin socket,
 * the addresses robots dial, the broker's admin login, the factory CA).
 */
function controlHostStep(view: StackView): Component {
  const { layout } = view.ctx;
  return {
    name: "control-host",
    kind: "step",
    needs: ["spire-binaries", "mosquitto"],
    async run(run) {
      await ensureAdminCredentials(run.ctx);
      const spire = `${spireServerHost(layout)}:${layout.ports.spireServer}`;
      const broker = `ssl://${layout.advertise ?? "localhost"}:${layout.ports.mqttTls}`;
      await writeFileAtomic(
        layout.controlHostConfig,
        renderControlConfig({
          trustDomain: layout.trustDomain,
          spireServer: {
            adminSocket: layout.spireServerSocket,
            address: spire,
            bin: run.spire!.server,
          },
          broker: {
            url: broker,
            adminAddress: `127.0.0.1:${layout.ports.mqttPlain}`,
            adminCredentials: layout.brokerAdminCredentialsFile,
          },
          // A robot host's agent runs as root (the systemd unit of `k8s4r agent service`).
          robotSelectors: ["unix:uid:0"],
          factoryCa: run.opts.x509pop ? factoryCaFiles(layout.factoryCaDir) : undefined,
          records: layout.robotRecords,
        }),
        0o600,
      );
      return `${layout.controlHostConfig}: robots dial SPIRE at ${spire} and the broker at ${broker}`;
    },
  };
}

export async function probeServer(view: StackView, port?: number): Promise<ProbeResult> {
  const r = await view.healthz(2000, port);
  const problems = (r.body as { problems?: unknown } | undefined)?.problems;
  const why = Array.isArray(problems) && problems.length ? `: ${problems.join("; ")}` : "";
  return { ok: r.ok, detail: `GET /healthz: ${r.detail}${why}` };
}

/**
 * devenv's `admin` operator: credentials (minted through the SPIRE server's admin socket) and
 * the `operator` role in the server's roles file. Renewed when expired or issued by another CA
 * (a cleaned stack), left alone otherwise.
 */
function operatorsStep(view: StackView): Component {
  const { layout } = view.ctx;
  return {
    name: "operators",
    kind: "step",
    needs: ["spire-binaries", "spire-server"],
    async run(run) {
      const ctl = {
        env: run.ctx.io.env,
        runner: run.ctx.io.runner,
        spireServerBin: run.spire!.server,
        spireSocket: layout.spireServerSocket,
        rolesFile: layout.serverRolesFile,
        trustDomain: layout.trustDomain,
        serverUrl: run.api,
      };
      const admin = await ensureOperator(ctl, DEVENV_OPERATOR, "operator");
      // Prometheus scrapes /metrics with the role metrics (the API's own authorization, and
      // nothing else: no task env or output for a key that sits in a monitoring config).
      if (!run.monitoring) return admin;
      return `${admin}; ${await ensureOperator(ctl, PROMETHEUS_OPERATOR, SCRAPE_ROLE)}`;
    },
  };
}

/** Fleet server `n`'s name, pid, log, data dir and API (2 and 3 only on the HA stack). */
export function fleetServerPlace(view: StackView, n: 1 | 2 | 3) {
  const { layout, files } = view.ctx;
  if (n === 1) {
    return {
      name: "server",
      pid: files.serverPid,
      log: files.serverLog,
      dataDir: layout.serverDataDir,
      port: layout.ports.http,
      clientId: "k8s4r-server",
    };
  }
  return {
    name: `server-${n}`,
    pid: n === 2 ? files.server2Pid : files.server3Pid,
    log: n === 2 ? files.server2Log : files.server3Log,
    dataDir: `${layout.serverDataDir}-${n}`,
    port: layout.ha.httpPorts[n - 2],
    clientId: `k8s4r-server-${n}`,
  };
}

/**
 * Fleet server `n`. On the HA stack three of them share the PostgreSQL registry (`--database`,
 * its password in a 0600 file) and split the robots' messages with a shared subscription
 * (`$share/<secret group>/...`), each with its own MQTT session and HTTP API. What replicas still lack
 * (issue 13, item 2: online status from the shared state, each task dispatched by exactly one
 * replica, retained statuses under shared subscriptions) is the fleet server's, not devenv's.
 */
function serverComponent(view: StackView, n: 1 | 2 | 3 = 1): Component {
  const { layout, files } = view.ctx;
  const { ha } = view.mode;
  const place = fleetServerPlace(view, n);
  const api = defaultServerUrl(place.port);
  return {
    name: place.name,
    kind: "daemon",
    // Its own SVID comes from the control host's agent, which broker-identity runs.
    needs: ["mosquitto", "broker-identity", "operators", ...(ha ? ["fleet-database"] : [])],
    stopRank: 20,
    pidFile: place.pid,
    logs: [{ name: place.name, file: place.log }],
    probe: (v) => probeServer(v, place.port),
    hint: (v) =>
      ha && !probePostgres(v).ok
        ? "PostgreSQL, the fleet servers' registry, is down: `k8s4r devenv start` starts it again"
        : `see \`k8s4r devenv logs ${place.name}\`; \`k8s4r devenv start\` restarts it`,
    spawn(run) {
      return run.ctx.io.runner.spawn({
        name: place.name,
        cmd: run.self.cmd,
        args: [
          ...run.self.args,
          "server",
          ...serverArgs(layout, files, {
            ha,
            port: place.port,
            dataDir: place.dataDir,
            clientId: place.clientId,
          }),
        ],
        cwd: layout.root,
        env: run.childEnv,
        logFile: place.log,
        pidFile: place.pid,
        detached: true,
        ready: async () => (await probeServer(run, place.port)).ok,
        readyTimeoutMs: 60_000,
        readyIntervalMs: PROBE_INTERVAL_MS,
      });
    },
    summary: () =>
      `${api} (operator ${DEVENV_OPERATOR}: k8s4r operator creds${
        ha ? `; PostgreSQL registry, ${place.clientId}` : ""
      })`,
    async status(v) {
      const p = pidInfo(place.pid);
      const probe = p.running ? await probeServer(v, place.port) : { ok: false, detail: "" };
      return {
        name: place.name,
        ...p,
        healthy: p.running && probe.ok,
        endpoint: api,
        detail: p.running && !probe.ok ? probe.detail : "",
      };
    },
  };
}

/**
 * The flags of the dev stack's `k8s4r server` (after `server`): fleet server 1 by default; on the
 * HA stack each replica's port, client id and the PostgreSQL registry (see `serverComponent`).
 */
export function serverArgs(
  layout: Layout,
  files: DevenvFiles,
  opts: { ha?: boolean; port?: number; dataDir?: string; clientId?: string } = {},
): string[] {
  const db = fleetTarget(layout);
  return [
    "--mqtt-credentials",
    layout.serverCredentialsFile,
    "--http-addr",
    `127.0.0.1:${opts.port ?? layout.ports.http}`,
    // The SQLite registry's directory; on the HA stack the registry is PostgreSQL.
    ...(opts.ha ? [] : ["--data-dir", opts.dataDir ?? layout.serverDataDir]),
    "--broker-url",
    `mqtt://127.0.0.1:${layout.ports.mqttPlain}`,
    "--socket-path",
    files.brokerAgentSocket,
    "--roles",
    layout.serverRolesFile,
    ...(opts.ha
      ? [
        "--database",
        describeTarget(db), // its unix socket: postgres://k8s4r@/k8s4r?host=/.../postgres&port=N
        "--database-password-file",
        layout.ha.fleetPasswordFile,
        "--shared-subscription",
        "--client-id",
        opts.clientId ?? "k8s4r-server",
      ]
      : []),
  ];
}

export function agentComponentName(robotId: string): string {
  return robotId === "robot-001" ? "agent" : `agent-${robotId}`;
}

export function agentArgs(
  selfArgs: string[],
  r: RobotLayout,
  pluginsYaml: string,
  brokerUrl: string,
  spire: { syncInterval?: string; agentBin?: string } = {},
): string[] {
  return [
    ...selfArgs,
    "agent",
    "--robot-id",
    r.robotId,
    "--config",
    pluginsYaml,
    "--socket",
    r.agentSocket,
    "--data-dir",
    r.agentDataDir,
    "--join-token-file",
    r.joinTokenFile,
    "--broker-url",
    brokerUrl,
    ...(spire.syncInterval ? ["--spire-sync-interval", spire.syncInterval] : []),
    ...(spire.agentBin ? ["--spire-agent-bin", spire.agentBin] : []),
    // Loopback telemetry: the agent's own /metrics and its spire-agent's exporter.
    "--metrics-listen",
    `127.0.0.1:${r.metricsPort}`,
    "--spire-telemetry",
    `127.0.0.1:${r.spireTelemetryPort}`,
  ];
}

export async function robotOnline(view: StackView, robotId: string): Promise<boolean> {
  const r = await view.apiGet(`/api/robots/${encodeURIComponent(robotId)}`);
  return r.ok && (r.body as { online?: unknown } | undefined)?.online === true;
}

function lastLogLine(text: string): string {
  return text.split("\n").filter((l) => l.trim()).pop() ?? "no output";
}

/** Waits until the server reports the robot online; fails at once when its agent dies. */
async function awaitOnline(run: StartRun, r: RobotLayout): Promise<void> {
  let dead = false;
  try {
    await waitFor(() => robotOnline(run, r.robotId), {
      timeoutMs: run.opts.onlineTimeoutMs ?? 120_000,
      intervalMs: PROBE_INTERVAL_MS,
      signal: run.ctx.io.signal,
      what: `${r.robotId} online at the server`,
      fatal: () => {
        dead = !isRecordAlive(readPidFile(r.pidFile));
        return dead ? new CliError(`agent ${r.robotId} exited`) : undefined;
      },
    });
  } catch (err) {
    const tail = lastLogLine(await tailFile(r.logFile, 5));
    if (dead) throw new CliError(`agent ${r.robotId} exited (log: ${r.logFile}): ${tail}`);
    throw new CliError(
      `${errorMessage(err)}: still offline: ${r.robotId} (log: ${r.logFile}: ${tail})`,
    );
  }
}

async function agentSvidExpiry(socket: string, spiffeId: string): Promise<string> {
  const ac = new AbortController();
  let source: X509Source | undefined;
  try {
    source = await X509Source.create({
      address: `unix://${socket}`,
      spiffeId,
      timeoutMs: 3000,
      signal: ac.signal,
    });
    return `SVID expires ${expiryText(source.getX509Svid().notAfter)}`;
  } catch (err) {
    return `SVID unavailable: ${errorMessage(err)}`;
  } finally {
    ac.abort();
    await Promise.resolve(source?.close()).catch(() => {});
  }
}

/** One robot's agent; it supervises its own spire-agent (which dies with it). */
function agentComponent(view: StackView, r: RobotLayout): Component {
  const { layout } = view.ctx;
  const name = agentComponentName(r.robotId);
  const attested = (run: StartRun) =>
    run.once(`${r.robotId} attested`, () => isAttested(r.agentDataDir));
  return {
    name,
    kind: "daemon",
    // A new robot's spire-agent bootstraps from the bundle, attests with its token and must
    // find its entry (identities); an attested one needs only a running SPIRE server (its entry
    // is reconciled meanwhile, and a change reaches it at its next sync). Either way its
    // register must reach a subscribed server.
    needs: [
      "spire-binaries",
      "spire-server",
      ...(view.mode.ha ? ["haproxy"] : []),
      { on: "identities", unless: attested },
      { on: "ca-bundle", unless: attested },
      "server",
      "task-user",
    ],
    stopRank: 10,
    pidFile: r.pidFile,
    logs: [{ name: basename(r.logFile, ".log"), file: r.logFile }],
    async probe(v) {
      const online = await robotOnline(v, r.robotId);
      return { ok: online, detail: online ? "online" : "offline at the server" };
    },
    // A running agent is left alone (it reconnects by itself); start waits for it to be online.
    async awaitRunning(run) {
      await awaitOnline(run, r);
      return "online";
    },
    async spawn(run) {
      const d = await run.ctx.io.runner.spawn({
        name: `agent ${r.robotId}`,
        cmd: run.self.cmd,
        args: agentArgs(
          agentRunArgs(run.self.args),
          r,
          layout.agentPluginsYaml,
          run.brokerUrl,
          // The binary the spire-binaries step checked: the agent need not look it up again.
          { syncInterval: run.timing.syncInterval, agentBin: run.spire!.agent },
        ),
        cwd: layout.root,
        env: {
          ...run.childEnv,
          DENO_V8_FLAGS: agentV8FlagsEnv(run.ctx.io.env.DENO_V8_FLAGS),
          // plugins.yaml: tasks.user "${K8S4R_TASK_USER:-}" (empty: tasks run as the agent).
          K8S4R_TASK_USER: run.taskUser ?? "",
        },
        logFile: r.logFile,
        pidFile: r.pidFile,
        detached: true,
      });
      await awaitOnline(run, r);
      return d;
    },
    summary: () => "online",
    async status(v) {
      const p = pidInfo(r.pidFile);
      let online = false;
      let detail = "";
      if (p.running) {
        const [res, svid] = await Promise.all([
          v.apiGet(`/api/robots/${encodeURIComponent(r.robotId)}`),
          agentSvidExpiry(r.agentSocket, r.spiffeId),
        ]);
        online = res.ok && (res.body as { online?: unknown } | undefined)?.online === true;
        detail = [online ? "online" : `offline at the server (${res.detail})`, svid].join("; ");
      }
      return {
        name,
        ...p,
        healthy: p.running && online,
        endpoint: r.agentSocket,
        detail,
      };
    },
  };
}

/** `--monitoring`: Prometheus, scraping every endpoint with the alert rules (monitoring.ts). */
function prometheusComponent(view: StackView): Component {
  const { ctx } = view;
  const { ha } = view.mode;
  const { layout, files } = ctx;
  const url = prometheusUrl(ctx);
  return {
    name: "prometheus",
    kind: "daemon",
    // Its scrape credential (operators) and the exported bundle (ca-bundle) must exist; its
    // targets may come up later (Prometheus says so in `up`).
    needs: ["spire-binaries", "operators", "ca-bundle", "server"],
    // First to stop: no alert about the rest of the stack going down on purpose.
    stopRank: 5,
    pidFile: files.prometheusPid,
    logs: [{ name: "prometheus", file: files.prometheusLog }],
    probe: () => probePrometheus(ctx, ha),
    async spawn(run) {
      await writePrometheusConfig(ctx, ha);
      const d = await run.ctx.io.runner.spawn({
        name: "prometheus",
        cmd: run.self.cmd,
        args: [
          ...run.self.args,
          "devenv",
          "prometheus",
          "--project-dir",
          layout.root,
          "--spire-server-bin",
          run.spire!.server,
        ],
        cwd: layout.root,
        env: run.childEnv,
        logFile: files.prometheusLog,
        pidFile: files.prometheusPid,
        detached: true,
        ready: async () => (await probePrometheus(ctx, ha)).ok,
        readyTimeoutMs: 60_000,
        readyIntervalMs: PROBE_INTERVAL_MS * 5,
      });
      await awaitPrometheusRules(ctx);
      return d;
    },
    summary: async () => `${url} (${await prometheusSummary(ctx)})`,
    async status() {
      const p = pidInfo(files.prometheusPid);
      const probe = p.running ? await probePrometheus(ctx, ha) : { ok: false, detail: "" };
      return {
        name: "prometheus",
        ...p,
        healthy: p.running && probe.ok,
        endpoint: url,
        detail: p.running ? (probe.ok ? await prometheusSummary(ctx) : probe.detail) : "",
      };
    },
  };
}
