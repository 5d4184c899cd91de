/**
 * Running `spire-server` and driving it through its CLI over the admin socket.
 *
 * `config/spire/server.conf` is the guide's configuration, with paths relative to the project
 * directory (the server runs with cwd = project root). `startSpireServer` uses the CLI override
 * flags SPIRE v1.13.3 has (`-bindAddress -serverPort -socketPath -dataDir -trustDomain
 * -logLevel`); values without a flag (datastore and key paths under another data dir, SVID and
 * CA TTLs) are handled by rendering a complete config with `renderServerConfig` instead.
 */
import { renderSpireTelemetry, type SpireTelemetry } from "./telemetry.ts";
import { redactJoinTokens } from "./redact.ts";
import { isAbsolute, join, resolve } from "node:path";
import { CliError } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import type { Daemon, ProcessRunner } from "../process/mod.ts";
import { grpcHealthCheck } from "./health.ts";
import { attrString, block, type HclBody, HclError, parseHcl } from "./hcl.ts";
import { secureSocketDir, SocketDirError } from "./socket_dir.ts";

export interface ServerConfigValues {
  trustDomain: string;
  bindAddress: string;
  port: number;
  /** Relative paths resolve against the server's cwd. */
  dataDir: string;
  socketPath: string;
  logLevel: "DEBUG" | "INFO" | "WARN" | "ERROR";
  /** Go duration, e.g. "1h". */
  defaultX509SvidTtl: string;
  /** Go duration, e.g. "24h". */
  caTtl: string;
  /**
   * `server.experimental.cache_reload_interval` (Go duration): how often the server reloads its
   * in-memory entry cache, which is what agents' syncs are answered from. Unset = SPIRE's default
   * (5 s), which production keeps; the dev stack sets it lower (see README, "Run the stack").
   */
  cacheReloadInterval?: string;
  /**
   * `server.experimental.events_based_cache`: the entry cache follows the datastore's change
   * events every `cache_reload_interval` instead of reloading every entry, so a short interval
   * stays cheap with many entries. Unset = SPIRE's default (full reloads).
   */
  eventsBasedCache?: boolean;
  /**
   * `server.ratelimit.attestation`. SPIRE's default (true) admits one node attestation per
   * second per client IP: right for a fleet, where every agent has its own address, but on one
   * host every agent shares 127.0.0.1, so N agents attesting at once take N seconds. Unset =
   * SPIRE's default.
   */
  attestationRateLimit?: boolean;
  /** The sql DataStore. Unset = sqlite3 in `<dataDir>/datastore.sqlite3` (the guide's). */
  datastore?: ServerDatastore;
  /**
   * `UpstreamAuthority "disk"`: SPIRE's CA is signed by this CA (`k8s4r ca init`), and the
   * trust bundle carries `bundleFile` (the root) instead of SPIRE's own rotating CA.
   */
  upstreamAuthority?: DiskUpstreamAuthority;
  /** `agent_ttl` (Go duration): the agents' SVID lifetime. Unset = SPIRE's (the SVID TTL). */
  agentTtl?: string;
  /**
   * The `health_checks` HTTP listener (`/live`, `/ready`): its `/ready` body says WHY the
   * server is not ready (e.g. the datastore's error), which the gRPC health check does not.
   */
  healthChecks?: { bindAddress: string; port: number };
  /**
   * Also run the `x509pop` NodeAttestor, trusting the factory CA(s) in this PEM file: a node
   * proves possession of the key of a certificate they issued (`k8s4r robot add --attestation
   * x509pop`). Unset = join tokens only.
   */
  x509popCaBundlePath?: string;
}

/**
 * SPIRE's sql DataStore. `postgres` uses SPIRE's pure-Go driver (no cgo needed). Its
 * `connectionString` holds the password: it only ever goes into a 0600 config file (never argv,
 * env or a log; `startSpireServer` also redacts it from SPIRE's output).
 */
export type ServerDatastore =
  | { type: "sqlite3"; path?: string }
  | { type: "postgres"; connectionString: string };

