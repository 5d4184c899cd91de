/**
 * `k8s4r operator add|list|remove|login|creds`: operators' credentials and roles.
 *
 * `add`, `remove` and `login` run on the control host: they mint the operator's X.509 SVID
 * (`spiffe://<td>/operator/<name>`) through the SPIRE server's admin socket (`spire-server x509
 * mint -write DIR`: the key is written by SPIRE into a private directory, never on argv, a
 * pipe or a log), and edit the fleet server's roles config, which the server re-reads on
 * change. `list` and `creds` only read.
 */
import { join } from "node:path";
import type { Args, CommandSpec } from "../cli/mod.ts";
import { CliError, errorMessage, UsageError } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import {
  DEFAULT_PORTS,
  DEFAULT_ROLES_FILE,
  DEFAULT_SPIRE_SERVER_SOCKET,
  defaultServerUrl,
  isOperatorName,
  operatorsDir,
  operatorSpiffeId,
  TRUST_DOMAIN,
} from "../fleet/mod.ts";
import type { ProcessRunner } from "../process/mod.ts";
import { findSpireBinaries } from "../spire/binaries.ts";
import { spireAdminCli } from "../spire/server.ts";
import { X509Bundle, X509BundleSet } from "../spiffe/bundle.ts";
import { verifyX509SvidChain } from "../spiffe/verify.ts";
import {
  isRole,
  readRolesFile,
  removeOperatorRole,
  type Role,
  ROLES,
  setOperatorIssuedAfter,
  setOperatorRole,
} from "../server/roles.ts";
import {
  addHint,
  BUNDLE_FILE,
  CERT_FILE,
  certValidity,
  credentialPaths,
  KEY_FILE,
  listCredentialNames,
  loadCredentials,
  type LoadedCredentials,
  META_FILE,
  type OperatorMeta,
  resolveOperatorName,
} from "./credentials.ts";

export const DEFAULT_OPERATOR_TTL_SECONDS = 12 * 3600;
export const MAX_OPERATOR_TTL_SECONDS = 30 * 24 * 3600;

/** `12h`, `30m`, `1h30m`, `90s`, `3600` (seconds). */
export function parseTtl(s: string): number {
  const m = /^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$/.exec(s);
  let secs: number;
  if (/^\d+$/.test(s)) secs = Number(s);
  else if (m && s !== "") {
    secs = Number(m[1] ?? 0) * 3600 + Number(m[2] ?? 0) * 60 + Number(m[3] ?? 0);
  } else throw new UsageError(`--ttl: expected a duration like 12h, 30m or 1h30m, got '${s}'`);
  if (secs < 60 || secs > MAX_OPERATOR_TTL_SECONDS) {
    throw new UsageError(`--ttl: expected between 60s and 720h, got '${s}'`);
  }
  return secs;
}

/** Where the control host's parts are: flags, then env, then production defaults. */
export interface OperatorControl {
  env: Record<string, string | undefined>;
  runner: ProcessRunner;
  /** The spire-server binary (its CLI talks to the admin socket). */
  spireServerBin: string;
  spireSocket: string;
  rolesFile: string;
  trustDomain: string;
  serverUrl: string;
}

let staged = 0;

/** Makes `dir`'s parents private (0700) up to the operators directory. */
async function ensureOperatorsDir(env: Record<string, string | undefined>): Promise<string> {
  const dir = operatorsDir(env);
  await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  await Deno.chmod(dir, 0o700);
  await Deno.chmod(join(dir, ".."), 0o700).catch(() => {});
  return dir;
}

/**
 * Mints the operator's SVID into a private staging directory next to its credential
 * directory, then swaps it in. Returns the metadata written.
 */
