import { type CommandSpec, notImplemented } from "../cli/mod.ts";

export const serverCommand: CommandSpec = {
  name: "server",
  summary: "Run the fleet server (MQTT on 127.0.0.1:1883, HTTP API on 127.0.0.1:8090)",
  run: notImplemented("server"),
};

export const robotsCommand: CommandSpec = {
  name: "robots",
  summary: "List robots known to the fleet server",
  run: notImplemented("robots"),
};

export const taskCommand: CommandSpec = {
  name: "task",
  summary: "Run tasks on robots",
  subcommands: [{
    name: "run",
    summary: "Run a command on a robot and wait for its result",
    run: notImplemented("task run"),
  }],
};