export interface DiskUpstreamAuthority {
  /** The CA SPIRE's own CA is signed by (PEM; an intermediate of the root, or the root). */
  certFile: string;
  /** Its key (PEM, 0600). */
  keyFile: string;
  /** The root(s) the bundle carries; required when `certFile` is not self-signed. */
  bundleFile?: string;
}

/** The guide's values; `config/spire/server.conf` is exactly `renderServerConfig()` of these. */
export const DEFAULT_SERVER_CONFIG: ServerConfigValues = {
  trustDomain: "k8s4r.example.org",
  bindAddress: "127.0.0.1",
  port: 8081,
  dataDir: "./.spire-data/server",
  socketPath: "./.spire-data/server/api.sock",
  logLevel: "INFO",
  defaultX509SvidTtl: "1h",
  caTtl: "24h",
};

function hclString(s: string): string {
  return JSON.stringify(s); // HCL strings accept JSON escapes
}

function joinDataPath(dataDir: string, file: string): string {
  return dataDir.endsWith("/") ? dataDir + file : `${dataDir}/${file}`;
}

/** The server config as HCL: join_token attestation, sqlite datastore, disk key manager. */
export function renderServerConfig(values: Partial<ServerConfigValues> = {}): string {
  const defined = Object.fromEntries(Object.entries(values).filter(([, x]) => x !== undefined));
  const v: ServerConfigValues = { ...DEFAULT_SERVER_CONFIG, ...defined };
  return `# SPIRE server configuration for k8s4r (SPIRE v1.13.3).
# Paths are relative to the directory spire-server runs in (the project root).
server {
  bind_address = ${hclString(v.bindAddress)}
  bind_port = "${v.port}"
  socket_path = ${hclString(v.socketPath)}
  trust_domain = ${hclString(v.trustDomain)}
  data_dir = ${hclString(v.dataDir)}
  log_level = ${hclString(v.logLevel)}
  default_x509_svid_ttl = ${hclString(v.defaultX509SvidTtl)}
  ca_ttl = ${hclString(v.caTtl)}${
    v.agentTtl !== undefined ? `\n  agent_ttl = ${hclString(v.agentTtl)}` : ""
  }${
    v.attestationRateLimit !== undefined
      ? `

  ratelimit {
    attestation = ${v.attestationRateLimit}
  }`
      : ""
  }${
    v.cacheReloadInterval !== undefined || v.eventsBasedCache !== undefined
      ? `

  experimental {${
        v.cacheReloadInterval !== undefined
          ? `
    cache_reload_interval = ${hclString(v.cacheReloadInterval)}`
          : ""
      }${
        v.eventsBasedCache !== undefined
          ? `
    events_based_cache = ${v.eventsBasedCache}`
          : ""
      }
  }`
      : ""
  }
}

plugins {
  DataStore "sql" {
    plugin_data {
${renderDatastore(v)}
    }
  }

  NodeAttestor "join_token" {
    plugin_data {}
  }
${
    v.x509popCaBundlePath !== undefined
      ? `
  NodeAttestor "x509pop" {
    plugin_data {
      ca_bundle_path = ${hclString(v.x509popCaBundlePath)}
    }
  }
`
      : ""
  }
  KeyManager "disk" {
    plugin_data {
      keys_path = ${hclString(joinDataPath(v.dataDir, "keys.json"))}
    }
  }${renderUpstreamAuthority(v.upstreamAuthority)}
}
${renderHealthChecks(v.healthChecks)}`;
}

function renderDatastore(v: ServerConfigValues): string {
  const ds = v.datastore ?? { type: "sqlite3" };
  const conn = ds.type === "postgres"
    ? ds.connectionString
    : ds.path ?? joinDataPath(v.dataDir, "datastore.sqlite3");
  return `      database_type = ${hclString(ds.type)}
      connection_string = ${hclString(conn)}`;
}

function renderUpstreamAuthority(u: DiskUpstreamAuthority | undefined): string {
  if (!u) return "";
  return `

  UpstreamAuthority "disk" {
    plugin_data {
      cert_file_path = ${hclString(u.certFile)}
      key_file_path = ${hclString(u.keyFile)}${
    u.bundleFile !== undefined ? `\n      bundle_file_path = ${hclString(u.bundleFile)}` : ""
  }
    }
  }`;
}