async function mintCredentials(
  ctl: OperatorControl,
  name: string,
  role: Role | undefined,
  ttlSeconds: number,
): Promise<OperatorMeta> {
  const base = await ensureOperatorsDir(ctl.env);
  const final = credentialPaths(ctl.env, name);
  const stage = join(base, `.${name}.new-${Deno.pid}-${++staged}`);
  await Deno.mkdir(stage, { mode: 0o700 });
  try {
    await Deno.chmod(stage, 0o700);
    const spiffeId = operatorSpiffeId(ctl.trustDomain, name);
    const cli = await spireAdminCli(ctl.runner, ctl.spireServerBin, ctl.spireSocket);
    const files = await cli.mintX509Files({ spiffeId, dnsNames: [], ttlSeconds, dir: stage });
    // SPIRE writes the certificates 0644: every file of the directory is 0600.
    await Deno.rename(files.certFile, join(stage, CERT_FILE));
    if (files.keyFile !== join(stage, KEY_FILE)) {
      await Deno.rename(files.keyFile, join(stage, KEY_FILE));
    }
    if (files.bundleFile !== join(stage, BUNDLE_FILE)) {
      await Deno.rename(files.bundleFile, join(stage, BUNDLE_FILE));
    }
    for (const f of [CERT_FILE, KEY_FILE, BUNDLE_FILE]) await Deno.chmod(join(stage, f), 0o600);
    const v = certValidity(await Deno.readTextFile(join(stage, CERT_FILE)));
    const meta: OperatorMeta = {
      name,
      spiffeId,
      serverUrl: ctl.serverUrl,
      ...(role ? { role } : {}),
      issuedAt: v.notBefore.toISOString(),
      expiresAt: v.notAfter.toISOString(),
    };
    await Deno.writeTextFile(join(stage, META_FILE), JSON.stringify(meta, null, 2) + "\n", {
      mode: 0o600,
      createNew: true,
    });
    // Swap: the old directory (if any) is moved away first, so a reader never sees a mix.
    const old = join(base, `.${name}.old-${Deno.pid}-${staged}`);
    let moved = false;
    try {
      await Deno.rename(final.dir, old);
      moved = true;
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
    }
    await Deno.rename(stage, final.dir);
    if (moved) await Deno.remove(old, { recursive: true });
    return meta;
  } finally {
    await Deno.remove(stage, { recursive: true }).catch(() => {});
  }
}

export interface AddResult {
  meta: OperatorMeta;
  role: Role;
  dir: string;
}

/** `operator add`: mint credentials, record the role. Refuses to overwrite unless `replace`. */
export async function addOperator(
  ctl: OperatorControl,
  name: string,
  role: Role,
  ttlSeconds = DEFAULT_OPERATOR_TTL_SECONDS,
  opts: { replace?: boolean } = {},
): Promise<AddResult> {
  const paths = credentialPaths(ctl.env, name);
  if (!opts.replace) {
    try {
      await Deno.stat(paths.dir);
      throw new CliError(
        `operator ${name} already has credentials in ${paths.dir}`,
        1,
        `renew them with 'k8s4r operator login ${name}', change the role with --force, or remove it first`,
      );
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
    }
  }
  // The roles file first: a broken one stops everything before any certificate exists.
  await readRolesFile(ctl.rolesFile);
  const meta = await mintCredentials(ctl, name, role, ttlSeconds);
  try {
    // Certificates of `name` issued before this one are refused from now on (revoked).
    await setOperatorRole(ctl.rolesFile, name, role, { issuedAfter: new Date(meta.issuedAt) });
  } catch (err) {
    await Deno.remove(paths.dir, { recursive: true }).catch(() => {});
    throw err;
  }
  return { meta, role, dir: paths.dir };
}

