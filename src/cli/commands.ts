/**
 * The k8s4r command tree. Each area owns its command spec; this file only assembles them.
 *
 * Subcommands are lazy (`load`): `k8s4r agent` imports the agent's modules and not the server's,
 * devenv's or doctor's, so each process loads only the command it runs (less memory for the
 * long-running agent and a faster CLI start; docs/BENCHMARKS.md, agent memory). Help for the
 * root loads them all.
 *
 * The modules are imported with `importLater` (import_later.ts), so that Deno does not load
 * every command's module graph into every process at start.
 */
import type { CommandSpec } from "./mod.ts";
import { VERSION } from "../version.ts";
import { importLater } from "./import_later.ts";

type Server = typeof import("../server/command.ts");
type Agent = typeof import("../agent/command.ts");
type Devenv = typeof import("../devenv/command.ts");
type Doctor = typeof import("../doctor/command.ts");
type DoctorPaths = typeof import("./doctor_paths.ts");
type Identity = typeof import("../identity/command.ts");
type Operator = typeof import("../operator/command.ts");
type Control = typeof import("../control/command.ts");
type Broker = typeof import("../broker/command.ts");
type Ca = typeof import("../ca/command.ts");
type Backup = typeof import("../backup/command.ts");
type BackupPaths = typeof import("./backup_paths.ts");

/** A module of this tree (`path` relative to this file), imported when it is called. */
const later = <T>(path: string) => importLater<T>(new URL(path, import.meta.url));

/** A subcommand known by name only until it runs; its summary comes with its module. */
function lazy(name: string, load: () => Promise<CommandSpec>): CommandSpec {
  return { name, summary: "", load };
}

export const rootCommand: CommandSpec = {
  name: "k8s4r",
  summary: "k8s4r: zero-trust connection layer for robot fleets (SPIFFE/SPIRE + MQTT mTLS)",
  flags: [{ name: "version", short: "V", type: "boolean", description: "Print the version" }],
  subcommands: [
    lazy("server", async () => (await later<Server>("../server/command.ts")).serverCommand),
    lazy("agent", async () => (await later<Agent>("../agent/command.ts")).agentCommand),
    lazy("devenv", async () => (await later<Devenv>("../devenv/command.ts")).devenvCommand),
    lazy("doctor", async () =>
      (await later<Doctor>("../doctor/command.ts")).makeDoctorCommand(
        (await later<DoctorPaths>("./doctor_paths.ts")).devStackPaths,
        (await later<DoctorPaths>("./doctor_paths.ts")).devStackComponents,
      )),
    lazy("identity", async () => (await later<Identity>("../identity/command.ts")).identityCommand),
    lazy("operator", async () => (await later<Operator>("../operator/command.ts")).operatorCommand),
    lazy("robot", async () =>
      (await later<Control>("../control/command.ts")).makeRobotCommand(
        (await later<DoctorPaths>("./doctor_paths.ts")).devControlConfig,
      )),
    lazy("broker", async () => (await later<Broker>("../broker/command.ts")).brokerCommand),
    lazy("robots", async () => (await later<Server>("../server/command.ts")).robotsCommand),
    lazy("tasks", async () => (await later<Server>("../server/command.ts")).tasksCommand),
    lazy("task", async () => (await later<Server>("../server/command.ts")).taskCommand),
    lazy("dashboard", async () => (await later<Server>("../server/command.ts")).dashboardCommand),
    lazy("ca", async () => (await later<Ca>("../ca/command.ts")).caCommand),
    lazy("backup", async () =>
      (await later<Backup>("../backup/command.ts")).makeBackupCommand(
        (await later<BackupPaths>("./backup_paths.ts")).devStackBackupSources,
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