function renderHealthChecks(h: ServerConfigValues["healthChecks"]): string {
  if (!h) return "";
  return `
health_checks {
  listener_enabled = true
  bind_address = ${hclString(h.bindAddress)}
  bind_port = "${h.port}"
  live_path = "/live"
  ready_path = "/ready"
}
`;
}

/**
 * One setting of the `server { }` block of a SPIRE server config (strings, numbers and booleans
 * as text), read with the HCL parser. Throws an HclError (`line N: ...`) on a malformed config.
 */
export function readConfigValue(text: string, path: string): string | undefined {
  // `experimental.cache_reload_interval`: nested blocks of the server block, then the key.
  const keys = path.split(".");
  let body: HclBody | undefined = block(parseHcl(text), "server");
  for (const k of keys.slice(0, -1)) body = body ? block(body, k) : undefined;
  return body ? attrString(body, keys[keys.length - 1])?.value : undefined;
}

/** Reads one `key = true|false` setting of the server block (a dotted path, as above). */
export function readConfigBool(text: string, path: string): boolean | undefined {
  const v = readConfigValue(text, path);
  return v === "true" ? true : v === "false" ? false : undefined;
}

export interface StartServerOptions {
  bin: string;
  configFile: string;
  /** The server's working directory; relative config paths resolve against it. */
  cwd: string;
  dataDir?: string;
  socketPath?: string;
  bindAddress?: string;
  port?: number;
  trustDomain?: string;
  logLevel?: ServerConfigValues["logLevel"];
  defaultX509SvidTtl?: string;
  caTtl?: string;
  /** `experimental.cache_reload_interval`; undefined = the config file's, else SPIRE's default. */
  cacheReloadInterval?: string;
  /** `ratelimit.attestation`; undefined = the config file's, else SPIRE's default (true). */
  attestationRateLimit?: boolean;
  /** `experimental.events_based_cache`; undefined = the config file's, else SPIRE's (false). */
  eventsBasedCache?: boolean;
  /** Serve SPIRE's Prometheus telemetry on this loopback address (`renderSpireTelemetry`). */
  telemetry?: SpireTelemetry;
  /** The sql DataStore; undefined = sqlite3 under the data dir. */
  datastore?: ServerDatastore;
  /** `UpstreamAuthority "disk"`; undefined = SPIRE's own self-signed CA. */
  upstreamAuthority?: DiskUpstreamAuthority;
  /** `agent_ttl`; undefined = the config file's, else SPIRE's. */
  agentTtl?: string;
  /** The `health_checks` listener; undefined = none. */
  healthChecks?: { bindAddress: string; port: number };
  /**
   * Secret values (the datastore password) that must never reach the log: redacted from
   * SPIRE's output (non-detached servers only, like join tokens).
   */
  secrets?: string[];
  /** Adds the x509pop NodeAttestor with this factory CA bundle (see ServerConfigValues). */
  x509popCaBundle?: string;
  logFile: string;
  pidFile?: string;
  detached?: boolean;
  readyTimeoutMs?: number;
}

export interface SpireServerDaemon extends Daemon {
  /** Absolute path of the admin socket. */
  readonly socketPath: string;
  /** The config file the server actually runs with. */
  readonly configFile: string;
}