/** `operator login`: renew (or create) the credentials of an operator that has a role. */
export async function loginOperator(
  ctl: OperatorControl,
  name: string,
  opts: { ttlSeconds?: number; force?: boolean; now?: Date } = {},
): Promise<{ renewed: boolean; meta: OperatorMeta; role: Role; why: string }> {
  const roles = await readRolesFile(ctl.rolesFile);
  const role = roles.operators.get(name);
  if (!role) {
    throw new CliError(
      `operator ${name} has no role in ${ctl.rolesFile}`,
      1,
      `add it: k8s4r operator add ${name} --role metrics|viewer|operator`,
    );
  }
  const now = opts.now ?? new Date();
  let why = "no credentials here";
  let ttl = opts.ttlSeconds;
  // What the SPIRE server trusts now: credentials of an older CA (a rotation, a new dev stack)
  // are renewed even when they have not expired.
  const cli = await spireAdminCli(ctl.runner, ctl.spireServerBin, ctl.spireSocket);
  const current = X509Bundle.fromPem(ctl.trustDomain, await cli.bundlePem());
  try {
    const c = await loadCredentials(ctl.env, name, now);
    const stale = staleness(c, current, now);
    const life = c.svid.notAfter.getTime() - c.svid.notBefore.getTime();
    ttl ??= Math.min(
      MAX_OPERATOR_TTL_SECONDS,
      Math.max(60, Math.round(life / 1000) - 10),
    );
    const left = c.svid.notAfter.getTime() - now.getTime();
    if (
      !opts.force && !c.expired && left > life / 3 && c.meta.serverUrl === ctl.serverUrl &&
      !stale
    ) {
      return { renewed: false, meta: c.meta, role, why: `valid until ${c.meta.expiresAt}` };
    }
    why = c.expired
      ? `expired at ${c.svid.notAfter.toISOString()}`
      : opts.force
      ? "renewal forced"
      : stale
      ? stale
      : left <= life / 3
      ? `less than a third of its lifetime left (until ${c.svid.notAfter.toISOString()})`
      : `server URL changed to ${ctl.serverUrl}`;
  } catch (err) {
    if (!(err instanceof CliError)) throw err;
    why = errorMessage(err);
    try {
      await Deno.stat(credentialPaths(ctl.env, name).dir);
    } catch {
      why = "there were none";
    }
  }
  const meta = await mintCredentials(ctl, name, role, ttl ?? DEFAULT_OPERATOR_TTL_SECONDS);
  // The older certificates of `name` stop working (a leaked one too): only this one and later.
  await setOperatorIssuedAfter(ctl.rolesFile, name, new Date(meta.issuedAt));
  return { renewed: true, meta, role, why };
}

/** Why credentials no longer match the SPIRE server's bundle, or undefined when they do. */
function staleness(c: LoadedCredentials, current: X509Bundle, now: Date): string | undefined {
  try {
    verifyX509SvidChain(c.svid.certificates, new X509BundleSet([current]), now);
  } catch (err) {
    if (c.expired) return undefined; // said as "expired"
    return `not issued under the SPIRE server's current bundle (${errorMessage(err)})`;
  }
  const key = (b: X509Bundle) => b.authorities.map((a) => a.fingerprint256).sort().join(",");
  const mine = c.bundles.getX509BundleForTrustDomain(current.trustDomain);
  if (!mine || key(mine) !== key(current)) return "the trust bundle changed";
  return undefined;
}

