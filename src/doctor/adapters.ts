/**
 * The real environment behind `DoctorContext`: files, /proc, sockets, TLS, HTTP and SPIRE.
 * Checks only see the interfaces in `check.ts`; tests replace all of this with fakes.
 */
import { Buffer } from "node:buffer";
import { X509Certificate } from "node:crypto";
import { delimiter, join } from "node:path";
import type { Io } from "../cli/io.ts";
import { findSpireBinaries } from "../spire/binaries.ts";
import { grpcHealthCheck } from "../spire/health.ts";
import { isAttested } from "../spire/agent.ts";
import { readAgentData } from "../spire/agent_state.ts";
import * as net from "node:net";
import * as tls from "node:tls";
import { WorkloadApiClient } from "../spiffe/mod.ts";
import { X509Bundle } from "../spiffe/bundle.ts";
import { verifyX509SvidChain } from "../spiffe/verify.ts";
import {
  type ControlHostPaths,
  type DoctorContext,
  type DoctorFs,
  type DoctorNet,
  type DoctorOptions,
  type DoctorProc,
  type DoctorSpire,
  type FetchedSvid,
  makeMemo,
  type RobotHostContext,
  type RobotPaths,
  type TcpResult,
  type TlsHandshakeResult,
} from "./check.ts";
import { probeMqtt } from "../mqtt/probe.ts";
import { apiClient } from "../operator/client.ts";
import { parseProcStat } from "../process/mod.ts";
import { findListeningOwner, findUnixSocketOwner, type ProcReader } from "./proc_net.ts";
import { certFacts } from "./pki.ts";

export function realContext(
  io: Io,
  options: DoctorOptions,
  paths: { layout: ControlHostPaths; robot: RobotPaths },
  robotHost?: RobotHostContext,
): DoctorContext {
  return {
    io,
    env: io.env,
    layout: paths.layout,
    robot: paths.robot,
    ...(robotHost ? { robotHost } : {}),
    options,
    fs: realFs(io.env),
    net: realNet(io.env),
    proc: realProc,
    spire: realSpire(io),
    runner: io.runner,
    clock: { now: () => Date.now() },
    uid: Deno.uid() ?? 0,
    memo: makeMemo(),
  };
}

export function realFs(env: Record<string, string | undefined>): DoctorFs {
  return {
    readTextFile: (p) => Deno.readTextFile(p),
    async stat(p) {
      try {
        const s = await Deno.lstat(p);
        return {
          isFile: s.isFile,
          isDirectory: s.isDirectory,
          isSocket: s.isSocket ?? false,
          isSymlink: s.isSymlink,
          mode: (s.mode ?? 0) & 0o7777,
          size: s.size,
          mtimeMs: s.mtime?.getTime(),
          uid: s.uid ?? undefined,
        };
      } catch (err) {
        if (err instanceof Deno.errors.NotFound || err instanceof Deno.errors.NotADirectory) {
          return undefined;
        }
        throw err;
      }
    },
    async makeTempDir() {
      const d = await Deno.makeTempDir({ prefix: "k8s4r-doctor-" });
      await Deno.chmod(d, 0o700);
      return d;
    },
    async writeFile(p, data, mode) {
      await Deno.writeTextFile(p, data, { mode, createNew: true });
      await Deno.chmod(p, mode);
    },
    removeAll: (p) => Deno.remove(p, { recursive: true }).catch(() => {}),
    realPath: (p) => Deno.realPath(p),
    async which(name) {
      for (const dir of (env["PATH"] ?? "").split(delimiter)) {
        if (!dir.startsWith("/")) continue;
        const p = join(dir, name);
        try {
          const s = await Deno.stat(p);
          if (s.isFile && ((s.mode ?? 0o755) & 0o111)) return p;
        } catch { /* not here */ }
      }
      return undefined;
    },
  };
}

const procReader: ProcReader = {
  readText: (p) => Deno.readTextFile(p),
  async readDir(p) {
    const out: string[] = [];
    for await (const e of Deno.readDir(p)) out.push(e.name);
    return out;
  },
  readLink: (p) => Deno.readLink(p),
};

export const realProc: DoctorProc = {
  unixSocketOwner: (path) => findUnixSocketOwner(path, procReader),
  async stat(pid) {
    try {
      const st = parseProcStat(await Deno.readTextFile(`/proc/${pid}/stat`));
      return st ? { pid, comm: st.comm, state: st.state } : undefined;
    } catch {
      return undefined;
    }
  },
};

/**
 * The real network. `httpGet` of an https:// URL is a request to the fleet server's API as the
 * CLI's operator (its credentials, found as `k8s4r robots` finds them): the server is
 * authorized by its SPIFFE ID, and every endpoint but /healthz needs the operator's certificate.
 */
