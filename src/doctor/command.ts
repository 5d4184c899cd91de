/**
 * `k8s4r doctor`: every troubleshooting step of the guide, as concurrent checks (modelled on
 * `flutter doctor`). Exit 0 when nothing failed or crashed, 1 otherwise.
 */
import { dataDirFromEnv } from "../fleet/paths.ts";
import { resolve } from "node:path";
import { closest, type CommandSpec } from "../cli/mod.ts";
import { UsageError } from "../cli/errors.ts";
import { colorEnabled, type Io } from "../cli/io.ts";
import { PRODUCTION_CONFIG_DIR, robotHostPaths } from "../fleet/paths.ts";
import { realContext, realFs } from "./adapters.ts";
import {
  type BrokerMode,
  type Check,
  type DoctorContext,
  type DoctorFs,
  GROUPS,
  ROBOT_GROUPS,
  type StackComponents,
  type StackPaths,
} from "./check.ts";
import { stackChecks } from "./checks/stack.ts";
import { allChecks } from "./checks/mod.ts";
import { robotChecks } from "./checks/robot.ts";
import { locateMosquitto } from "./checks/tools.ts";
import { renderHuman, renderJson } from "./render.ts";
import { exitCode, runChecks } from "./runner.ts";

export const DEFAULT_TIMEOUT_MS = 2000;

/**
 * Where the doctor runs. A robot host has k8s4r's robot files: `--data-dir DIR` names them
 * (DIR/agent.yaml or DIR/enrollment.json), or they are in /etc/k8s4r (agent.yaml or
 * enrollment.json, what `k8s4r agent --enroll` writes). Anything else is a control host (the
 * project in the current directory). `--robot` and `--control-host` decide instead.
 */
export async function detectHost(
  fs: DoctorFs,
  o: { robot: boolean; controlHost: boolean; dataDir?: string; configDir?: string },
): Promise<{ kind: "robot" | "control-host"; reason: string }> {
  if (o.robot) return { kind: "robot", reason: "--robot" };
  if (o.controlHost) return { kind: "control-host", reason: "--control-host" };
  if (o.dataDir !== undefined) return { kind: "robot", reason: `--data-dir ${o.dataDir}` };
  const dir = o.configDir ?? PRODUCTION_CONFIG_DIR;
  for (const f of ["agent.yaml", "enrollment.json"]) {
    if ((await fs.stat(`${dir}/${f}`).catch(() => undefined))?.isFile) {
      return { kind: "robot", reason: `${dir}/${f} exists` };
    }
  }
  return { kind: "control-host", reason: `no ${dir}/agent.yaml or enrollment.json` };
}

/**
 * `k8s4r doctor`, with the dev stack's paths and its component table handed in by the CLI
 * composition.
 */
