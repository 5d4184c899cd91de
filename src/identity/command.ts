import { type CommandSpec, notImplemented } from "../cli/mod.ts";

export const identityCommand: CommandSpec = {
  name: "identity",
  summary: "Inspect SPIFFE identities from a Workload API",
  subcommands: [{
    name: "fetch",
    summary: "Fetch X.509 SVIDs and bundles",
    run: notImplemented("identity fetch"),
  }],
};
