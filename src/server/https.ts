/**
 * The HTTPS listener of the fleet server's API: `node:https` with client certificates.
 *
 * - The server's certificate and key are its own X.509 SVID (`spiffe://<td>/fleet-server`),
 *   and the CA names it asks clients for are the SPIRE bundle. Both follow rotation: every
 *   update of the source installs a new secure context (`setSecureContext`), which the next
 *   handshake uses; connections already open keep theirs.
 * - `requestCert: true, rejectUnauthorized: false`: TLS asks for a client certificate but lets
 *   a connection without one (or with an untrusted one) through, so that the API can answer
 *   401/403 in JSON. The chain is then verified by the API itself (auth.ts) against the
 *   bundle, never by TLS's `authorized` flag. TLS still checks that the client holds the key
 *   of the certificate it presents (CertificateVerify).
 *
 * Why node:https and not Deno.serve: Deno.serve has no client-certificate option (checked in
 * Deno 2.9.6); node:https in Deno 2.9 has `requestCert`, `getPeerCertificate(true)` and
 * `setSecureContext`. Requests are handed to the fetch-style handler of http_api.ts.
 */
import https from "node:https";
import type { IncomingMessage, ServerResponse } from "node:http";
import { Readable } from "node:stream";
import type { TLSSocket } from "node:tls";
import type { X509Certificate } from "node:crypto";
import type { X509SvidSource } from "../spiffe/source.ts";
import { peerChain } from "../spiffe/tls.ts";
import type { ConnInfo } from "./http_api.ts";

/** The server side of TLS, kept fresh across rotations. */
export interface ServerTlsMaterial {
  key: string;
  /** Leaf first, then intermediates. */
  cert: string;
  /** The CAs clients' certificates chain to (sent as the acceptable CA names). */
  ca: string;
}

export interface ServerTlsProvider {
  current(): ServerTlsMaterial;
  onUpdate(cb: () => void): () => void;
}

/** TLS material from an SVID source: its SVID, and the bundle of its own trust domain. */
export function svidServerTls(source: X509SvidSource): ServerTlsProvider {
  return {
    current() {
      const svid = source.getX509Svid();
      const bundle = source.getX509BundleForTrustDomain(svid.id.trustDomain);
      if (!bundle) throw new Error(`no X.509 bundle for trust domain ${svid.id.trustDomain.name}`);
      return { key: svid.privateKeyPem(), cert: svid.certChainPem(), ca: bundle.toPem() };
    },
    onUpdate: (cb) => source.onUpdate(cb),
  };
}

export interface HttpsApi {
  /** The address actually bound (port 0 resolves to a free port). */
  addr: { hostname: string; port: number };
  /** How clients reach it: `https://<name>:<port>` with a name its certificate carries. */
  url: string;
  /** Secure contexts installed after a rotation, and handshakes that failed (counters). */
  stats: { contextUpdates: number; tlsErrors: number; lastTlsError?: string };
  close(): Promise<void>;
}

export type FetchHandler = (req: Request, conn?: ConnInfo) => Promise<Response>;

/**
 * Open connections the API keeps at most (`maxConnections`: one more is closed at once). Each
 * costs a file descriptor and a TLS session; without a cap, clients that connect and never
 * finish (or never start) a request would exhaust the server's descriptors (the default soft
 * limit is 1024). Operators and probes need a handful.
 */
export const DEFAULT_MAX_CONNECTIONS = 512;

function toRequest(req: IncomingMessage): Request {
  const headers = new Headers();
  for (const [k, v] of Object.entries(req.headers)) {
    if (v === undefined) continue;
    for (const one of Array.isArray(v) ? v : [v]) headers.append(k, one);
  }
  const method = req.method ?? "GET";
  const hasBody = method !== "GET" && method !== "HEAD";
  // The URL's authority is a placeholder: the handler judges the Host header itself.
  return new Request(`https://fleet-server.invalid${req.url}`, {
    method,
    headers,
    body: hasBody ? Readable.toWeb(req) as ReadableStream<Uint8Array> : undefined,
    // @ts-ignore: `duplex` is required for a streamed body (fetch spec), not in every lib.d.ts.
    duplex: "half",
  });
}