export function realNet(env: Record<string, string | undefined>): DoctorNet {
  return {
    listeningOwner: (port) => findListeningOwner(port, procReader),

    async httpGet(url, timeoutMs) {
      if (url.startsWith("https:")) {
        const u = new URL(url);
        const api = await apiClient({ env }, { server: u.origin });
        try {
          const r = await api.request<unknown>("GET", `${u.pathname}${u.search}`, {
            signal: AbortSignal.timeout(timeoutMs),
          });
          return { status: r.status, body: JSON.stringify(r.body) };
        } finally {
          api.close();
        }
      }
      try {
        const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
        const body = await res.text();
        return { status: res.status, body };
      } catch (err) {
        // fetch says only "fetch failed"; the reason (connection refused...) is in `cause`.
        const cause = (err as { cause?: { message?: string } }).cause?.message;
        throw new Error(cause ? cause.split("\n")[0] : (err as Error).message);
      }
    },

    mqttProbe: probeMqtt,

    tcpConnect(host, port, timeoutMs) {
      return new Promise((resolve) => {
        const sock = net.connect({ host, port });
        const done = (r: TcpResult) => {
          clearTimeout(timer);
          sock.destroy();
          resolve(r);
        };
        const timer = setTimeout(
          () => done({ ok: false, code: "ETIMEDOUT", error: `no answer in ${timeoutMs} ms` }),
          timeoutMs,
        );
        sock.once("connect", () => done({ ok: true }));
        sock.once(
          "error",
          (e: NodeJS.ErrnoException) =>
            done({ ok: false, code: e.code, error: e.message.split("\n")[0] }),
        );
      });
    },

    tlsHandshake(o) {
      return new Promise((resolve) => {
        let sock: tls.TLSSocket;
        const result: TlsHandshakeResult = { handshake: false, authorized: false, peerChain: [] };
        const done = (extra: Partial<TlsHandshakeResult> = {}) => {
          clearTimeout(timer);
          sock?.destroy();
          resolve({ ...result, ...extra });
        };
        const timer = setTimeout(
          () => done({ code: "ETIMEDOUT", error: `no TLS handshake in ${o.timeoutMs} ms` }),
          o.timeoutMs,
        );
        try {
          sock = tls.connect({
            host: o.host,
            port: o.port,
            ca: o.ca,
            ALPNProtocols: ["h2"],
            rejectUnauthorized: false,
            // The caller checks the server's SPIFFE ID; a SPIRE server has no DNS name to match.
            checkServerIdentity: () => undefined,
            ...(net.isIP(o.host) ? {} : { servername: o.host }),
          });
        } catch (err) {
          return done({ error: (err as Error).message.split("\n")[0] });
        }
        sock.once("secureConnect", () => {
          result.handshake = true;
          result.authorized = sock.authorized;
          if (!sock.authorized && sock.authorizationError) {
            result.authorizationError = String(
              (sock.authorizationError as unknown as { code?: string }).code ??
                sock.authorizationError,
            );
          }
          let c = sock.getPeerCertificate(true) as tls.DetailedPeerCertificate | undefined;
          const seen = new Set<string>();
          while (c && c.raw && !seen.has(c.fingerprint256)) {
            seen.add(c.fingerprint256);
            result.peerChain.push(new Uint8Array(c.raw));
            c = c.issuerCertificate;
          }
          done();
        });
        sock.once(
          "error",
          (e: NodeJS.ErrnoException) => done({ code: e.code, error: e.message.split("\n")[0] }),
        );
      });
    },
  };
}

export function realSpire(io: Io): DoctorSpire {
  return {
    async findBinaries() {
      const b = await findSpireBinaries(io);
      return b
        ? { server: b.server, agent: b.agent, source: b.source, version: b.version }
        : undefined;
    },
    async health(socketPath, timeoutMs) {
      return { status: await grpcHealthCheck(socketPath, timeoutMs) };
    },
    isAttested: (dir) => isAttested(dir),
    agentData: readAgentData,
    fetchX509Svids,
    verifyChain(chain, bundle, nowMs) {
      try {
        const certs = chain.map((d) => new X509Certificate(Buffer.from(d)));
        const uri = certFacts(chain[0]).uris.find((u) => u.startsWith("spiffe://"));
        if (!uri) return { ok: false, error: "leaf certificate has no SPIFFE ID" };
        const td = new URL(uri).host;
        const b = new X509Bundle(td, bundle.map((d) => new X509Certificate(Buffer.from(d))));
        verifyX509SvidChain(certs, b, new Date(nowMs));
        return { ok: true };
      } catch (err) {
        return { ok: false, error: (err as Error).message };
      }
    },
  };
}

/** The first X509SVIDResponse of the Workload API, through src/spiffe's client. */
export async function fetchX509Svids(
  socketPath: string,
  timeoutMs: number,
): Promise<FetchedSvid[]> {
  const client = new WorkloadApiClient({ address: `unix://${socketPath}` });
  try {
    const ctx = await client.fetchX509Context({ timeoutMs });
    return ctx.svids.map((svid) => ({
      spiffeId: svid.id.toString(),
      chain: svid.certificates.map((c) => new Uint8Array(c.raw)),
      key: svid.privateKeyDer(),
      bundle: ctx.bundles.get(svid.id.trustDomain)?.authorities.map((c) => new Uint8Array(c.raw)) ??
        [],
    }));
  } catch (err) {
    throw new Error(`Workload API: ${(err as Error).message}`);
  } finally {
    client.close();
  }
}