/** `operator remove`: delete the credentials here and the role on the server. */
export async function removeOperator(
  ctl: Pick<OperatorControl, "env" | "rolesFile">,
  name: string,
): Promise<{ credentials: boolean; role: boolean }> {
  const paths = credentialPaths(ctl.env, name);
  let credentials = false;
  try {
    await Deno.remove(paths.dir, { recursive: true });
    credentials = true;
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
  const role = await removeOperatorRole(ctl.rolesFile, name);
  return { credentials, role };
}

/**
 * What `devenv start` needs: `name` exists with `role` and valid credentials (added, renewed
 * or left alone). Returns what was done.
 */
export async function ensureOperator(
  ctl: OperatorControl,
  name: string,
  role: Role,
  ttlSeconds = DEFAULT_OPERATOR_TTL_SECONDS,
): Promise<string> {
  const roles = await readRolesFile(ctl.rolesFile);
  if (roles.operators.get(name) !== role) await setOperatorRole(ctl.rolesFile, name, role);
  const r = await loginOperator(ctl, name, { ttlSeconds });
  return r.renewed
    ? `operator ${name} (${role}): credentials written, valid until ${r.meta.expiresAt} (${r.why})`
    : `operator ${name} (${role}): credentials ${r.why}`;
}

// ---------------------------------------------------------------- the commands

const CONTROL_FLAGS = [
  {
    name: "roles",
    type: "string" as const,
    valueName: "FILE",
    description:
      `The fleet server's roles config (default ${DEFAULT_ROLES_FILE}, env K8S4R_ROLES_FILE)`,
  },
  {
    name: "spire-socket",
    type: "string" as const,
    valueName: "PATH",
    description:
      `The SPIRE server's admin socket (default ${DEFAULT_SPIRE_SERVER_SOCKET}, env K8S4R_SPIRE_SERVER_SOCKET)`,
  },
  {
    name: "server-url",
    type: "string" as const,
    valueName: "URL",
    description: `Recorded with the credentials (default ${
      defaultServerUrl(DEFAULT_PORTS.http)
    }, env K8S4R_SERVER_URL)`,
  },
  {
    name: "trust-domain",
    type: "string" as const,
    valueName: "TD",
    description: `SPIFFE trust domain (default ${TRUST_DOMAIN}, env K8S4R_TRUST_DOMAIN)`,
  },
];

function rolesFileOf(args: Args, io: Io): string {
  return args.string("roles") ?? io.env["K8S4R_ROLES_FILE"] ?? DEFAULT_ROLES_FILE;
}

async function control(args: Args, io: Io): Promise<OperatorControl> {
  const serverUrl = (args.string("server-url") ?? io.env["K8S4R_SERVER_URL"] ??
    defaultServerUrl(DEFAULT_PORTS.http)).replace(/\/+$/, "");
  let u: URL | undefined;
  try {
    u = new URL(serverUrl);
  } catch { /* below */ }
  if (u?.protocol !== "https:") {
    throw new UsageError(`--server-url: expected https://HOST:PORT, got '${serverUrl}'`);
  }
  const bins = await findSpireBinaries(io);
  if (!bins) {
    throw new CliError(
      "spire-server not found (K8S4R_SPIRE_BIN_DIR, ~/.cache/k8s4r/spire/1.13.3/bin, PATH)",
      1,
      "operators are added on the control host, where the SPIRE server runs; 'k8s4r devenv install' provisions SPIRE",
    );
  }
  return {
    env: io.env,
    runner: io.runner,
    spireServerBin: bins.server,
    spireSocket: args.string("spire-socket") ?? io.env["K8S4R_SPIRE_SERVER_SOCKET"] ??
      DEFAULT_SPIRE_SERVER_SOCKET,
    rolesFile: rolesFileOf(args, io),
    trustDomain: args.string("trust-domain") ?? io.env["K8S4R_TRUST_DOMAIN"] ?? TRUST_DOMAIN,
    serverUrl,
  };
}

function nameArg(args: Args, cmd: string): string {
  const name = args.positionals[0];
  if (!isOperatorName(name)) {
    throw new UsageError(
      `operator ${cmd}: invalid operator name '${
        name ?? ""
      }' (expected [a-z0-9][a-z0-9._-]{0,62}, e.g. alice)`,
    );
  }
  return name;
}

function roleArg(args: Args): Role {
  const r = args.string("role");
  if (!isRole(r)) {
    throw new UsageError(
      `operator add: --role expects one of ${ROLES.join(", ")}, got '${r ?? ""}'`,
    );
  }
  return r;
}

const addCommand: CommandSpec = {
  name: "add",
  summary: "Create an operator: mint its SVID, record its role (control host)",
  description: `Mints spiffe://<td>/operator/NAME through the SPIRE server's admin socket (the key
never passes through argv or a log), writes cert.pem, key.pem, bundle.pem and operator.json
(0600) to \${XDG_CONFIG_HOME:-~/.config}/k8s4r/operators/NAME/, and records the role in the
fleet server's roles config, which the server re-reads on change.

Roles: metrics (only /metrics: for a Prometheus), viewer (read robots and tasks), operator (also
create and cancel tasks).

Example: k8s4r operator add alice --role viewer --ttl 8h`,
  positionals: [{ name: "name", description: "Operator name, e.g. alice" }],
  flags: [
    { name: "role", type: "string", valueName: "ROLE", description: "metrics, viewer or operator" },
    {
      name: "ttl",
      type: "string",
      valueName: "DUR",
      description: "Certificate lifetime, e.g. 12h (default), 30m; renew with 'operator login'",
    },
    { name: "force", type: "boolean", description: "Replace existing credentials and role" },
    ...CONTROL_FLAGS,
  ],
  async run(args, io) {
    const name = nameArg(args, "add");
    const role = roleArg(args);
    const ttl = args.string("ttl") !== undefined
      ? parseTtl(args.string("ttl")!)
      : DEFAULT_OPERATOR_TTL_SECONDS;
    const ctl = await control(args, io);
    const r = await addOperator(ctl, name, role, ttl, { replace: args.bool("force") });
    io.stdout.write(
      `operator ${name} (${r.meta.spiffeId}) added as ${role}\n` +
        `  credentials: ${r.dir} (valid until ${r.meta.expiresAt})\n` +
        `  role recorded in ${ctl.rolesFile}\n` +
        `  server: ${r.meta.serverUrl}\n`,
    );
    return 0;
  },
};

const loginCommand: CommandSpec = {
  name: "login",
  summary: "Renew an operator's credentials (expired, or a third of their lifetime left)",
  positionals: [{
    name: "name",
    description: "Operator name (default: as for other commands)",
    optional: true,
  }],
  flags: [
    {
      name: "ttl",
      type: "string",
      valueName: "DUR",
      description: "New lifetime (default: as before)",
    },
    {
      name: "force",
      type: "boolean",
      description:
        "Renew even if still valid (older certificates of the operator are refused from then on)",
    },
    ...CONTROL_FLAGS,
  ],
  async run(args, io) {
    const name = args.positionals[0] !== undefined
      ? nameArg(args, "login")
      : await resolveOperatorName(io.env);
    const ctl = await control(args, io);
    const r = await loginOperator(ctl, name, {
      ttlSeconds: args.string("ttl") !== undefined ? parseTtl(args.string("ttl")!) : undefined,
      force: args.bool("force"),
    });
    io.stdout.write(
      r.renewed
        ? `operator ${name} (${r.role}): renewed (${r.why}), valid until ${r.meta.expiresAt}\n`
        : `operator ${name} (${r.role}): nothing to do, ${r.why}\n`,
    );
    return 0;
  },
};

const removeCommand: CommandSpec = {
  name: "remove",
  summary: "Delete an operator's credentials and its role (its next request is refused)",
  positionals: [{ name: "name", description: "Operator name" }],
  flags: [CONTROL_FLAGS[0]],
  async run(args, io) {
    const name = nameArg(args, "remove");
    const rolesFile = rolesFileOf(args, io);
    const r = await removeOperator({ env: io.env, rolesFile }, name);
    if (!r.credentials && !r.role) {
      throw new CliError(
        `no operator ${name}: no credentials in ${
          credentialPaths(io.env, name).dir
        }, no role in ${rolesFile}`,
      );
    }
    io.stdout.write(
      `operator ${name} removed: ${
        [r.credentials ? "credentials deleted" : "", r.role ? `role removed from ${rolesFile}` : ""]
          .filter(Boolean).join(", ")
      }\n`,
    );
    io.stdout.write(
      "  a copy of its certificate is refused from now on (403: no role); it expires by itself\n",
    );
    return 0;
  },
};

const listCommand: CommandSpec = {
  name: "list",
  summary: "Operators with credentials here or a role in the roles config",
  flags: [{ name: "json", type: "boolean", description: "Print JSON" }, CONTROL_FLAGS[0]],
  async run(args, io) {
    const rolesFile = rolesFileOf(args, io);
    let roles: Map<string, Role> | undefined;
    let rolesError: string | undefined;
    try {
      roles = (await readRolesFile(rolesFile)).operators;
    } catch (err) {
      rolesError = errorMessage(err);
    }
    const names = new Set([...await listCredentialNames(io.env), ...(roles?.keys() ?? [])]);
    const rows = [];
    for (const name of [...names].sort()) {
      let creds: { expiresAt: string; expired: boolean; serverUrl: string; dir: string } | null =
        null;
      let problem: string | undefined;
      try {
        const c = await loadCredentials(io.env, name);
        creds = {
          expiresAt: c.meta.expiresAt,
          expired: c.expired,
          serverUrl: c.meta.serverUrl,
          dir: c.paths.dir,
        };
      } catch (err) {
        if ((await listCredentialNames(io.env)).includes(name)) problem = errorMessage(err);
      }
      rows.push({ name, role: roles?.get(name) ?? null, credentials: creds, problem });
    }
    if (args.bool("json")) {
      io.stdout.write(
        JSON.stringify(
          { rolesFile, rolesError: rolesError ?? null, operators: rows },
          null,
          2,
        ) + "\n",
      );
      return 0;
    }
    if (rolesError) io.stderr.write(`k8s4r: roles unknown: ${rolesError}\n`);
    if (rows.length === 0) {
      io.stdout.write(`no operators (${operatorsDir(io.env)}, ${rolesFile})\n  ${addHint()}\n`);
      return 0;
    }
    const table = [["NAME", "ROLE", "CREDENTIALS", "SERVER"]];
    for (const r of rows) {
      table.push([
        r.name,
        r.role ?? (roles ? "none (refused)" : "?"),
        r.credentials
          ? `${r.credentials.expired ? "EXPIRED " : "until "}${r.credentials.expiresAt}`
          : r.problem
          ? `unusable: ${r.problem}`
          : "not on this machine",
        r.credentials?.serverUrl ?? "-",
      ]);
    }
    const w = table[0].map((_, i) => Math.max(...table.map((r) => r[i].length)));
    io.stdout.write(
      table.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(w[i]))).join("  "))
        .join("\n") + "\n",
    );
    return 0;
  },
};

