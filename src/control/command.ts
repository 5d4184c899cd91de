/**
 * `k8s4r robot add|list|remove`: enrollment on the control host (robots.ts). The control-host
 * config says where SPIRE's admin socket, the broker's admin login and the factory CA are
 * (config.ts); the CLI composition hands in where a dev stack keeps its own.
 */
import { basename, resolve } from "node:path";
import type { Args, CommandSpec, FlagSpec } from "../cli/mod.ts";
import { CliError, errorMessage, UsageError } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import { type AttestationType, enrollCommand } from "../fleet/enrollment.ts";
import { formatDuration, parseDuration } from "../fleet/duration.ts";
import { parseHostPort } from "../fleet/addresses.ts";
import { DynsecAdmin } from "../mqtt/dynsec.ts";
import { findSpireBinaries } from "../spire/binaries.ts";
import { spireAdminCli } from "../spire/server.ts";
import {
  type ControlHostConfig,
  findControlConfig,
  readAdminCredentials,
  readControlConfig,
} from "./config.ts";
import {
  addRobot,
  checkRobotIdArg,
  type ControlDeps,
  DEFAULT_CERT_TTL_MS,
  DEFAULT_TOKEN_TTL_MS,
  listRobots,
  removeRobot,
  type RobotRow,
} from "./robots.ts";

/** Where a dev stack in `cwd` keeps its control-host config (from devenv's layout). */
export type DevControlConfig = (cwd: string, env: Record<string, string | undefined>) => string;

const CONFIG_FLAG: FlagSpec = {
  name: "control-config",
  type: "string",
  valueName: "FILE",
  description:
    "Control-host config (env K8S4R_CONTROL_CONFIG; default: the dev stack's .dev-env/control-host.json, else /etc/k8s4r/control-host.json)",
};

async function deps(args: Args, io: Io, dev: DevControlConfig): Promise<ControlDeps> {
  const file = await findControlConfig(args.string("control-config"), io.env, io.cwd, dev);
  const config = await readControlConfig(file);
  const bin = config.spireServer.bin ?? (await findSpireBinaries(io))?.server;
  if (!bin) {
    throw new CliError(
      "spire-server not found",
      1,
      `set spireServer.bin in ${file}, or run: k8s4r devenv install`,
    );
  }
  return {
    config,
    spire: await spireAdminCli(io.runner, bin, config.spireServer.adminSocket),
    broker: () => brokerAdmin(config),
  };
}

async function brokerAdmin(config: ControlHostConfig): Promise<DynsecAdmin> {
  const creds = await readAdminCredentials(config.broker.adminCredentials);
  const { host, port } = parseHostPort(config.broker.adminAddress);
  return await DynsecAdmin.connect({ host, port, ...creds });
}

function attestationFlag(v: string | undefined): AttestationType {
  if (v === undefined || v === "join-token" || v === "join_token") return "join_token";
  if (v === "x509pop") return "x509pop";
  throw new UsageError(`robot add: --attestation expects join-token or x509pop, got '${v}'`);
}

function ttlFlag(v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  try {
    const ms = parseDuration(v);
    if (ms < 1000) throw new Error(`expected at least 1s, got '${v}'`);
    return ms;
  } catch (err) {
    throw new UsageError(`robot add: --ttl: ${errorMessage(err)}`);
  }
}

