/**
 * Shared benchmark plumbing: free ports, a throwaway dev stack in a temp project directory,
 * CPU/RSS sampling from /proc, and a cleanup list that runs even when a benchmark fails.
 *
 * Every process is started through `realRunner` (pid-checked stop); a stack is torn down with
 * `devenv clean`, then every pid file it left behind is stopped with `stopPidFile`.
 */
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { freeMonitoringPorts, freePorts } from "../tests/helpers/ports.ts";
import { fetchClient, loadCredentials } from "../src/operator/credentials.ts";
import { agentArgs, DEV_SPIRE_TIMING } from "../src/devenv/components.ts";
import { agentRunArgs, agentV8FlagsEnv } from "../src/agent/runtime_flags.ts";
import { DEFAULT_TASK_USER } from "../src/agent/task_user.ts";
import {
  defaultLayout,
  devenvFiles,
  type Layout,
  layoutEnv,
  robotLayout,
} from "../src/devenv/layout.ts";
import {
  type Daemon,
  type OutputResult,
  readPidFile,
  realRunner,
  stopPidFile,
  waitFor,
} from "../src/process/mod.ts";

export const REPO = dirname(dirname(fileURLToPath(import.meta.url)));
export const MAIN_TS = join(REPO, "main.ts");

export interface BenchOptions {
  quick: boolean;
  robots: number;
  log: (msg: string) => void;
}

/** Things to undo, newest first; `run()` never throws and runs each once. */
export class Cleanup {
  private fns: { what: string; fn: () => Promise<unknown> | unknown }[] = [];
  add(what: string, fn: () => Promise<unknown> | unknown): void {
    this.fns.push({ what, fn });
  }
  async run(log?: (m: string) => void): Promise<void> {
    while (this.fns.length) {
      const { what, fn } = this.fns.pop()!;
      try {
        await fn();
      } catch (err) {
        log?.(`cleanup ${what} failed: ${(err as Error).message}`);
      }
    }
  }
}

let clkTck: number | undefined;
async function ticksPerSecond(): Promise<number> {
  if (clkTck === undefined) {
    const r = await realRunner.output("getconf", ["CLK_TCK"], { check: false }).catch(() =>
      undefined
    );
    const n = Number(r?.stdout.trim());
    clkTck = Number.isFinite(n) && n > 0 ? n : 100;
  }
  return clkTck;
}

/** CPU time (user + system, seconds) of a process, or undefined when it is gone. */
export async function cpuSeconds(pid: number): Promise<number | undefined> {
  try {
    const stat = await Deno.readTextFile(`/proc/${pid}/stat`);
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // Fields 14 and 15 overall (utime, stime) are 11 and 12 after the state field.
    return (Number(rest[11]) + Number(rest[12])) / await ticksPerSecond();
  } catch {
    return undefined;
  }
}

/** Resident set size in MB (VmRSS), or undefined when the process is gone. */
export async function rssMb(pid: number): Promise<number | undefined> {
  try {
    const status = await Deno.readTextFile(`/proc/${pid}/status`);
    const m = /^VmRSS:\s+(\d+) kB/m.exec(status);
    return m ? Number(m[1]) / 1024 : undefined;
  } catch {
    return undefined;
  }
}

/** CPU % (100 = one core) and RSS samples of a set of processes over a phase. */
export class ProcSampler {
  private timer?: ReturnType<typeof setInterval>;
  private startCpu = new Map<number, number>();
  private startT = 0;
  readonly rss = new Map<number, number[]>();
  private busy = false;

  constructor(private readonly pids: Record<string, number>, private readonly everyMs = 500) {}

  async start(): Promise<void> {
    this.startT = performance.now();
    for (const pid of Object.values(this.pids)) {
      this.startCpu.set(pid, (await cpuSeconds(pid)) ?? 0);
      this.rss.set(pid, []);
    }
    await this.sample();
    this.timer = setInterval(() => void this.sample(), this.everyMs);
  }