const credsCommand: CommandSpec = {
  name: "creds",
  summary: "Paths of an operator's certificate, key and bundle, and the server URL",
  description: `With --json: {"cert": PATH, "key": PATH, "bundle": PATH, "serverUrl": URL}, e.g.

  eval "$(k8s4r operator creds --json | jq -r '"curl --cert \\(.cert) --key \\(.key) --cacert \\(.bundle) \\(.serverUrl)/api/robots"')"`,
  positionals: [{
    name: "name",
    description: "Operator name (default: admin, or the only one)",
    optional: true,
  }],
  flags: [{ name: "json", type: "boolean", description: "Print JSON" }],
  async run(args, io) {
    const name = args.positionals[0] !== undefined
      ? nameArg(args, "creds")
      : await resolveOperatorName(io.env);
    const c = await loadCredentials(io.env, name);
    if (c.expired) {
      io.stderr.write(
        `k8s4r: operator ${name}'s certificate expired at ${c.meta.expiresAt}: run 'k8s4r operator login ${name}'\n`,
      );
    }
    const out = {
      cert: c.paths.cert,
      key: c.paths.key,
      bundle: c.paths.bundle,
      serverUrl: c.meta.serverUrl,
    };
    if (args.bool("json")) {
      io.stdout.write(JSON.stringify(out, null, 2) + "\n");
    } else {
      io.stdout.write(
        `operator ${name} (${c.meta.spiffeId}), valid until ${c.meta.expiresAt}\n` +
          `  cert:   ${out.cert}\n  key:    ${out.key}\n  bundle: ${out.bundle}\n` +
          `  server: ${out.serverUrl}\n`,
      );
    }
    return 0;
  },
};

export const operatorCommand: CommandSpec = {
  name: "operator",
  summary: "Operators of the fleet server: credentials (X.509 SVIDs) and roles",
  subcommands: [addCommand, listCommand, removeCommand, loginCommand, credsCommand],
};
