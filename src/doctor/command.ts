import { type CommandSpec, notImplemented } from "../cli/mod.ts";

export const doctorCommand: CommandSpec = {
  name: "doctor",
  summary: "Diagnose the stack: tools, config, SPIRE, CA bundle, broker, server",
  run: notImplemented("doctor"),
};