/** The argv and the config file `startSpireServer` would use. Pure; exported for tests. */
export async function planSpireServer(
  opts: StartServerOptions,
): Promise<{ args: string[]; configFile: string; socketPath: string; rendered?: string }> {
  const cfgPath = isAbsolute(opts.configFile) ? opts.configFile : join(opts.cwd, opts.configFile);
  let text: string;
  try {
    text = await Deno.readTextFile(cfgPath);
  } catch (err) {
    throw new CliError(
      `${cfgPath}: cannot read the SPIRE server config (${(err as Error).message})`,
      2,
    );
  }
  try {
    parseHcl(text);
  } catch (err) {
    if (!(err instanceof HclError)) throw err;
    throw new CliError(`${cfgPath}:${err.line}: ${err.message.replace(/^line \d+: /, "")}`, 2);
  }
  const socketRel = opts.socketPath ?? readConfigValue(text, "socket_path");
  if (!socketRel) {
    throw new CliError(`${cfgPath}: server.socket_path: expected the admin socket path`, 2);
  }
  const socketPath = resolve(opts.cwd, socketRel);
  let configFile = cfgPath;
  let rendered: string | undefined;
  // These have no CLI flag in v1.13.3 (or, for dataDir, the datastore and key paths follow it):
  // run from a rendered config that holds every value.
  if (
    opts.dataDir || opts.defaultX509SvidTtl || opts.caTtl || opts.cacheReloadInterval ||
    opts.attestationRateLimit !== undefined || opts.eventsBasedCache !== undefined ||
    opts.datastore || opts.upstreamAuthority || opts.agentTtl || opts.healthChecks ||
    opts.x509popCaBundle !== undefined || opts.telemetry !== undefined
  ) {
    const dataDir = resolve(opts.cwd, opts.dataDir ?? readConfigValue(text, "data_dir") ?? ".");
    const port = readConfigValue(text, "bind_port");
    rendered = renderServerConfig({
      trustDomain: opts.trustDomain ?? readConfigValue(text, "trust_domain"),
      bindAddress: opts.bindAddress ?? readConfigValue(text, "bind_address"),
      port: opts.port ?? (port ? Number(port) : undefined),
      dataDir,
      socketPath,
      logLevel: opts.logLevel ??
        (readConfigValue(text, "log_level")?.toUpperCase() as ServerConfigValues["logLevel"]),
      defaultX509SvidTtl: opts.defaultX509SvidTtl ??
        readConfigValue(text, "default_x509_svid_ttl"),
      caTtl: opts.caTtl ?? readConfigValue(text, "ca_ttl"),
      cacheReloadInterval: opts.cacheReloadInterval ??
        readConfigValue(text, "experimental.cache_reload_interval"),
      attestationRateLimit: opts.attestationRateLimit ??
        readConfigBool(text, "ratelimit.attestation"),
      eventsBasedCache: opts.eventsBasedCache ??
        readConfigBool(text, "experimental.events_based_cache"),
      datastore: opts.datastore,
      upstreamAuthority: opts.upstreamAuthority,
      agentTtl: opts.agentTtl ?? readConfigValue(text, "agent_ttl"),
      healthChecks: opts.healthChecks,
      x509popCaBundlePath: opts.x509popCaBundle,
    } as Partial<ServerConfigValues>); // undefined values fall back to the defaults
    if (opts.telemetry) rendered += renderSpireTelemetry(opts.telemetry);
    configFile = join(dataDir, "server.generated.conf");
  }
  const args = ["run", "-config", configFile];
  if (opts.bindAddress) args.push("-bindAddress", opts.bindAddress);
  if (opts.port !== undefined) args.push("-serverPort", String(opts.port));
  args.push("-socketPath", socketPath);
  if (opts.trustDomain) args.push("-trustDomain", opts.trustDomain);
  if (opts.logLevel) args.push("-logLevel", opts.logLevel);
  return { args, configFile, socketPath, rendered };
}

