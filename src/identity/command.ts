/**
 * `k8s4r identity fetch`: asks a SPIFFE Workload API for X.509 SVIDs once and shows each SPIFFE
 * ID, its validity, the CA bundle's validity and how long the first response took. `--json`
 * gives the same as JSON; `--write DIR` saves svid.pem, svid.key (0600) and bundle.pem.
 */
import { join, resolve } from "node:path";
import type { Args, CommandSpec } from "../cli/mod.ts";
import { CliError, UsageError } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import { certInfo, parseSpiffeId, type X509Bundle, type X509Svid } from "../spiffe/mod.ts";
import {
  AddressError,
  ENDPOINT_SOCKET_ENV,
  WorkloadApiClient,
  WorkloadApiError,
  type X509Context,
} from "../spiffe/workload/mod.ts";

/** The guide's SPIRE agent socket, used when neither --socket nor SPIFFE_ENDPOINT_SOCKET is set. */
export const DEFAULT_AGENT_SOCKET = "unix:///tmp/spire-agent/agent.sock";
const DEFAULT_TIMEOUT_SECONDS = 10;

/** Clocks, injectable so tests can assert exact output. */
export interface FetchDeps {
  now?: () => Date;
  /** Monotonic milliseconds. */
  clock?: () => number;
}

/** "1h 2m 3s", "59m 58s", "4s"; negative durations read "expired ... ago". */
export function formatDuration(ms: number): string {
  const abs = Math.abs(ms);
  const s = Math.floor(abs / 1000);
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  const parts: string[] = [];
  if (d) parts.push(`${d}d`);
  if (h) parts.push(`${h}h`);
  if (m && !d) parts.push(`${m}m`);
  if (!d && !h) parts.push(`${sec}s`);
  return parts.join(" ");
}

function left(notAfter: Date, now: Date): string {
  const ms = notAfter.getTime() - now.getTime();
  return ms >= 0 ? `${formatDuration(ms)} left` : `expired ${formatDuration(ms)} ago`;
}

const HINTS: Partial<Record<string, string>> = {
  "socket-missing":
    `start the SPIRE agent (k8s4r devenv start) or point --socket / ${ENDPOINT_SOCKET_ENV} at its socket`,
  "socket-permission": "run as a user that may open the socket, or fix the socket directory's mode",
  "no-identity":
    "create a registration entry whose selectors match this process (spire-server entry create ... -selector unix:uid:N)",
  "missing-header": "the client must send the metadata 'workload.spiffe.io: true'",
  "unavailable": "check that the SPIRE agent is running (spire-agent healthcheck -socketPath ...)",
};

function svidJson(svid: X509Svid, now: Date) {
  return {
    spiffeId: svid.id.toString(),
    hint: svid.hint,
    dnsNames: svid.dnsNames,
    notBefore: svid.notBefore.toISOString(),
    notAfter: svid.notAfter.toISOString(),
    secondsLeft: Math.floor((svid.notAfter.getTime() - now.getTime()) / 1000),
    chainLength: svid.certificates.length,
    serialNumber: svid.serialNumber,
  };
}

function bundleJson(b: X509Bundle, now: Date) {
  return {
    trustDomain: b.trustDomain.idString(),
    authorities: b.authorities.map((c) => {
      const info = certInfo(c);
      return {
        subject: c.subject.replace(/\n/g, ", "),
        notBefore: info.notBefore.toISOString(),
        notAfter: info.notAfter.toISOString(),
        secondsLeft: Math.floor((info.notAfter.getTime() - now.getTime()) / 1000),
      };
    }),
  };
}

async function writeFiles(dir: string, svid: X509Svid, bundle: X509Bundle): Promise<string[]> {
  await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  const files = {
    svid: join(dir, "svid.pem"),
    key: join(dir, "svid.key"),
    bundle: join(dir, "bundle.pem"),
  };
  // The key first, created 0600 (and re-chmodded in case the file existed with another mode).
  await Deno.writeTextFile(files.key, svid.privateKeyPem(), { mode: 0o600 });
  await Deno.chmod(files.key, 0o600);
  await Deno.writeTextFile(files.svid, svid.certChainPem(), { mode: 0o644 });
  await Deno.writeTextFile(files.bundle, bundle.toPem(), { mode: 0o644 });
  return [files.svid, files.key, files.bundle];
}

