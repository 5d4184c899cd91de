/**
 * Identities for a simulated fleet from the REAL SPIRE: one simulator node (one spire-agent,
 * attested with a join token) and one workload entry per robot, all parented to that node and
 * created in batches (`spire-server entry create -data FILE`). The node's single agent then
 * serves every robot's X.509 SVID in one FetchX509SVID response, so N identities cost one
 * Workload API stream instead of N agents.
 *
 * Each entry carries the robot id as its DNS name, so the certificate CN is the robot id and the
 * broker ACL (`use_identity_as_username`) applies to each simulated robot exactly as to a real one.
 */
import { join } from "node:path";
import { CliError } from "../cli/errors.ts";
import { type Daemon, type ProcessRunner, waitFor } from "../process/mod.ts";
import { nodeSpiffeId } from "../fleet/mod.ts";
import { grpcHealthCheck } from "../spire/health.ts";
import type { SpireServerCli } from "../spire/server.ts";

export interface SimNodeOptions {
  runner: ProcessRunner;
  cli: SpireServerCli;
  spireAgentBin: string;
  trustDomain: string;
  serverPort: number;
  /** The exported SPIRE bundle (secure bootstrap). */
  trustBundlePath: string;
  /** Private working directory (agent config, data, token, log). */
  dir: string;
  /** Workload API socket (keep it short: at most 107 bytes). */
  socketPath: string;
  /** Node alias the agent attests as. Default `spiffe://<td>/k8s4r/node/sim`. */
  nodeSpiffeId?: string;
  /** SVIDs the agent may cache; must exceed the fleet size. Default 20000. */
  svidCacheSize?: number;
  /** SPIRE agent `sync_interval` (how often it asks the server for new entries). Default 1s. */
  syncInterval?: string;
}

export interface SimNode {
  nodeSpiffeId: string;
  socketPath: string;
  daemon: Daemon;
  stop(): Promise<void>;
}

/** The agent config for the simulator node (join_token attestor, unix workload attestor). */
export function renderSimAgentConfig(o: {
  trustDomain: string;
  serverPort: number;
  socketPath: string;
  dataDir: string;
  trustBundlePath: string;
  svidCacheSize: number;
  syncInterval: string;
}): string {
  const q = JSON.stringify;
  return `agent {
  trust_domain = ${q(o.trustDomain)}
  server_address = "127.0.0.1"
  server_port = ${o.serverPort}
  socket_path = ${q(o.socketPath)}
  data_dir = ${q(o.dataDir)}
  trust_bundle_path = ${q(o.trustBundlePath)}
  trust_bundle_format = "pem"
  log_level = "WARN"
  x509_svid_cache_max_size = ${o.svidCacheSize}
  experimental {
    sync_interval = ${q(o.syncInterval)}
  }
}

plugins {
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "memory" {
    plugin_data {}
  }
  WorkloadAttestor "unix" {
    plugin_data {}
  }
}
`;
}

/** Starts the simulator node's spire-agent; resolves once its Workload API serves. */
export async function startSimNode(o: SimNodeOptions): Promise<SimNode> {
  const nodeId = o.nodeSpiffeId ?? nodeSpiffeId(o.trustDomain, "sim");
  await Deno.mkdir(o.dir, { recursive: true, mode: 0o700 });
  const dataDir = join(o.dir, "agent-data");
  await Deno.mkdir(dataDir, { recursive: true, mode: 0o700 });
  const sockDir = o.socketPath.slice(0, o.socketPath.lastIndexOf("/"));
  await Deno.mkdir(sockDir, { recursive: true, mode: 0o755 });
  const configPath = join(o.dir, "agent.conf");
  await Deno.writeTextFile(
    configPath,
    renderSimAgentConfig({
      trustDomain: o.trustDomain,
      serverPort: o.serverPort,
      socketPath: o.socketPath,
      dataDir,
      trustBundlePath: o.trustBundlePath,
      svidCacheSize: o.svidCacheSize ?? 20_000,
      syncInterval: o.syncInterval ?? "1s",
    }),
  );
  const token = await o.cli.generateJoinToken(nodeId, 600);
  const tokenFile = join(o.dir, "join.token");
  // The token goes only into a 0600 file in a 0700 directory, never argv, env or a log.
  await Deno.writeTextFile(tokenFile, token.value + "\n", { mode: 0o600 });
  await Deno.chmod(tokenFile, 0o600);
  const daemon = await o.runner.spawn({
    name: "spire-agent (simulator node)",
    cmd: o.spireAgentBin,
    args: ["run", "-config", configPath, "-joinTokenFile", tokenFile],
    logFile: join(o.dir, "spire-agent.log"),
    pidFile: join(o.dir, "spire-agent.pid"),
    ready: async () => (await grpcHealthCheck(o.socketPath, 1000)) === "SERVING",
    readyTimeoutMs: 30_000,
    readyIntervalMs: 50,
  });
  return {
    nodeSpiffeId: nodeId,
    socketPath: o.socketPath,
    daemon,
    stop: () => daemon.stop(5000),
  };
}