  private async sample(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      for (const pid of Object.values(this.pids)) {
        const r = await rssMb(pid);
        if (r !== undefined) this.rss.get(pid)!.push(r);
      }
    } finally {
      this.busy = false;
    }
  }

  /** Stops sampling; per name: average CPU % over the phase, RSS samples (MB). */
  async stop(): Promise<Record<string, { cpuPct: number; rssMb: number[] }>> {
    clearInterval(this.timer);
    await this.sample();
    const dt = (performance.now() - this.startT) / 1000;
    const out: Record<string, { cpuPct: number; rssMb: number[] }> = {};
    for (const [name, pid] of Object.entries(this.pids)) {
      const end = (await cpuSeconds(pid)) ?? this.startCpu.get(pid)!;
      out[name] = {
        cpuPct: dt > 0 ? ((end - this.startCpu.get(pid)!) / dt) * 100 : 0,
        rssMb: this.rss.get(pid) ?? [],
      };
    }
    return out;
  }
}

/** Reads the pid in a devenv pid file (only while that very process is alive). */
export function livePid(pidFile: string): number | undefined {
  return readPidFile(pidFile)?.pid;
}

/**
 * A dev stack in its own temp project directory (a copy of config/) on free ports, driven through
 * the real CLI (`deno run -A main.ts devenv ...`). It never touches the default ports or
 * /tmp/spire-agent/.
 */
export class BenchStack {
  readonly layout: Layout;
  readonly files: ReturnType<typeof devenvFiles>;
  readonly env: Record<string, string>;
  private constructor(readonly dir: string, readonly ports: number[]) {
    this.env = {
      ...layoutEnv(
        {
          spireServer: ports[0],
          mqttPlain: ports[1],
          mqttTls: ports[2],
          http: ports[3],
          // Room for robot-001..robot-100's telemetry ports.
          ...freeMonitoringPorts(100),
        },
        { agentSocketDir: join(dir, "s") },
      ),
      K8S4R_PROJECT_DIR: dir,
      NO_COLOR: "1",
      // Agents connect to "localhost" and authenticate the broker by SPIFFE ID.
      MQTT_BROKER_URL: `ssl://localhost:${ports[2]}`,
      // devenv's admin operator lands here, never in the developer's own ~/.config.
      XDG_CONFIG_HOME: join(dir, "xdg"),
    };
    this.layout = defaultLayout(dir, this.env);
    this.files = devenvFiles(this.layout, this.env);
  }

  static async create(prefix = "k8s4r-bench-"): Promise<BenchStack> {
    // Short paths: Workload API socket paths must stay under 107 bytes.
    const dir = await Deno.makeTempDir({ dir: "/tmp", prefix });
    await copyDir(join(REPO, "config"), join(dir, "config"));
    // The exported CA of a developer's own stack must not leak into the bench stack.
    await Deno.remove(join(dir, "config", "mosquitto"), { recursive: true }).catch(() => {});
    // plugins.yaml's serverAddr follows K8S4R_SPIRE_SERVER_PORT, which the stack's env sets.
    return new BenchStack(dir, freePorts(4));
  }

  /** `localhost`: the name the server's certificate carries (it listens on 127.0.0.1). */
  get api(): string {
    return `https://localhost:${this.ports[3]}`;
  }

  #client: Deno.HttpClient | undefined;

  /** A fetch client as devenv's admin operator (the API needs an operator certificate). */
  async client(): Promise<Deno.HttpClient> {
    return this.#client ??= fetchClient(await loadCredentials(this.env, "admin"));
  }

  /** Runs `k8s4r <args>` in this stack's project dir. Never throws on a non-zero exit. */
  async cli(args: string[], timeoutMs = 180_000): Promise<OutputResult & { ms: number }> {
    const t0 = performance.now();
    const r = await realRunner.output("deno", ["run", "-A", MAIN_TS, ...args], {
      cwd: this.dir,
      env: this.env,
      timeoutMs,
      check: false,
    });
    return { ...r, ms: performance.now() - t0 };
  }

