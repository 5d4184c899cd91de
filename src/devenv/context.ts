/**
 * What every devenv subcommand resolves first: the project layout (flags over env over the
 * guide's defaults), the per-component files, the robots, and the state `start` left behind, so
 * that `status`, `logs`, `stop` and `clean` need no flags repeated.
 */
import { existsSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import type { Args, FlagSpec } from "../cli/mod.ts";
import { UsageError } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import { isRobotId } from "../fleet/topics.ts";
import {
  defaultLayout,
  type DevenvFiles,
  devenvFiles,
  type Layout,
  layoutEnv,
  type RobotLayout,
  robotLayout,
} from "./layout.ts";
import type { BrokerCommand } from "./broker_argv.ts";

export type BrokerModeFlag = "native" | "docker" | "auto";

/**
 * How often devenv polls a readiness probe. Each one is a local, cheap call (a gRPC health
 * check on a unix socket, an HTTP GET or an MQTT CONNECT on loopback, a file read), so a fine
 * interval costs little and a component is seen ready within 20 ms of being ready.
 */
export const PROBE_INTERVAL_MS = 20;

/** Flags every devenv subcommand accepts: where the stack lives and on which ports. */
export const LAYOUT_FLAGS: FlagSpec[] = [
  {
    name: "project-dir",
    type: "string",
    valueName: "DIR",
    description: "Project directory holding config/ (default: current directory)",
  },
  {
    name: "spire-server-port",
    type: "number",
    valueName: "PORT",
    description: "SPIRE server port (env K8S4R_SPIRE_SERVER_PORT, default 8081)",
  },
  {
    name: "mqtt-port",
    type: "number",
    valueName: "PORT",
    description: "Loopback password listener for the server (env K8S4R_MQTT_PORT, default 1883)",
  },
  {
    name: "mqtt-tls-port",
    type: "number",
    valueName: "PORT",
    description: "mTLS listener for robots (env K8S4R_MQTT_TLS_PORT, default 8883)",
  },
  {
    name: "http-port",
    type: "number",
    valueName: "PORT",
    description: "k8s4r server HTTP API (env K8S4R_HTTP_PORT, default 8090)",
  },
  {
    name: "telemetry-port",
    type: "number",
    valueName: "PORT",
    description:
      "First loopback telemetry port: SPIRE and agent metrics (env K8S4R_TELEMETRY_PORT, default 9800)",
  },
  {
    name: "prometheus-port",
    type: "number",
    valueName: "PORT",
    description: "Prometheus of --monitoring, loopback (env K8S4R_PROMETHEUS_PORT, default 9090)",
  },
  {
    name: "agent-socket-dir",
    type: "string",
    valueName: "DIR",
    description: "Directory for Workload API sockets (env K8S4R_AGENT_SOCKET_DIR, default " +
      "/tmp/spire-agent)",
  },
];

/** What `start` records in `.dev-env/devenv.json`. */
export interface DevenvState {
  robots: string[];
  /** The last start had `--monitoring` (status, logs and stop then cover Prometheus). */
  monitoring?: boolean;
  broker?: BrokerCommand;
  /** Socket directories devenv created (and so may delete on `clean`). */
  createdSocketDirs: string[];
  env: Record<string, string>;
}

export interface DevenvContext {
  io: Io;
  layout: Layout;
  files: DevenvFiles;
  /** The effective layout env (flags folded in): handed to every child process. */
  layoutEnv: Record<string, string>;
  /** io.env with the layout env folded in. */
  env: Record<string, string | undefined>;
  stateFile: string;
}

function portFlag(args: Args, flag: string): string | undefined {
  if (!args.has(flag)) return undefined;
  const n = args.number(flag)!;
  if (!Number.isInteger(n) || n < 1 || n > 65535) {
    throw new UsageError(`--${flag}: expected a port in [1, 65535], got ${n}`);
  }
  return String(n);
}

export function resolveContext(args: Args, io: Io): DevenvContext {
  const root = resolve(io.cwd, args.string("project-dir") ?? io.env["K8S4R_PROJECT_DIR"] ?? ".");
  const overrides: Record<string, string | undefined> = {
    K8S4R_SPIRE_SERVER_PORT: portFlag(args, "spire-server-port"),
    K8S4R_MQTT_PORT: portFlag(args, "mqtt-port"),
    K8S4R_MQTT_TLS_PORT: portFlag(args, "mqtt-tls-port"),
    K8S4R_HTTP_PORT: portFlag(args, "http-port"),
    K8S4R_TELEMETRY_PORT: portFlag(args, "telemetry-port"),
    K8S4R_PROMETHEUS_PORT: portFlag(args, "prometheus-port"),
    K8S4R_AGENT_SOCKET_DIR: args.string("agent-socket-dir") !== undefined
      ? resolve(io.cwd, args.string("agent-socket-dir")!)
      : undefined,
  };
  for (
    const k of [
      "K8S4R_SPIRE_SERVER_PORT",
      "K8S4R_MQTT_PORT",
      "K8S4R_MQTT_TLS_PORT",
      "K8S4R_HTTP_PORT",
      "K8S4R_TELEMETRY_PORT",
      "K8S4R_PROMETHEUS_PORT",
    ]
  ) {
    const v = io.env[k];
    if (overrides[k] === undefined && v !== undefined && v !== "" && !/^\d+$/.test(v)) {
      throw new UsageError(`environment variable ${k}: expected a port number, got '${v}'`);
    }
  }
  const env: Record<string, string | undefined> = { ...io.env };
  for (const [k, v] of Object.entries(overrides)) if (v !== undefined) env[k] = v;
  const layout = defaultLayout(root, env);
  return {
    io,
    layout,
    files: devenvFiles(layout, env),
    // Layout env for children, none of it secret.
    layoutEnv: layoutEnv(layout.ports, {
      agentSocketDir: env["K8S4R_AGENT_SOCKET_DIR"],
      trustDomain: layout.trustDomain,
    }),
    env,
    stateFile: join(layout.devEnvDir, "devenv.json"),
  };
}

export function robotLayouts(ctx: DevenvContext, robots: string[]): RobotLayout[] {
  return robots.map((r) => robotLayout(ctx.layout, r, ctx.env));
}

/** `--robots N` gives robot-001..robot-N; otherwise `ROBOT_ID` or robot-001. */
export function robotIds(n: number | undefined, env: Record<string, string | undefined>): string[] {
  if (n !== undefined) {
    if (!Number.isInteger(n) || n < 1 || n > 999) {
      throw new UsageError(`--robots: expected a whole number in [1, 999], got ${n}`);
    }
    return Array.from({ length: n }, (_, i) => `robot-${String(i + 1).padStart(3, "0")}`);
  }
  const id = env["ROBOT_ID"];
  if (id !== undefined && id !== "") {
    if (!isRobotId(id)) {
      throw new UsageError(
        `environment variable ROBOT_ID: expected [a-z0-9][a-z0-9-]{0,62}, got '${id}'`,
      );
    }
    return [id];
  }
  return ["robot-001"];
}

export function readState(ctx: DevenvContext): DevenvState | undefined {
  try {
    const s = JSON.parse(Deno.readTextFileSync(ctx.stateFile));
    if (!Array.isArray(s?.robots)) return undefined;
    return {
      robots: s.robots.filter(isRobotId),
      monitoring: s.monitoring === true,
      broker: s.broker,
      createdSocketDirs: Array.isArray(s.createdSocketDirs) ? s.createdSocketDirs : [],
      env: s.env ?? {},
    };
  } catch {
    return undefined;
  }
}

export async function writeState(ctx: DevenvContext, state: DevenvState): Promise<void> {
  await writeFileAtomic(ctx.stateFile, JSON.stringify(state, null, 2) + "\n", 0o600);
}

/** Robots known to this stack: from the state file, plus any agent pid file left behind. */
export function knownRobots(ctx: DevenvContext): string[] {
  const robots = new Set(readState(ctx)?.robots ?? []);
  try {
    for (const e of Deno.readDirSync(ctx.layout.devEnvDir)) {
      if (e.name === "agent.pid") robots.add("robot-001");
      const m = /^agent-(.+)\.pid$/.exec(e.name);
      if (m && isRobotId(m[1])) robots.add(m[1]);
    }
  } catch { /* no .dev-env yet */ }
  return [...robots].sort();
}

/** Writes a file atomically (temp file + rename) with the given mode; creates the directory. */
export async function writeFileAtomic(
  path: string,
  data: string | Uint8Array,
  mode: number,
  dirMode = 0o700,
): Promise<void> {
  await Deno.mkdir(dirname(path), { recursive: true, mode: dirMode });
  const tmp = `${path}.tmp-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
  try {
    if (typeof data === "string") await Deno.writeTextFile(tmp, data, { mode });
    else await Deno.writeFile(tmp, data, { mode });
    await Deno.chmod(tmp, mode);
    await Deno.rename(tmp, path);
  } catch (err) {
    await Deno.remove(tmp).catch(() => {});
    throw err;
  }
}

/**
 * How to run k8s4r itself for a child component: from source (`deno run -A main.ts`) when this
 * is the deno binary running a file, or the compiled binary itself.
 */
export function selfCommand(): { cmd: string; args: string[] } {
  const exe = Deno.execPath();
  const mainUrl = new URL("../../main.ts", import.meta.url);
  if (mainUrl.protocol === "file:" && /^deno(\.exe)?$/.test(basename(exe))) {
    const main = fileURLToPath(mainUrl);
    const config = join(dirname(main), "deno.json");
    return {
      cmd: exe,
      args: ["run", "-A", "--quiet", ...(existsSync(config) ? ["--config", config] : []), main],
    };
  }
  return { cmd: exe, args: [] };
}