/** Starts spire-server; resolves once its admin socket's health check says SERVING. */
export async function startSpireServer(
  io: Io,
  opts: StartServerOptions,
): Promise<SpireServerDaemon> {
  const plan = await planSpireServer(opts);
  if (plan.rendered !== undefined) {
    const dir = plan.configFile.slice(0, plan.configFile.lastIndexOf("/"));
    await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
    // 0600 even when the file exists already (writeTextFile's mode applies only on create): it
    // may hold the datastore password. Written to a temp file, then renamed into place.
    const tmp = `${plan.configFile}.tmp-${Deno.pid}`;
    await Deno.writeTextFile(tmp, plan.rendered, { mode: 0o600 });
    await Deno.chmod(tmp, 0o600);
    await Deno.rename(tmp, plan.configFile);
  }
  // The admin socket grants full control of the server: keep its directory private. mkdir is a
  // no-op on a directory that exists: one someone else made (a squatted /tmp/spire-server) is
  // refused by the check, not used.
  const socketDir = plan.socketPath.slice(0, plan.socketPath.lastIndexOf("/"));
  await Deno.mkdir(socketDir, { recursive: true, mode: 0o700 });
  await secureSocketDir(plan.socketPath, { create: false, what: ADMIN_SOCKET });
  const daemon = await io.runner.spawn({
    name: "spire-server",
    cmd: opts.bin,
    args: plan.args,
    cwd: opts.cwd,
    logFile: opts.logFile,
    pidFile: opts.pidFile,
    detached: opts.detached,
    // spire-server logs every join-token agent's ID, which embeds the token. Its output can only
    // be redacted while it flows through us, so a detached server logs unredacted: run it under
    // a long-lived k8s4r process (as devenv does) to keep tokens out of its log.
    logFilter: opts.detached ? undefined : (line) => redactJoinTokens(line, opts.secrets),
    ready: async () => (await grpcHealthCheck(plan.socketPath, 1000)) === "SERVING",
    readyTimeoutMs: opts.readyTimeoutMs ?? 30_000,
    readyIntervalMs: 100,
  });
  return Object.assign(daemon, { socketPath: plan.socketPath, configFile: plan.configFile });
}

// ---------------------------------------------------------------------------------------------
// The CLI wrapper.

const ADMIN_SOCKET = "SPIRE server admin socket";

/**
 * The CLI wrapper for a command that talks to the server through its admin socket (operator
 * add/login, robot add/list/remove), after checking the socket's directory (socket_dir.ts:
 * this user's or root's, no group or other write, the same for every directory above it unless
 * sticky): whoever can replace that socket answers every admin call, e.g. mints the operator's
 * SVID or hands out the bundle it trusts.
 */
export async function spireAdminCli(
  runner: ProcessRunner,
  bin: string,
  socketPath: string,
): Promise<SpireServerCli> {
  try {
    await secureSocketDir(socketPath, { create: false, what: ADMIN_SOCKET });
  } catch (err) {
    if (err instanceof SocketDirError && / does not exist/.test(err.message)) {
      throw new CliError(
        `${ADMIN_SOCKET} ${socketPath}: ${err.message.replace(`${ADMIN_SOCKET} `, "")}`,
        1,
        "is the SPIRE server running on this host, with this socket_path? (on a dev stack: .spire-data/server/api.sock of the project)",
      );
    }
    throw err;
  }
  return new SpireServerCli(runner, bin, socketPath);
}

export interface JoinToken {
  /** The secret. Never log it, never put it in an error message or on a command line. */
  value: string;
  expiresAt: Date;
}

export interface Entry {
  id: string;
  spiffeId: string;
  parentId: string;
  /** `type:value`, e.g. `unix:uid:1000`. */
  selectors: string[];
  dnsNames: string[];
  /** 0 means "the server's default_x509_svid_ttl". */
  x509SvidTtl: number;
  hint: string;
}

export interface DesiredEntry {
  spiffeId: string;
  parentId: string;
  selectors: string[];
  dnsNames: string[];
  x509SvidTtl?: number;
  /** A node entry (`entry create -node`): its parent is the server, its selectors an agent's. */
  node?: boolean;
}

/** An attested agent, from `spire-server agent list -output json`. */
export interface AgentRecord {
  /** `spiffe://<td>/spire/agent/<attestor>/...` (a join-token agent's ID holds its token). */
  id: string;
  attestationType: string;
  banned: boolean;
  canReattest: boolean;
  selectors: string[];
  /** The agent SVID's notAfter. */
  expiresAt: Date;
}

/** One agent from SPIRE's protojson. */
export function parseAgentJson(v: unknown): AgentRecord {
  const o = asObj(v);
  return {
    id: idString(o.id),
    attestationType: String(o.attestation_type ?? ""),
    banned: o.banned === true,
    canReattest: o.can_reattest === true,
    selectors: Array.isArray(o.selectors)
      ? o.selectors.map((s) => `${asObj(s).type}:${asObj(s).value}`)
      : [],
    expiresAt: new Date(Number(o.x509svid_expires_at ?? 0) * 1000),
  };
}