/** The body of `identity fetch`, with injectable clocks. */
export async function runIdentityFetch(args: Args, io: Io, deps: FetchDeps = {}): Promise<number> {
  const now = deps.now ?? (() => new Date());
  const clock = deps.clock ?? (() => performance.now());
  const timeoutSec = args.number("timeout") ?? DEFAULT_TIMEOUT_SECONDS;
  if (!(timeoutSec > 0)) {
    throw new UsageError(
      `identity fetch: --timeout expects a positive number of seconds, got ${timeoutSec}`,
    );
  }
  const wanted = args.string("spiffe-id");
  if (wanted !== undefined) {
    try {
      parseSpiffeId(wanted);
    } catch (err) {
      throw new UsageError(`identity fetch: --spiffe-id: ${(err as Error).message}`);
    }
  }
  const address = args.string("socket") ?? io.env[ENDPOINT_SOCKET_ENV] ?? DEFAULT_AGENT_SOCKET;
  let client: WorkloadApiClient;
  try {
    client = new WorkloadApiClient({ address });
  } catch (err) {
    if (err instanceof AddressError) {
      const from = args.has("socket")
        ? "--socket"
        : io.env[ENDPOINT_SOCKET_ENV]
        ? ENDPOINT_SOCKET_ENV
        : "default";
      throw new UsageError(`identity fetch: ${from}: ${err.message}`);
    }
    throw err;
  }
  let ctx: X509Context;
  let elapsed: number;
  try {
    const started = clock();
    ctx = await client.fetchX509Context({ timeoutMs: timeoutSec * 1000, signal: io.signal });
    elapsed = Math.max(0, Math.round(clock() - started));
  } catch (err) {
    if (err instanceof WorkloadApiError) {
      throw new CliError(`identity fetch: ${err.message}`, 1, HINTS[err.kind]);
    }
    throw err;
  } finally {
    client.close();
  }

  let svids = ctx.svids;
  if (wanted !== undefined) {
    svids = svids.filter((s) => s.id.toString() === wanted);
    if (svids.length === 0) {
      throw new CliError(
        `identity fetch: no X.509 SVID for ${wanted} (the Workload API returned: ${
          ctx.svids.map((s) => s.id.toString()).join(", ")
        })`,
      );
    }
  }
  const t = now();
  const tds = new Set(svids.map((s) => s.id.trustDomain.name));
  const bundles = ctx.bundles.bundles().filter((b) => tds.has(b.trustDomain.name));

  let written: string[] | undefined;
  const dirArg = args.string("write");
  if (dirArg !== undefined) {
    const svid = svids[0];
    const bundle = ctx.bundles.get(svid.id.trustDomain);
    if (!bundle) throw new CliError(`identity fetch: no bundle for ${svid.id.trustDomain.name}`);
    try {
      written = await writeFiles(resolve(io.cwd, dirArg), svid, bundle);
    } catch (err) {
      throw new CliError(`identity fetch: --write ${dirArg}: ${(err as Error).message}`);
    }
  }

  if (args.bool("json")) {
    io.stdout.write(
      JSON.stringify(
        {
          address: client.address.original,
          firstResponseMs: elapsed,
          svids: svids.map((s) => svidJson(s, t)),
          bundles: bundles.map((b) => bundleJson(b, t)),
          ...(written ? { written } : {}),
        },
        null,
        2,
      ) + "\n",
    );
    return 0;
  }

  const out: string[] = [];
  out.push(`Workload API ${client.address.original} answered in ${elapsed} ms`);
  for (const s of svids) {
    out.push(`SVID ${s.id}`);
    if (s.hint) out.push(`  hint        ${s.hint}`);
    if (s.dnsNames.length) out.push(`  dns names   ${s.dnsNames.join(", ")}`);
    out.push(`  not before  ${s.notBefore.toISOString()}`);
    out.push(`  not after   ${s.notAfter.toISOString()} (${left(s.notAfter, t)})`);
  }
  for (const b of bundles) {
    const n = b.authorities.length;
    out.push(`Bundle ${b.trustDomain.idString()} (${n} CA${n === 1 ? "" : "s"})`);
    for (const c of b.authorities) {
      const info = certInfo(c);
      out.push(`  CA ${c.subject.replace(/\n/g, ", ")}`);
      out.push(`    not before  ${info.notBefore.toISOString()}`);
      out.push(`    not after   ${info.notAfter.toISOString()} (${left(info.notAfter, t)})`);
    }
  }
  if (written) out.push(`Wrote ${written.join(", ")}`);
  io.stdout.write(out.join("\n") + "\n");
  return 0;
}

export const identityCommand: CommandSpec = {
  name: "identity",
  summary: "Inspect SPIFFE identities from a Workload API",
  subcommands: [{
    name: "fetch",
    summary: "Fetch X.509 SVIDs and bundles",
    description:
      `Asks the SPIFFE Workload API once and prints each SPIFFE ID, its validity, the CA bundle's
validity and how long the first response took. The address is --socket, else
${ENDPOINT_SOCKET_ENV}, else ${DEFAULT_AGENT_SOCKET}.`,
    flags: [
      {
        name: "socket",
        type: "string",
        valueName: "ADDR",
        description: "Workload API address (unix:///path, tcp://IP:PORT or a socket path)",
      },
      {
        name: "spiffe-id",
        type: "string",
        valueName: "ID",
        description: "Show (and write) only the SVID with this SPIFFE ID",
      },
      { name: "json", type: "boolean", description: "Print JSON" },
      {
        name: "write",
        type: "string",
        valueName: "DIR",
        description: "Write svid.pem, svid.key (mode 0600) and bundle.pem into DIR",
      },
      {
        name: "timeout",
        type: "number",
        valueName: "SECONDS",
        description: `Give up after this long (default ${DEFAULT_TIMEOUT_SECONDS})`,
      },
    ],
    run: (args, io) => runIdentityFetch(args, io),
  }],
};