export function makeDoctorCommand(
  stackPaths: StackPaths,
  stackComponents: StackComponents = () => [],
): CommandSpec {
  return {
    name: "doctor",
    summary: "Diagnose the stack: tools, config, SPIRE, CA bundle, broker, server",
    description: `Runs every troubleshooting step of the guide as a check, all at once, and prints a
verdict per check with a hint for each problem. Groups: ${GROUPS.join(", ")}.

On a robot host it checks the robot instead (groups ${ROBOT_GROUPS.join(", ")}): the SPIRE
server and broker addresses from the robot's config (TCP, then the TLS handshake), the clock
against the certificates, the enrollment and the data dir, the join token, and the agent SVID's
expiry. It runs as a robot when --data-dir is given or /etc/k8s4r holds agent.yaml or
enrollment.json (what 'k8s4r agent --enroll' writes); --robot or --control-host decide instead.

Production hardening findings (join_token attestation, sqlite datastore, insecure bootstrap,
anonymous listeners, a plain listener on a public address) are normal on a dev stack: they are
shown as info lines with --verbose, and become warnings with --production.`,
    flags: [
      { name: "json", type: "boolean", description: "Print the report as JSON" },
      { name: "verbose", short: "v", type: "boolean", description: "Show info lines and timings" },
      {
        name: "only",
        type: "string",
        valueName: "GROUP",
        description: "Run one group of checks",
        multiple: true,
      },
      {
        name: "robot-id",
        type: "string",
        valueName: "ID",
        description: "Robot to check (default $ROBOT_ID or robot-001)",
      },
      {
        name: "broker",
        type: "string",
        valueName: "MODE",
        description: "native, docker or auto (default auto)",
      },
      {
        name: "timeout",
        type: "number",
        valueName: "MS",
        description: `Per-check timeout (default ${DEFAULT_TIMEOUT_MS})`,
      },
      {
        name: "production",
        type: "boolean",
        description: "Treat production hardening findings as warnings",
      },
      { name: "robot", type: "boolean", description: "Check this host as a robot host" },
      { name: "control-host", type: "boolean", description: "Check this host as the control host" },
      {
        name: "data-dir",
        type: "string",
        valueName: "DIR",
        description:
          "The robot's data dir (as for 'k8s4r agent --data-dir'; env K8S4R_DATA_DIR); implies --robot",
      },
    ],
    async run(args, io) {
      if (args.bool("robot") && args.bool("control-host")) {
        throw new UsageError("doctor: --robot and --control-host exclude each other");
      }
      if (args.bool("control-host") && args.has("data-dir")) {
        throw new UsageError("doctor: --data-dir is a robot's; it cannot go with --control-host");
      }
      const dd = args.bool("control-host")
        ? args.string("data-dir")
        : dataDirFromEnv(args.string("data-dir"), io.env);
      const dataDir = dd !== undefined ? resolve(io.cwd, dd) : undefined;
      const host = await detectHost(realFs(io.env), {
        robot: args.bool("robot"),
        controlHost: args.bool("control-host"),
        dataDir,
      });
      const groups: readonly string[] = host.kind === "robot" ? ROBOT_GROUPS : GROUPS;
      const only = args.list("only");
      for (const g of only) {
        if (!groups.includes(g)) {
          const c = closest(g, [...groups]);
          throw new UsageError(
            `doctor: unknown group '${g}'${c ? ` (did you mean '${c}'?)` : ""}; groups${
              host.kind === "robot" ? " on a robot host" : ""
            }: ${groups.join(", ")}`,
          );
        }
      }
      const brokerFlag = args.string("broker") ?? "auto";
      if (!["native", "docker", "auto"].includes(brokerFlag)) {
        throw new UsageError(
          `doctor: --broker expects native, docker or auto, got '${brokerFlag}'`,
        );
      }
      const timeoutMs = args.number("timeout") ?? DEFAULT_TIMEOUT_MS;
      if (!(timeoutMs > 0)) {
        throw new UsageError(`doctor: --timeout expects a positive number of ms, got ${timeoutMs}`);
      }
      const robotId = args.string("robot-id") ?? io.env["ROBOT_ID"] ?? "robot-001";
      if (!/^[A-Za-z0-9._-]+$/.test(robotId)) {
        throw new UsageError(
          `doctor: --robot-id: expected letters, digits, '.', '_' or '-', got '${robotId}'`,
        );
      }
      const paths = stackPaths(io.cwd, io.env, robotId);
      const out = { json: args.bool("json"), verbose: args.bool("verbose") };
      if (host.kind === "robot") {
        const ctx = realContext(
          io,
          {
            robotId,
            broker: "native",
            production: args.bool("production"),
            timeoutMs,
            container: paths.layout.brokerContainer,
          },
          paths,
          { paths: robotHostPaths(dataDir), reason: host.reason },
        );
        const checks = only.length
          ? robotChecks.filter((c) => only.includes(c.group))
          : robotChecks;
        return await runDoctor(ctx, checks, out);
      }
      const broker = brokerFlag === "auto"
        ? await detectBrokerMode(realFs(io.env), paths.layout.files.brokerStateFile)
        : brokerFlag as BrokerMode;
      const ctx = realContext(io, {
        robotId,
        broker,
        production: args.bool("production"),
        timeoutMs,
        container: paths.layout.brokerContainer,
      }, paths);
      const checks = [...allChecks(broker), ...stackChecks(stackComponents(io))];
      return await runDoctor(ctx, selectChecks(checks, only, broker), out);
    },
  };
}

/** The checks of the chosen groups (docker checks when asked for explicitly, too). */
export function selectChecks(checks: Check[], only: string[], broker: BrokerMode): Check[] {
  if (!only.length) return checks;
  const pool = only.includes("docker") && broker !== "docker" ? allChecks("docker") : checks;
  return pool.filter((c) => only.includes(c.group));
}

/** Runs the checks and prints the report. Returns the exit code. */
export async function runDoctor(
  ctx: DoctorContext,
  checks: Check[],
  out: { json: boolean; verbose: boolean },
): Promise<number> {
  const report = await runChecks(checks, ctx, { timeoutMs: ctx.options.timeoutMs });
  const io: Io = ctx.io;
  io.stdout.write(
    out.json
      ? renderJson(report)
      : renderHuman(report, { color: colorEnabled(io), verbose: out.verbose }),
  );
  return exitCode(report);
}

/**
 * auto: what devenv started (`.dev-env/broker.json` `{mode}`), else native when a mosquitto
 * binary exists, else docker when docker does, else native (whose checks then say what is missing).
 */
export async function detectBrokerMode(fs: DoctorFs, stateFile: string): Promise<BrokerMode> {
  try {
    const state = JSON.parse(await fs.readTextFile(stateFile));
    if (state?.mode === "native" || state?.mode === "docker") return state.mode;
  } catch { /* no devenv state */ }
  if (await locateMosquitto(fs)) return "native";
  if (await fs.which("docker")) return "docker";
  return "native";
}