export type ReconcileResult = "created" | "updated" | "unchanged";

export interface EntryFilter {
  spiffeId?: string;
  parentId?: string;
  selector?: string;
}

export interface MintedSvid {
  /** Leaf first. */
  certPem: string;
  keyPem: string;
  bundlePem: string;
}

type Json = Record<string, unknown>;

function asObj(v: unknown): Json {
  return v !== null && typeof v === "object" && !Array.isArray(v) ? v as Json : {};
}

function idString(v: unknown): string {
  const o = asObj(v);
  const td = typeof o.trust_domain === "string" ? o.trust_domain : "";
  const path = typeof o.path === "string" ? o.path : "";
  return td ? `spiffe://${td}${path}` : "";
}

/** One entry from SPIRE's protojson (`UseProtoNames`): `spiffe_id: {trust_domain, path}`... */
export function parseEntryJson(v: unknown): Entry {
  const o = asObj(v);
  const selectors = Array.isArray(o.selectors)
    ? o.selectors.map((s) => `${asObj(s).type}:${asObj(s).value}`)
    : [];
  return {
    id: String(o.id ?? ""),
    spiffeId: idString(o.spiffe_id),
    parentId: idString(o.parent_id),
    selectors,
    dnsNames: Array.isArray(o.dns_names) ? o.dns_names.map(String) : [],
    x509SvidTtl: Number(o.x509_svid_ttl ?? 0),
    hint: String(o.hint ?? ""),
  };
}

function parseJson(stdout: string, what: string): Json {
  try {
    return asObj(JSON.parse(stdout));
  } catch {
    // Never echo the output: for `token generate` it holds the secret.
    throw new CliError(`spire-server ${what}: unexpected output (not JSON)`);
  }
}

/** Checks the per-item `results[].status` of a batch answer; returns the results. */
function batchResults(json: Json, what: string): Json[] {
  const results = Array.isArray(json.results) ? json.results.map(asObj) : [];
  if (results.length === 0) throw new CliError(`spire-server ${what}: empty answer`);
  for (const r of results) {
    const st = asObj(r.status);
    const code = Number(st.code ?? 0);
    if (code !== 0) {
      throw new CliError(`spire-server ${what} failed: ${String(st.message ?? `code ${code}`)}`);
    }
  }
  return results;
}

function sameSet(a: string[], b: string[]): boolean {
  if (a.length !== b.length) return false;
  const sa = [...a].sort();
  const sb = [...b].sort();
  return sa.every((x, i) => x === sb[i]);
}