export interface SimEntry {
  spiffeId: string;
  parentId: string;
  dnsName: string;
  selectors: string[];
  x509SvidTtl?: number;
}

function checkId(id: string): string {
  if (!/^spiffe:\/\/[^/]+\/.+$/.test(id)) {
    throw new CliError(`invalid SPIFFE ID ${JSON.stringify(id)}`, 2);
  }
  return id;
}

/**
 * The `-data` JSON of `spire-server entry create` in v1.13.3: `{"entries": [...]}` of the legacy
 * `common.RegistrationEntry` shape (SPIFFE IDs as strings, selectors as `{type, value}`).
 */
export function entriesJson(entries: SimEntry[]): string {
  return JSON.stringify({
    entries: entries.map((e) => {
      const o: Record<string, unknown> = {
        spiffe_id: checkId(e.spiffeId),
        parent_id: checkId(e.parentId),
        selectors: e.selectors.map((s) => {
          const i = s.indexOf(":");
          return { type: s.slice(0, i), value: s.slice(i + 1) };
        }),
        dns_names: [e.dnsName],
      };
      if (e.x509SvidTtl !== undefined) o.x509_svid_ttl = e.x509SvidTtl;
      return o;
    }),
  });
}

/**
 * Creates the entries in batches of `batchSize` through `entry create -data FILE`. Entries that
 * already exist are counted, not failed (so a re-run is harmless).
 */
export async function createEntriesBatch(
  runner: ProcessRunner,
  cli: SpireServerCli,
  entries: SimEntry[],
  dir: string,
  batchSize = 500,
): Promise<{ created: number; existing: number }> {
  let created = 0;
  let existing = 0;
  for (let i = 0; i < entries.length; i += batchSize) {
    const file = join(dir, `entries-${i}.json`);
    await Deno.writeTextFile(file, entriesJson(entries.slice(i, i + batchSize)));
    const r = await runner.output(cli.bin, [
      "entry",
      "create",
      "-data",
      file,
      "-output",
      "json",
      "-socketPath",
      cli.socketPath,
    ], { timeoutMs: 120_000, check: false });
    let json: { results?: { status?: { code?: number; message?: string } }[] };
    try {
      json = JSON.parse(r.stdout);
    } catch {
      throw new CliError(
        `spire-server entry create -data ${file} failed (exit ${r.code}): ${
          r.stderr.trim().split("\n").pop() ?? "no output"
        }`,
      );
    }
    for (const res of json.results ?? []) {
      const code = res.status?.code ?? 0;
      if (code === 0) created++;
      else if (code === 6) existing++; // ALREADY_EXISTS
      else {
        throw new CliError(
          `spire-server entry create: ${res.status?.message ?? `code ${code}`} (${file})`,
        );
      }
    }
  }
  return { created, existing };
}

/** Polls until `count()` reaches `n` (e.g. SVIDs served by the node). */
export async function waitForCount(
  count: () => number,
  n: number,
  timeoutMs: number,
  what: string,
): Promise<void> {
  await waitFor(() => count() >= n, {
    timeoutMs,
    intervalMs: 100,
    what: `${what} (have ${count()} of ${n})`,
  });
}
