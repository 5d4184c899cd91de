/**
 * `k8s4r doctor`: every troubleshooting step of the guide, as concurrent checks (modelled on
 * `flutter doctor`). Exit 0 when nothing failed or crashed, 1 otherwise.
 */
import { closest, type CommandSpec } from "../cli/mod.ts";
import { UsageError } from "../cli/errors.ts";
import { colorEnabled, type Io } from "../cli/io.ts";
import { containerName } from "../devenv/broker_argv.ts";
import { defaultLayout, devenvFiles } from "../devenv/layout.ts";
import { realContext, realFs } from "./adapters.ts";
import { type BrokerMode, type Check, type DoctorContext, type DoctorFs, GROUPS } from "./check.ts";
import { allChecks } from "./checks/mod.ts";
import { locateMosquitto } from "./checks/tools.ts";
import { renderHuman, renderJson } from "./render.ts";
import { exitCode, runChecks } from "./runner.ts";

export const DEFAULT_TIMEOUT_MS = 2000;

export const doctorCommand: CommandSpec = {
  name: "doctor",
  summary: "Diagnose the stack: tools, config, SPIRE, CA bundle, broker, server",
  description: `Runs every troubleshooting step of the guide as a check, all at once, and prints a
verdict per check with a hint for each problem. Groups: ${GROUPS.join(", ")}.

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
  ],
  async run(args, io) {
    const only = args.list("only");
    for (const g of only) {
      if (!(GROUPS as readonly string[]).includes(g)) {
        const c = closest(g, [...GROUPS]);
        throw new UsageError(
          `doctor: unknown group '${g}'${c ? ` (did you mean '${c}'?)` : ""}; groups: ${
            GROUPS.join(", ")
          }`,
        );
      }
    }
    const brokerFlag = args.string("broker") ?? "auto";
    if (!["native", "docker", "auto"].includes(brokerFlag)) {
      throw new UsageError(`doctor: --broker expects native, docker or auto, got '${brokerFlag}'`);
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
    const layout = defaultLayout(io.cwd, io.env);
    const broker = brokerFlag === "auto"
      ? await detectBrokerMode(realFs(io.env), devenvFiles(layout, io.env).brokerStateFile)
      : brokerFlag as BrokerMode;
    const ctx = realContext(io, {
      robotId,
      broker,
      production: args.bool("production"),
      timeoutMs,
      container: io.env["K8S4R_MOSQUITTO_CONTAINER"] ?? containerName(layout.root),
    });
    return await runDoctor(ctx, selectChecks(allChecks(broker), only, broker), {
      json: args.bool("json"),
      verbose: args.bool("verbose"),
    });
  },
};

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