function sameList(a: string[], b: string[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/** True when `e` already is what `d` asks for. DNS order matters: the first name is the CN. */
export function entryMatches(e: Entry, d: DesiredEntry): boolean {
  return e.spiffeId === d.spiffeId && e.parentId === d.parentId &&
    sameSet(e.selectors, d.selectors) && sameList(e.dnsNames, d.dnsNames) &&
    (d.x509SvidTtl === undefined || e.x509SvidTtl === d.x509SvidTtl);
}

/** `spire-server` subcommands against one server's admin socket. */
export class SpireServerCli {
  constructor(
    private readonly runner: ProcessRunner,
    readonly bin: string,
    readonly socketPath: string,
  ) {}

  private async run(args: string[], what: string) {
    return await this.runner.output(this.bin, [...args, "-socketPath", this.socketPath], {
      timeoutMs: 30_000,
    }).catch((err) => {
      throw new CliError(`spire-server ${what} failed: ${(err as Error).message}`);
    });
  }

  /** True when the admin socket's gRPC health check says SERVING. */
  async healthy(): Promise<boolean> {
    try {
      return (await grpcHealthCheck(this.socketPath, 2000)) === "SERVING";
    } catch {
      return false;
    }
  }

  /** The trust bundle (CA certificates) as PEM. */
  async bundlePem(): Promise<string> {
    const r = await this.run(["bundle", "show", "-format", "pem"], "bundle show");
    if (!r.stdout.includes("-----BEGIN CERTIFICATE-----")) {
      throw new CliError("spire-server bundle show: no certificate in the answer");
    }
    return r.stdout;
  }

  /**
   * A single-use join token whose agent gets `spiffeId` as an alias. The value is a secret: it
   * is only ever returned, never logged.
   */
  async generateJoinToken(spiffeId: string, ttlSeconds = 600): Promise<JoinToken> {
    const r = await this.run([
      "token",
      "generate",
      "-spiffeID",
      spiffeId,
      "-ttl",
      String(ttlSeconds),
      "-output",
      "json",
    ], "token generate");
    const json = parseJson(r.stdout, "token generate");
    if (typeof json.value !== "string" || json.value === "") {
      throw new CliError("spire-server token generate: the answer holds no token");
    }
    // protojson prints int64 as a string.
    const expires = Number(json.expires_at);
    return {
      value: json.value,
      expiresAt: new Date(Number.isFinite(expires) ? expires * 1000 : NaN),
    };
  }

  async listEntries(filter: EntryFilter = {}): Promise<Entry[]> {
    const args = ["entry", "show", "-output", "json"];
    if (filter.spiffeId) args.push("-spiffeID", filter.spiffeId);
    if (filter.parentId) args.push("-parentID", filter.parentId);
    if (filter.selector) args.push("-selector", filter.selector);
    const json = parseJson((await this.run(args, "entry show")).stdout, "entry show");
    return Array.isArray(json.entries) ? json.entries.map(parseEntryJson) : [];
  }

  private entryArgs(d: DesiredEntry): string[] {
    const args = d.node ? ["-node", "-spiffeID", d.spiffeId] : [
      "-parentID",
      d.parentId,
      "-spiffeID",
      d.spiffeId,
    ];
    for (const s of d.selectors) args.push("-selector", s);
    for (const n of d.dnsNames) args.push("-dns", n);
    if (d.x509SvidTtl !== undefined) args.push("-x509SVIDTTL", String(d.x509SvidTtl));
    return args;
  }

  async createEntry(d: DesiredEntry): Promise<Entry> {
    if (d.selectors.length === 0) throw new CliError(`entry ${d.spiffeId}: no selector`, 2);
    const r = await this.run(
      ["entry", "create", ...this.entryArgs(d), "-output", "json"],
      "entry create",
    );
    const [first] = batchResults(parseJson(r.stdout, "entry create"), "entry create");
    return parseEntryJson(first.entry);
  }

  async updateEntry(id: string, d: DesiredEntry): Promise<Entry> {
    if (d.selectors.length === 0) throw new CliError(`entry ${d.spiffeId}: no selector`, 2);
    const r = await this.run(
      ["entry", "update", "-entryID", id, ...this.entryArgs(d), "-output", "json"],
      "entry update",
    );
    const [first] = batchResults(parseJson(r.stdout, "entry update"), "entry update");
    return parseEntryJson(first.entry);
  }

  /** Every attested agent (banned ones too): `agent list`. */
  async listAgents(): Promise<AgentRecord[]> {
    const json = parseJson(
      (await this.run(["agent", "list", "-output", "json"], "agent list")).stdout,
      "agent list",
    );
    return Array.isArray(json.agents) ? json.agents.map(parseAgentJson) : [];
  }

  /**
   * `agent evict`: deletes the agent's record, so its agent SVID is no longer honoured; it may
   * attest again if its attestor allows (x509pop does, a used join token does not). `agent ban`
   * also refuses any later attestation of that agent ID. A missing agent is not an error.
   */
  async evictAgent(spiffeId: string, ban = false): Promise<"done" | "not found"> {
    // A join-token agent's ID holds its token, so it is on spire-server's command line here: a
    // token an agent attested with is used up (single use) and no longer a secret.
    const what = ban ? "agent ban" : "agent evict";
    const r = await this.runner.output(
      this.bin,
      ["agent", ban ? "ban" : "evict", "-spiffeID", spiffeId, "-socketPath", this.socketPath],
      { timeoutMs: 30_000, check: false },
    ).catch((err) => {
      throw new CliError(`spire-server ${what} failed: ${(err as Error).message}`);
    });
    if (r.success) return "done";
    if (/NotFound/.test(r.stderr)) return "not found";
    // The agent's ID of a join-token agent holds the token: never echo it.
    throw new CliError(
      `spire-server ${what} failed: ${redactJoinTokens(r.stderr.trim().split("\n").pop() ?? "")}`,
    );
  }

  async deleteEntry(id: string): Promise<void> {
    const r = await this.run(
      ["entry", "delete", "-entryID", id, "-output", "json"],
      "entry delete",
    );
    batchResults(parseJson(r.stdout, "entry delete"), "entry delete");
  }

  /**
   * Makes exactly one entry for (spiffeId, parentId) look like `desired`. Idempotent across
   * restarts: an existing entry is updated in place, extra duplicates are deleted.
   */
  async reconcileEntry(desired: DesiredEntry): Promise<ReconcileResult> {
    const found = await this.listEntries({
      spiffeId: desired.spiffeId,
      parentId: desired.parentId,
    });
    return await this.#reconcile(desired, found);
  }

  /**
   * `reconcileEntry` for several entries with one `entry show` (every entry of the server) and
   * the needed writes run concurrently: each spire-server call is a process start (~30 ms).
   */
  async reconcileEntries(desired: DesiredEntry[]): Promise<ReconcileResult[]> {
    if (desired.length === 0) return [];
    const all = await this.listEntries();
    return await Promise.all(desired.map((d) => this.#reconcile(d, all)));
  }

  async #reconcile(desired: DesiredEntry, entries: Entry[]): Promise<ReconcileResult> {
    const found = entries.filter((e) =>
      e.spiffeId === desired.spiffeId && e.parentId === desired.parentId
    );
    if (found.length === 0) {
      await this.createEntry(desired);
      return "created";
    }
    const keep = found.find((e) => entryMatches(e, desired)) ?? found[0];
    let changed = false;
    for (const extra of found) {
      if (extra.id === keep.id) continue;
      await this.deleteEntry(extra.id);
      changed = true;
    }
    if (!entryMatches(keep, desired)) {
      // An unset TTL keeps whatever the entry has (update replaces every field).
      const ttl = desired.x509SvidTtl ?? (keep.x509SvidTtl > 0 ? keep.x509SvidTtl : undefined);
      await this.updateEntry(keep.id, { ...desired, x509SvidTtl: ttl });
      changed = true;
    }
    return changed ? "updated" : "unchanged";
  }

  /**
   * Mints an X509-SVID directly from the server into `dir` (which must exist, mode 0700): the
   * key never passes through argv, a pipe or a log. Returns the paths SPIRE wrote.
   */
  async mintX509Files(opts: {
    spiffeId: string;
    dnsNames: string[];
    ttlSeconds: number;
    dir: string;
  }): Promise<{ certFile: string; keyFile: string; bundleFile: string }> {
    const args = ["x509", "mint", "-spiffeID", opts.spiffeId];
    for (const n of opts.dnsNames) args.push("-dns", n);
    args.push("-ttl", `${opts.ttlSeconds}s`, "-write", opts.dir);
    await this.run(args, "x509 mint");
    const files = {
      certFile: join(opts.dir, "svid.pem"),
      keyFile: join(opts.dir, "key.pem"),
      bundleFile: join(opts.dir, "bundle.pem"),
    };
    for (const f of Object.values(files)) {
      try {
        await Deno.stat(f);
      } catch {
        throw new CliError(`spire-server x509 mint: ${f} was not written`);
      }
    }
    return files;
  }

  /** Mints an X509-SVID directly from the server (e.g. the broker's). */
  async mintX509(opts: { spiffeId: string; dnsNames: string[]; ttlSeconds: number }): Promise<
    MintedSvid
  > {
    // A private directory (0700): the key never lands anywhere others can read.
    const dir = await Deno.makeTempDir({ prefix: "k8s4r-mint-" });
    try {
      await Deno.chmod(dir, 0o700);
      const f = await this.mintX509Files({ ...opts, dir });
      return {
        certPem: await Deno.readTextFile(f.certFile),
        keyPem: await Deno.readTextFile(f.keyFile),
        bundlePem: await Deno.readTextFile(f.bundleFile),
      };
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  }
}