export function makeRobotCommand(dev: DevControlConfig): CommandSpec {
  const add: CommandSpec = {
    name: "add",
    summary: "Enroll a robot: its SPIRE entries, a join token or an x509pop certificate, the file",
    description: `Creates or updates the robot's registration entries in SPIRE: the node alias
spiffe://<td>/k8s4r/node/ID and the workload entry spiffe://<td>/robot/ID with -dns ID (the CN
rule: the robot id is its MQTT username). With a join token (default) the token is single use and
expires after --ttl (default ${
      formatDuration(DEFAULT_TOKEN_TTL_MS)
    }). With x509pop the robot made its
key itself (k8s4r agent csr); the factory CA signs its CSR, valid for --ttl (default
${formatDuration(DEFAULT_CERT_TTL_MS)}). Writes one 0600 enrollment file (trust bundle, SPIRE
server address, broker URL, broker and fleet-server SPIFFE IDs, the token or certificate) and
prints the command to run on the robot. Adding a robot that was removed lifts its cut-off, last,
once everything else succeeded, and only after every SVID it got before its removal has expired
(robot remove records until when: the removal plus the longest SVID lifetime,
spireServer.defaultX509SvidTtl or 1h, plus a minute): the broker tells an old SVID from a new one
by nothing but the CN. Before then robot add refuses, unless --force.`,
    positionals: [{ name: "ID", description: "The robot id (not k8s4r-*, broker or localhost)" }],
    flags: [
      {
        name: "attestation",
        type: "string",
        valueName: "TYPE",
        description: "join-token (default) or x509pop",
      },
      {
        name: "csr",
        type: "string",
        valueName: "FILE",
        description: "x509pop: the robot's CSR (k8s4r agent csr --robot-id ID on the robot)",
      },
      {
        name: "ttl",
        type: "string",
        valueName: "DUR",
        description: "Token lifetime or certificate validity (600, 10m, 24h, 365d)",
      },
      {
        name: "out",
        type: "string",
        valueName: "FILE",
        description: "The enrollment file (default ID.enroll.json)",
      },
      {
        name: "force",
        type: "boolean",
        description:
          "Re-add a removed robot before its old SVIDs expired (they reach the broker again; a warning says until when)",
      },
      CONFIG_FLAG,
    ],
    async run(args, io) {
      const id = checkRobotIdArg(args.positionals[0], "add");
      if (args.positionals.length > 1) {
        throw new UsageError(`robot add: one robot id, got ${args.positionals.length}`);
      }
      const attestation = attestationFlag(args.string("attestation"));
      const ttlMs = ttlFlag(args.string("ttl"));
      let csrPem: string | undefined;
      const csrFile = args.string("csr");
      if (csrFile !== undefined) {
        try {
          csrPem = await Deno.readTextFile(resolve(io.cwd, csrFile));
        } catch (err) {
          throw new UsageError(`robot add: --csr ${csrFile}: ${errorMessage(err)}`);
        }
      }
      const out = resolve(io.cwd, args.string("out") ?? `${id}.enroll.json`);
      const d = await deps(args, io, dev);
      const t0 = performance.now();
      const r = await addRobot(d, {
        robotId: id,
        attestation,
        csrPem,
        ttlMs,
        out,
        force: args.bool("force"),
      });
      for (const w of r.warnings) io.stderr.write(`warning: ${w}\n`);
      const e = r.enrollment;
      io.stdout.write(
        `${id}: wrote ${out} (0600; ${
          e.attestation.type === "join_token"
            ? `a single-use join token, valid until ${e.attestation.expiresAt.toISOString()}`
            : `an x509pop certificate valid until ${e.attestation.expiresAt.toISOString()}`
        }) in ${Math.round(performance.now() - t0)} ms\n`,
      );
      for (const s of r.steps) io.stdout.write(`  ${s}\n`);
      io.stdout.write(
        `The robot dials the SPIRE server at ${e.spireServerAddress} and the broker at ${e.brokerUrl}.\n` +
          `Copy the file to the robot, then run there:\n  ${
            enrollCommand(id).replace(`${id}.enroll.json`, basename(out))
          }\n`,
      );
      return 0;
    },
  };

  const list: CommandSpec = {
    name: "list",
    summary: "Each robot's enrollment state, attestation, and when its token or cert expires",
    description: `State comes from SPIRE (spire-server entry show: the node alias and workload
entries; agent list: the attested agents and their agent SVIDs), from k8s4r's records of what
robot add issued (SPIRE cannot list join tokens, and the factory CA signs certificates outside
SPIRE), and from the broker's dynamic-security deny list (removed robots).`,
    flags: [
      { name: "json", type: "boolean", description: 'Print JSON: {"robots":[...]}' },
      CONFIG_FLAG,
    ],
    async run(args, io) {
      const d = await deps(args, io, dev);
      const { rows, brokerError } = await listRobots(d);
      if (args.bool("json")) {
        io.stdout.write(JSON.stringify({ robots: rows, brokerError }, null, 2) + "\n");
        return 0;
      }
      io.stdout.write(renderRows(rows, Date.now()));
      io.stdout.write(
        `\nsources: SPIRE entries and agents (${d.config.spireServer.adminSocket}); token and certificate expiry: ${d.config.records}; broker: ${
          brokerError ? `not reachable (${brokerError})` : "the dynamic-security deny list"
        }\n`,
      );
      return 0;
    },
  };

  const remove: CommandSpec = {
    name: "remove",
    summary: "Cut a robot off the broker at once, delete its entries, evict its SPIRE agent",
    description: `Disconnects every session of the robot on the broker and denies it every topic
(Mosquitto's dynamic-security plugin), deletes its SPIRE entries, and evicts its agent (a join-token
agent) or bans it (an x509pop agent, which could otherwise attest again with its certificate).
A removed robot whose SVID has not expired yet still completes the TLS handshake and CONNECT, but
every publish and subscribe is refused and nothing is delivered to it; once that SVID expires
(SPIRE gives it no new one) the handshake fails. See docs/CONTROL_HOST.md.`,
    positionals: [{ name: "ID", description: "The robot id" }],
    flags: [CONFIG_FLAG],
    async run(args, io) {
      const id = checkRobotIdArg(args.positionals[0], "remove");
      const d = await deps(args, io, dev);
      const r = await removeRobot(d, id);
      io.stdout.write(`${id}: removed\n`);
      for (const s of r.steps) io.stdout.write(`  ${s}\n`);
      return 0;
    },
  };

  return {
    name: "robot",
    summary: "Enroll, list and remove robots (on the control host)",
    subcommands: [add, list, remove],
  };
}

function when(d: Date | undefined, now: number): string {
  if (!d) return "-";
  const ms = d.getTime() - now;
  return `${d.toISOString().replace(/\.\d{3}Z$/, "Z")} (${
    ms > 0 ? `in ${formatDuration(ms)}` : `${formatDuration(-ms)} ago`
  })`;
}

export function renderRows(rows: RobotRow[], now: number): string {
  if (rows.length === 0) return "no robots\n";
  const table = [
    ["ROBOT", "ATTESTATION", "STATE", "TOKEN/CERT EXPIRES", "AGENT SVID EXPIRES", "BROKER"],
    ...rows.map((r) => [
      r.robotId,
      r.attestation === "join_token" ? "join-token" : r.attestation,
      r.state,
      r.attestation === "join_token" && r.agentSvidExpires
        ? "used"
        : when(r.credentialExpires, now),
      when(r.agentSvidExpires, now),
      r.brokerCutOff === undefined ? "?" : r.brokerCutOff ? "cut off" : "allowed",
    ]),
  ];
  const widths = table[0].map((_, i) => Math.max(...table.map((row) => row[i].length)));
  const lines = table.map((row) => row.map((c, i) => c.padEnd(widths[i])).join("  ").trimEnd());
  const details = rows.map((r) => `  ${r.robotId}: ${r.detail}`);
  return [...lines, "", ...details].join("\n") + "\n";
}
