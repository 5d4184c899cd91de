/** `k8s4r ca init|issue|show`: the fleet's root CA and SPIRE's upstream CA (see mod.ts). */
import { resolve } from "node:path";
import type { Args, CommandSpec, FlagSpec } from "../cli/mod.ts";
import { UsageError } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import { TRUST_DOMAIN } from "../fleet/mod.ts";
import {
  caFiles,
  DEFAULT_CA_DIR,
  DEFAULT_ROOT_DAYS,
  DEFAULT_UPSTREAM_DAYS,
  initCa,
  issueUpstream,
  readCa,
} from "./mod.ts";

const DIR_FLAG: FlagSpec = {
  name: "dir",
  type: "string",
  valueName: "DIR",
  description: `The CA directory (default ${DEFAULT_CA_DIR}, where devenv looks)`,
};
const TD_FLAG: FlagSpec = {
  name: "trust-domain",
  type: "string",
  valueName: "TD",
  description: `Trust domain (env K8S4R_TRUST_DOMAIN, default ${TRUST_DOMAIN})`,
};
const UPSTREAM_DAYS: FlagSpec = {
  name: "upstream-days",
  type: "number",
  valueName: "N",
  description: `Lifetime of the upstream CA SPIRE signs with (default ${DEFAULT_UPSTREAM_DAYS})`,
};

function days(args: Args, flag: string): number | undefined {
  if (!args.has(flag)) return undefined;
  const n = args.number(flag)!;
  if (!Number.isInteger(n) || n < 1) {
    throw new UsageError(`ca: --${flag} expects whole days >= 1, got ${n}`);
  }
  return n;
}

function dirOf(args: Args, io: Io): string {
  return resolve(io.cwd, args.string("dir") ?? DEFAULT_CA_DIR);
}

function trustDomain(args: Args, io: Io): string {
  const td = args.string("trust-domain") ?? io.env["K8S4R_TRUST_DOMAIN"] ?? TRUST_DOMAIN;
  if (!/^[a-z0-9._-]+$/.test(td)) {
    throw new UsageError(`ca: --trust-domain: expected a trust domain name, got '${td}'`);
  }
  return td;
}

function line(label: string, c: { subject: string; validTo: string; fingerprint256: string }) {
  return `${label}: ${
    c.subject.replaceAll("\n", ", ")
  }\n  valid until ${c.validTo}\n  SHA-256 ${c.fingerprint256}\n`;
}

export const caCommand: CommandSpec = {
  name: "ca",
  summary: "The fleet's root CA: a trust bundle that SPIRE's CA rotations do not change",
  description:
    "`ca init` creates a root CA and an upstream CA signed by it. SPIRE runs its `disk`\n" +
    "UpstreamAuthority with the upstream CA, so the trust bundle robots and Mosquitto trust is\n" +
    "the root alone. Keep the root key offline: it is needed again only by `ca issue`, which\n" +
    "renews the upstream CA (SPIRE picks it up at its next CA rotation, the bundle stays).",
  subcommands: [
    {
      name: "init",
      summary: "Create the root CA (key 0600, to be moved offline) and the upstream CA",
      flags: [
        DIR_FLAG,
        TD_FLAG,
        {
          name: "root-days",
          type: "number",
          valueName: "N",
          description: `Lifetime of the root CA (default ${DEFAULT_ROOT_DAYS})`,
        },
        UPSTREAM_DAYS,
      ],
      async run(args, io) {
        const dir = dirOf(args, io);
        const { root, upstream } = await initCa(dir, {
          trustDomain: trustDomain(args, io),
          rootDays: days(args, "root-days"),
          upstreamDays: days(args, "upstream-days"),
        });
        const f = caFiles(dir);
        io.stdout.write(
          line("root CA", root) + line("upstream CA (SPIRE signs its CA with it)", upstream) +
            `\nfiles: ${f.rootCert}, ${f.rootKey} (0600), ${f.upstreamCert}, ${f.upstreamKey} (0600)\n` +
            `\nThe root key is needed only to renew the upstream CA. Move it offline now, e.g.\n` +
            `  mv ${f.rootKey} /media/offline/k8s4r-root.key\n` +
            `and bring it back for 'k8s4r ca issue --root-key FILE' before ${upstream.validTo}.\n`,
        );
        return 0;
      },
    },
    {
      name: "issue",
      summary: "Renew the upstream CA with the root key (SPIRE takes it at its next rotation)",
      flags: [
        DIR_FLAG,
        TD_FLAG,
        {
          name: "root-key",
          type: "string",
          valueName: "FILE",
          description: "The root key's offline copy (default DIR/root.key)",
        },
        UPSTREAM_DAYS,
      ],
      async run(args, io) {
        const dir = dirOf(args, io);
        const rk = args.string("root-key");
        const up = await issueUpstream(dir, {
          trustDomain: trustDomain(args, io),
          rootKeyFile: rk !== undefined ? resolve(io.cwd, rk) : undefined,
          upstreamDays: days(args, "upstream-days"),
        });
        io.stdout.write(line("new upstream CA", up));
        return 0;
      },
    },
    {
      name: "show",
      summary: "Show the CA directory and what is wrong with it (exit 1 when unusable)",
      flags: [DIR_FLAG, { name: "json", type: "boolean", description: "Print JSON" }],
      async run(args, io) {
        const st = await readCa(dirOf(args, io));
        const c = (x?: { subject: string; validTo: string; fingerprint256: string }) =>
          x ? { subject: x.subject, validTo: x.validTo, sha256: x.fingerprint256 } : null;
        if (args.bool("json")) {
          io.stdout.write(
            JSON.stringify(
              {
                dir: st.files.dir,
                root: c(st.root),
                upstream: c(st.upstream),
                rootKeyOnline: st.rootKeyOnline,
                problems: st.problems,
              },
              null,
              2,
            ) + "\n",
          );
        } else {
          if (st.root) io.stdout.write(line("root CA", st.root));
          if (st.upstream) io.stdout.write(line("upstream CA", st.upstream));
          if (st.rootKeyOnline) {
            io.stdout.write(
              `note: the root key is on this host (${st.files.rootKey}); keep it offline\n`,
            );
          }
          for (const p of st.problems) io.stdout.write(`problem: ${p}\n`);
        }
        return st.problems.length ? 1 : 0;
      },
    },
  ],
};