  async start(extra: string[] = []): Promise<OutputResult & { ms: number }> {
    return await this.cli(["devenv", "start", "--project-dir", this.dir, ...extra]);
  }

  /** Every pid file devenv may have written (components, agents). */
  async pidFiles(): Promise<string[]> {
    const out: string[] = [];
    try {
      for await (const e of Deno.readDir(this.layout.devEnvDir)) {
        if (e.isFile && e.name.endsWith(".pid")) out.push(join(this.layout.devEnvDir, e.name));
      }
    } catch { /* no .dev-env */ }
    return out;
  }

  /** `devenv stop`, then a pid-checked stop of anything still alive. Keeps the directory. */
  async stop(): Promise<void> {
    await this.cli(["devenv", "stop", "--project-dir", this.dir], 60_000).catch(() => {});
    for (const f of await this.pidFiles()) await stopPidFile(f, 3000);
  }

  /** Stops everything and deletes all state (`devenv clean`), keeping config/. */
  async clean(): Promise<void> {
    const files = await this.pidFiles();
    await this.cli(["devenv", "clean", "--project-dir", this.dir], 60_000).catch(() => {});
    for (const f of files) await stopPidFile(f, 3000);
  }

  /** Stops everything and removes the whole temp directory. */
  async destroy(): Promise<void> {
    this.#client?.close();
    this.#client = undefined;
    await this.clean();
    await Deno.remove(this.dir, { recursive: true }).catch(() => {});
  }

  async serverStats(): Promise<ServerStats | undefined> {
    try {
      const r = await fetch(`${this.api}/api/stats`, {
        signal: AbortSignal.timeout(5000),
        client: await this.client(),
      });
      if (!r.ok) {
        await r.body?.cancel();
        return undefined;
      }
      return await r.json() as ServerStats;
    } catch {
      return undefined;
    }
  }

  async waitServer(timeoutMs = 30_000): Promise<void> {
    await waitFor(async () => (await this.serverStats())?.mqtt.connected === true, {
      timeoutMs,
      intervalMs: 100,
      what: "the k8s4r server's /api/stats",
    });
  }
}

export interface ServerStats {
  mqtt: { connected: boolean };
  messages: {
    received: Record<string, number>;
    droppedTotal: number;
    dropped: Record<string, number>;
  };
  tasks: Record<string, number>;
  robots: { total: number; online: number };
}

async function copyDir(from: string, to: string): Promise<void> {
  await Deno.mkdir(to, { recursive: true });
  for await (const e of Deno.readDir(from)) {
    const a = join(from, e.name);
    const b = join(to, e.name);
    if (e.isDirectory) await copyDir(a, b);
    else if (e.isFile) await Deno.copyFile(a, b);
  }
}

/** One line of `ss -tin` for the TCP connection from a local port, with byte counters. */
export async function tcpBytes(
  localPort: number,
): Promise<{ sent: number; received: number } | undefined> {
  const r = await realRunner.output("ss", [
    "-tinH",
    "state",
    "established",
    `sport = :${localPort}`,
  ], {
    check: false,
    timeoutMs: 5000,
  }).catch(() => undefined);
  if (!r?.success) return undefined;
  const sent = /bytes_sent:(\d+)/.exec(r.stdout);
  const recv = /bytes_received:(\d+)/.exec(r.stdout);
  if (!sent || !recv) return undefined;
  return { sent: Number(sent[1]), received: Number(recv[1]) };
}

/**
 * A bare `mosquitto_sub` on the stack's loopback listener with the server's credentials, which
 * it reads from `$XDG_CONFIG_HOME/mosquitto_sub` (a 0600 file in a 0700 temp dir): the password
 * never appears on a command line. Its output (one line per message, `format`) goes to `out`.
 */
export async function spawnSubscriber(
  stack: BenchStack,
  cleanup: Cleanup,
  topic: string,
  format: string,
): Promise<{ daemon: Daemon; out: string }> {
  const creds = JSON.parse(await Deno.readTextFile(stack.layout.serverCredentialsFile));
  return await spawnSubscriberAt(stack.layout.ports.mqttPlain, creds, cleanup, topic, format);
}

