/**
 * `k8s4r broker identity`: on a broker host, keeps Mosquitto's certificate a current X.509 SVID
 * of `spiffe://<td>/mqtt-broker` from the host's SPIRE agent (follow.ts, identity.ts). The
 * broker is told through commands, by default Debian's service manager:
 * `systemctl reload mosquitto` (its unit sends SIGHUP: new certificate and key) and
 * `systemctl restart mosquitto` (a new trust bundle: Mosquitto does not reload `cafile`).
 */
import { dirname, join, resolve } from "node:path";
import type { CommandSpec } from "../cli/mod.ts";
import { CliError, errorMessage, UsageError } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import { brokerSpiffeId, TRUST_DOMAIN } from "../fleet/ids.ts";
import { parseSpiffeId } from "../spiffe/id.ts";
import { followBrokerIdentity } from "./follow.ts";
import type { BrokerControl } from "./identity.ts";

/** A command line as argv, split on whitespace (no shell: nothing is interpreted). */
export function splitCommand(flag: string, text: string): string[] {
  const argv = text.trim().split(/\s+/).filter(Boolean);
  if (argv.length === 0) throw new UsageError(`broker identity: --${flag}: expected a command`);
  return argv;
}

/** Runs the operator's reload/restart commands. */
export function commandControl(io: Io, reload: string[], restart: string[]): BrokerControl {
  const run = async (argv: string[], what: string) => {
    const r = await io.runner.output(argv[0], argv.slice(1), { check: false, timeoutMs: 60_000 })
      .catch((err) => {
        throw new CliError(`${what}: ${argv.join(" ")}: ${errorMessage(err)}`);
      });
    if (!r.success) {
      throw new CliError(
        `${what}: ${argv.join(" ")} exited ${r.code}: ${r.stderr.trim().split("\n").pop() ?? ""}`,
      );
    }
    return `${what}: ran ${argv.join(" ")}`;
  };
  return {
    reload: () => run(reload, "new certificate"),
    restart: () => run(restart, "new trust bundle"),
  };
}

const identityCommand: CommandSpec = {
  name: "identity",
  summary: "Keep Mosquitto's certificate a current SPIRE X.509 SVID (on a broker host)",
  description:
    `Fetches spiffe://<td>/mqtt-broker from the SPIRE agent at --socket and writes the certificate
chain (--cert), its key (--key, 0600) and the trust bundle (--ca) where mosquitto.conf's certfile,
keyfile and cafile point. When the certificate really changed it runs --reload (Mosquitto reloads
certificate and key on SIGHUP); when the bundle changed, --restart. Runs until stopped, or once
with --once. The broker's registration entry needs -dns names it is reached by (an IP address
too: SPIRE writes it as a DNS SAN).`,
  flags: [
    {
      name: "socket",
      type: "string",
      valueName: "PATH",
      description: "The SPIRE agent's Workload API socket (required)",
    },
    {
      name: "trust-domain",
      type: "string",
      valueName: "TD",
      description: `Trust domain (default ${TRUST_DOMAIN})`,
    },
    {
      name: "spiffe-id",
      type: "string",
      valueName: "ID",
      description: "The broker's SPIFFE ID (default spiffe://<td>/mqtt-broker)",
    },
    { name: "cert", type: "string", valueName: "FILE", description: "certfile (required)" },
    { name: "key", type: "string", valueName: "FILE", description: "keyfile, 0600 (required)" },
    { name: "ca", type: "string", valueName: "FILE", description: "cafile (required)" },
    {
      name: "status",
      type: "string",
      valueName: "FILE",
      description: "Status file (default broker-identity.json next to --cert)",
    },
    {
      name: "reload",
      type: "string",
      valueName: "CMD",
      description: "Run when the certificate changed (default: systemctl reload mosquitto)",
    },
    {
      name: "restart",
      type: "string",
      valueName: "CMD",
      description: "Run when the trust bundle changed (default: systemctl restart mosquitto)",
    },
    { name: "once", type: "boolean", description: "Write the files once, then exit" },
  ],
  async run(args, io) {
    const need = (f: string) => {
      const v = args.string(f);
      if (!v) throw new UsageError(`broker identity: --${f} is required`);
      return resolve(io.cwd, v);
    };
    const socket = need("socket");
    const certFile = need("cert");
    const keyFile = need("key");
    const caFile = need("ca");
    const td = args.string("trust-domain") ?? TRUST_DOMAIN;
    const spiffeId = args.string("spiffe-id") ?? brokerSpiffeId(td);
    try {
      if (parseSpiffeId(spiffeId).trustDomain.name !== td) throw new Error("another trust domain");
    } catch (err) {
      throw new UsageError(
        `broker identity: --spiffe-id: expected a SPIFFE ID in ${td}, got '${spiffeId}' (${
          errorMessage(err)
        })`,
      );
    }
    const control = commandControl(
      io,
      splitCommand("reload", args.string("reload") ?? "systemctl reload mosquitto"),
      splitCommand("restart", args.string("restart") ?? "systemctl restart mosquitto"),
    );
    const log = (line: string) => io.stdout.write(`${new Date().toISOString()} ${line}\n`);
    await followBrokerIdentity({
      socket,
      spiffeId,
      paths: {
        certFile,
        keyFile,
        caBundleFile: caFile,
        statusFile: args.string("status")
          ? resolve(io.cwd, args.string("status")!)
          : join(dirname(certFile), "broker-identity.json"),
        trustDomain: td,
      },
      control,
      log,
      signal: io.signal,
      once: args.bool("once"),
    }).catch((err) => {
      if (io.signal.aborted) return;
      throw err instanceof CliError ? err : new CliError(
        `broker identity: no SVID for ${spiffeId} from ${socket}: ${errorMessage(err)}`,
        1,
        `register the broker: spire-server entry create -parentID <its node> -spiffeID ${spiffeId} -selector unix:uid:<mosquitto's uid> -dns <its names>`,
      );
    });
    return 0;
  },
};

export const brokerCommand: CommandSpec = {
  name: "broker",
  summary: "Broker host tools: the broker's SPIFFE identity",
  subcommands: [identityCommand],
};