function clientChain(socket: TLSSocket): X509Certificate[] | undefined {
  const cert = socket.getPeerCertificate(true);
  if (!cert || !cert.raw) return undefined;
  try {
    return peerChain(cert);
  } catch {
    return undefined;
  }
}

async function respond(res: ServerResponse, response: Response): Promise<void> {
  const headers: Record<string, string | string[]> = {};
  response.headers.forEach((v, k) => (headers[k] = v));
  // Headers joins several Set-Cookie values; each goes on its own line.
  const cookies = response.headers.getSetCookie();
  if (cookies.length) headers["set-cookie"] = cookies;
  if (response.headers.get("content-type")?.startsWith("text/event-stream") && response.body) {
    // A stream (Server-Sent Events): chunks as they come, until either side ends it.
    res.writeHead(response.status, headers);
    res.flushHeaders();
    const reader = response.body.getReader();
    res.on("close", () => void reader.cancel().catch(() => {}));
    try {
      while (true) {
        const { done, value } = await reader.read();
        if (done || res.destroyed) break;
        res.write(value);
      }
    } catch { /* the client went away */ }
    res.end();
    return;
  }
  const body = new Uint8Array(await response.arrayBuffer());
  headers["content-length"] = String(body.byteLength);
  res.writeHead(response.status, headers);
  res.end(body);
}

export async function serveHttps(
  handler: FetchHandler,
  opts: {
    hostname: string;
    port: number;
    tls: ServerTlsProvider;
    urlHost?: string;
    /** Default DEFAULT_MAX_CONNECTIONS. */
    maxConnections?: number;
  },
): Promise<HttpsApi> {
  const stats: HttpsApi["stats"] = { contextUpdates: 0, tlsErrors: 0 };
  const connections = new WeakMap<TLSSocket, ConnInfo>();
  const server = https.createServer({
    ...opts.tls.current(),
    requestCert: true,
    rejectUnauthorized: false,
    minVersion: "TLSv1.2",
  }, (req, res) => {
    if (!req.url?.startsWith("/")) {
      res.writeHead(400, { "content-type": "application/json; charset=utf-8" });
      res.end(JSON.stringify({ error: "request target: expected an absolute path" }) + "\n");
      return;
    }
    // One ConnInfo per TLS connection: its chain is fixed, and its verification is reused.
    const socket = req.socket as TLSSocket;
    let conn = connections.get(socket);
    if (!conn) {
      try {
        conn = { peerChain: clientChain(socket) };
      } catch {
        conn = {};
      }
      connections.set(socket, conn);
    }
    handler(toRequest(req), conn).then((r) => respond(res, r)).catch((err) => {
      if (!res.headersSent) {
        res.writeHead(500, { "content-type": "application/json; charset=utf-8" });
      }
      res.end(JSON.stringify({ error: `internal error: ${(err as Error).message}` }) + "\n");
    });
  });
  server.requestTimeout = 30_000;
  server.headersTimeout = 10_000;
  server.maxConnections = opts.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
  server.on("tlsClientError", (err: Error) => {
    stats.tlsErrors++;
    stats.lastTlsError = err.message;
  });
  const unsubscribe = opts.tls.onUpdate(() => {
    try {
      server.setSecureContext({ ...opts.tls.current() });
      stats.contextUpdates++;
    } catch (err) {
      stats.lastTlsError = `rotation: ${(err as Error).message}`;
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(opts.port, opts.hostname, () => {
      server.off("error", reject);
      resolve();
    });
  }).catch((err) => {
    unsubscribe();
    throw err;
  });
  const a = server.address() as { address: string; port: number };
  const host = opts.urlHost ?? (a.address.includes(":") ? `[${a.address}]` : a.address);
  return {
    addr: { hostname: a.address, port: a.port },
    url: `https://${host}:${a.port}`,
    stats,
    async close() {
      unsubscribe();
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        // Keep-alive connections would hold close() open.
        (server as unknown as { closeAllConnections?: () => void }).closeAllConnections?.();
      });
    },
  };
}
