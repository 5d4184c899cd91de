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
import { writeFileAtomic } from "../fs/atomic.ts";

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

/**
 * How the stack runs; chosen at its first `start` and kept (a later `start` without the flags
 * resumes it; switching needs `devenv clean`, since the SPIRE datastore and CA differ).
 */
export interface StackMode {
  /** `--ha`: PostgreSQL, two SPIRE servers behind haproxy. */
  ha: boolean;
  /** `--root-ca` (implied by `--ha`): SPIRE's CA is signed by the root CA in `caDir`. */
  rootCa: boolean;
}

/** What `start` records in `.dev-env/devenv.json`. */
export interface DevenvState {
  robots: string[];
  /** The last start had `--monitoring` (status, logs and stop then cover Prometheus). */
  monitoring?: boolean;
  mode?: StackMode;
  /** `--advertise ADDR` of the start that launched the stack (sticky: later starts keep it). */
  advertise?: string;
  /** `--attestation x509pop`: the factory CA and SPIRE's x509pop attestor (sticky). */
  attestation?: "x509pop";
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
      "K8S4R_POSTGRES_PORT",
    ]
  ) {
    const v = io.env[k];
    if (overrides[k] === undefined && v !== undefined && v !== "" && !/^\d+$/.test(v)) {
      throw new UsageError(`environment variable ${k}: expected a port number, got '${v}'`);
    }
  }
  for (const k of ["K8S4R_SPIRE_SERVER_PORTS", "K8S4R_HTTP_PORTS"]) {
    const v = io.env[k];
    if (v !== undefined && v !== "" && !/^\d+,\d+$/.test(v)) {
      throw new UsageError(
        `environment variable ${k}: expected two ports like 8181,8182, got '${v}'`,
      );
    }
  }
  const env: Record<string, string | undefined> = { ...io.env };
  for (const [k, v] of Object.entries(overrides)) if (v !== undefined) env[k] = v;
  const layout = defaultLayout(root, env);
  return {
    io,
    layout,
    files: devenvFiles(layout, env),
    layoutEnv: childLayoutEnv(layout, env),
    env,
    stateFile: join(layout.devEnvDir, "devenv.json"),
  };
}

/**
 * The same context with another advertised address (`start --advertise`, or the one the running
 * stack was started with). `undefined` = loopback only.
 */
export function withAdvertise(ctx: DevenvContext, advertise: string | undefined): DevenvContext {
  const env: Record<string, string | undefined> = { ...ctx.env, K8S4R_ADVERTISE: advertise };
  if (!advertise) delete env.K8S4R_ADVERTISE;
  const layout = defaultLayout(ctx.layout.root, env);
  return {
    ...ctx,
    layout,
    files: devenvFiles(layout, env),
    layoutEnv: childLayoutEnv(layout, env),
    env,
  };
}

/** The layout env for children (none of it secret): ports, trust domain, --ha, --advertise. */
function childLayoutEnv(
  layout: Layout,
  env: Record<string, string | undefined>,
): Record<string, string> {
  return layoutEnv(layout.ports, {
    agentSocketDir: env["K8S4R_AGENT_SOCKET_DIR"],
    trustDomain: layout.trustDomain,
    ha: layout.ha,
    advertise: layout.advertise,
  });
}

/** `--advertise ADDR`: an IPv4/IPv6 address or a host name, not a wildcard. */
export function checkAdvertise(v: string): string {
  if (!/^[0-9A-Za-z.:-]{1,253}$/.test(v) || v === "0.0.0.0" || v === "::" || v.startsWith("-")) {
    throw new UsageError(
      `--advertise: expected the address robots dial (an IP address of this host, or a name), got '${v}'`,
    );
  }
  return v;
}

export function robotLayouts(ctx: DevenvContext, robots: string[]): RobotLayout[] {
  return robots.map((r) => robotLayout(ctx.layout, r, ctx.env));
}

/** `--robots N` gives robot-001..robot-N; otherwise `ROBOT_ID` or robot-001. */
export function robotIds(n: number | undefined, env: Record<string, string | undefined>): string[] {
  if (n !== undefined) {
    if (!Number.isInteger(n) || n < 0 || n > 999) {
      throw new UsageError(`--robots: expected a whole number in [0, 999], got ${n}`);
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
      mode: s.mode && typeof s.mode === "object"
        ? { ha: s.mode.ha === true, rootCa: s.mode.rootCa === true }
        : undefined,
      advertise: typeof s.advertise === "string" ? s.advertise : undefined,
      attestation: s.attestation === "x509pop" ? "x509pop" : undefined,
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
