import { type CommandSpec, notImplemented } from "../cli/mod.ts";

export const devenvCommand: CommandSpec = {
  name: "devenv",
  summary: "Start, inspect and stop the local SPIRE + Mosquitto + server + agent stack",
  subcommands: [
    {
      name: "install",
      summary: "Provision spire-server, spire-agent and mosquitto",
      run: notImplemented("devenv install"),
    },
    { name: "start", summary: "Start the whole stack", run: notImplemented("devenv start") },
    {
      name: "status",
      summary: "Show each component's state",
      run: notImplemented("devenv status"),
    },
    { name: "logs", summary: "Show component logs", run: notImplemented("devenv logs") },
    { name: "stop", summary: "Stop everything devenv started", run: notImplemented("devenv stop") },
    {
      name: "clean",
      summary: "Stop, then delete all devenv state",
      run: notImplemented("devenv clean"),
    },
  ],
};
