/** The k8s4r command tree. Each area owns its command spec; this file only assembles them. */
import type { CommandSpec } from "./mod.ts";
import { VERSION } from "../version.ts";
import { robotsCommand, serverCommand, taskCommand } from "../server/command.ts";
import { agentCommand } from "../agent/command.ts";
import { devenvCommand } from "../devenv/command.ts";
import { makeDoctorCommand } from "../doctor/command.ts";
import { devControlConfig, devStackPaths } from "./doctor_paths.ts";
import { makeRobotCommand } from "../control/command.ts";
import { brokerCommand } from "../broker/command.ts";
import { identityCommand } from "../identity/command.ts";

export const rootCommand: CommandSpec = {
  name: "k8s4r",
  summary: "k8s4r: zero-trust connection layer for robot fleets (SPIFFE/SPIRE + MQTT mTLS)",
  flags: [{ name: "version", short: "V", type: "boolean", description: "Print the version" }],
  subcommands: [
    serverCommand,
    agentCommand,
    devenvCommand,
    makeDoctorCommand(devStackPaths),
    identityCommand,
    robotsCommand,
    makeRobotCommand(devControlConfig),
    brokerCommand,
    taskCommand,
  ],
  run(args, io) {
    if (args.bool("version")) {
      io.stdout.write(`k8s4r ${VERSION}\n`);
      return Promise.resolve(0);
    }
    return Promise.resolve(-1); // main prints help
  },
};
