/**
 * The k8s4r command tree. Each area owns its command spec; this file only assembles them.
 *
 * Subcommands are lazy (`load`): `k8s4r agent` imports the agent's modules and not the server's,
 * devenv's or doctor's, so each process loads only the command it runs (a little less memory
 * for the long-running agent and a faster CLI start; docs/BENCHMARKS.md, agent memory). Help
 * for the root loads them all.
 */
import type { CommandSpec } from "./mod.ts";
import { VERSION } from "../version.ts";

/** A subcommand known by name only until it runs; its summary comes with its module. */
function lazy(name: string, load: () => Promise<CommandSpec>): CommandSpec {
  return { name, summary: "", load };
}

export const rootCommand: CommandSpec = {
  name: "k8s4r",
  summary: "k8s4r: zero-trust connection layer for robot fleets (SPIFFE/SPIRE + MQTT mTLS)",
  flags: [{ name: "version", short: "V", type: "boolean", description: "Print the version" }],
  subcommands: [
    lazy("server", async () => (await import("../server/command.ts")).serverCommand),
    lazy("agent", async () => (await import("../agent/command.ts")).agentCommand),
    lazy("devenv", async () => (await import("../devenv/command.ts")).devenvCommand),
    lazy("doctor", async () =>
      (await import("../doctor/command.ts")).makeDoctorCommand(
        (await import("./doctor_paths.ts")).devStackPaths,
        (await import("./doctor_paths.ts")).devStackComponents,
      )),
    lazy("identity", async () => (await import("../identity/command.ts")).identityCommand),
    lazy("operator", async () => (await import("../operator/command.ts")).operatorCommand),
    lazy("robot", async () =>
      (await import("../control/command.ts")).makeRobotCommand(
        (await import("./doctor_paths.ts")).devControlConfig,
      )),
    lazy("broker", async () => (await import("../broker/command.ts")).brokerCommand),
    lazy("robots", async () => (await import("../server/command.ts")).robotsCommand),
    lazy("tasks", async () => (await import("../server/command.ts")).tasksCommand),
    lazy("task", async () => (await import("../server/command.ts")).taskCommand),
    lazy("ca", async () => (await import("../ca/command.ts")).caCommand),
    lazy("backup", async () =>
      (await import("../backup/command.ts")).makeBackupCommand(
        (await import("./backup_paths.ts")).devStackBackupSources,
      )),
  ],
  run(args, io) {
    if (args.bool("version")) {
      io.stdout.write(`k8s4r ${VERSION}\n`);
      return Promise.resolve(0);
    }
    return Promise.resolve(-1); // main prints help
  },
};