/** The same, on any broker's loopback password listener. */
export async function spawnSubscriberAt(
  plainPort: number,
  creds: { username: string; password: string },
  cleanup: Cleanup,
  topic: string,
  format: string,
): Promise<{ daemon: Daemon; out: string }> {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-bench-sub-" });
  cleanup.add("subscriber dir", () => Deno.remove(dir, { recursive: true }));
  await Deno.chmod(dir, 0o700);
  const conf = join(dir, "mosquitto_sub");
  await Deno.writeTextFile(conf, `-u ${creds.username}\n-P ${creds.password}\n`, { mode: 0o600 });
  await Deno.chmod(conf, 0o600);
  const out = join(dir, "out");
  const daemon = await realRunner.spawn({
    name: "mosquitto_sub",
    cmd: "mosquitto_sub",
    args: [
      "-h",
      "127.0.0.1",
      "-p",
      String(plainPort),
      "-i",
      `k8s4r-bench-sub-${crypto.randomUUID().slice(0, 8)}`,
      "-q",
      "1",
      "-t",
      topic,
      "-F",
      format,
    ],
    env: { XDG_CONFIG_HOME: dir },
    logFile: out,
  });
  cleanup.add("mosquitto_sub", () => daemon.stop(2000));
  return { daemon, out };
}

/** How an agent is run: `deno` arguments before `agent ...`, and DENO_V8_FLAGS. */
export interface AgentRuntime {
  runArgs: string[];
  v8Flags: string;
}

/** This tree's agent runtime, as `devenv start` runs it. */
export function thisTreeRuntime(): AgentRuntime {
  return {
    runArgs: agentRunArgs(["run", "-A", MAIN_TS]),
    v8Flags: agentV8FlagsEnv(Deno.env.get("DENO_V8_FLAGS")),
  };
}

/**
 * Replaces the agent devenv started for `robotId` with one started here with extra flags (e.g.
 * `--heartbeat-seconds 1`), as devenv runs it (`rt`: this tree's by default, or a baseline
 * tree's). It uses the same pid file, so `devenv stop/clean` stop it too; it is not detached,
 * so it also dies with this process. Ready once its own log says `mqtt.connected`; an agent
 * that exits first fails at once with its last log line.
 */
export async function restartAgent(
  stack: BenchStack,
  robotId: string,
  extra: string[],
  rt: AgentRuntime = thisTreeRuntime(),
): Promise<{ daemon: Daemon; logFile: string }> {
  const r = robotLayout(stack.layout, robotId, stack.env);
  await stopPidFile(r.pidFile, 10_000);
  const logFile = join(stack.dir, `bench-agent-${robotId}-${crypto.randomUUID().slice(0, 8)}.log`);
  const daemon = await realRunner.spawn({
    name: `agent ${robotId}`,
    cmd: "deno",
    args: [
      ...agentArgs(
        rt.runArgs,
        r,
        stack.layout.agentPluginsYaml,
        stack.env.MQTT_BROKER_URL,
        { syncInterval: DEV_SPIRE_TIMING.agentSyncInterval }, // as devenv runs it
      ),
      ...extra,
    ],
    cwd: stack.dir,
    env: {
      ...stack.env,
      // As devenv runs it: the same V8 memory flags, and (as root) tasks as devenv's task user:
      // an agent that may run tasks as root refuses to start.
      DENO_V8_FLAGS: rt.v8Flags,
      K8S4R_TASK_USER: Deno.uid() === 0 ? DEFAULT_TASK_USER : "",
    },
    logFile,
    pidFile: r.pidFile,
    ready: async () =>
      (await Deno.readTextFile(logFile).catch(() => "")).includes("mqtt.connected"),
    readyTimeoutMs: 60_000,
    readyIntervalMs: 50,
  });
  return { daemon, logFile };
}
