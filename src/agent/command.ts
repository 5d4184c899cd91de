import { type CommandSpec, notImplemented } from "../cli/mod.ts";

export const agentCommand: CommandSpec = {
  name: "agent",
  summary: "Run the robot agent: SPIRE agent, SVID, and MQTT over mTLS",
  flags: [{
    name: "robot-id",
    type: "string",
    valueName: "ID",
    description: "Robot id (env ROBOT_ID)",
  }],
  run: notImplemented("agent"),
};
