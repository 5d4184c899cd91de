/**
 * The CLI's HTTPS client of the fleet server's API: it presents the operator's X.509 SVID and
 * accepts the server only if its certificate is an SVID of `spiffe://<td>/fleet-server` under
 * the operator's bundle (the SPIFFE way: by ID, so `https://127.0.0.1:8090` works as well as
 * `https://localhost:8090`). node:https, because fetch cannot authorize a server by SPIFFE ID.
 */
import https from "node:https";
import { fleetServerSpiffeId } from "../fleet/mod.ts";
import { CliError, errorMessage, UsageError } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import { StaticX509Source } from "../spiffe/source.ts";
import { authorizeId, mtlsClientOptions } from "../spiffe/tls.ts";
import { loadCredentials, type LoadedCredentials, resolveOperatorName } from "./credentials.ts";

export interface ApiResponse<T> {
  status: number;
  body: T & { error?: string; code?: string };
}

export class ApiClient {
  private readonly agent: https.Agent;

  constructor(readonly baseUrl: string, readonly creds: LoadedCredentials) {
    const source = new StaticX509Source(creds.svid, creds.bundles);
    const tls = mtlsClientOptions(
      source,
      authorizeId(fleetServerSpiffeId(creds.svid.id.trustDomain.name)),
    );
    // One connection for a whole command (task run polls every 200 ms).
    this.agent = new https.Agent({ keepAlive: true, maxSockets: 1, ...tls });
  }

  async request<T>(
    method: string,
    path: string,
    opts: { body?: unknown; signal?: AbortSignal } = {},
  ): Promise<ApiResponse<T>> {
    const url = new URL(path, this.baseUrl);
    const payload = opts.body === undefined ? undefined : JSON.stringify(opts.body);
    let status: number;
    let text: string;
    try {
      ({ status, text } = await new Promise<{ status: number; text: string }>((resolve, reject) => {
        const req = https.request(url, {
          method,
          agent: this.agent,
          servername: /^[\d.]+$|:/.test(url.hostname) ? undefined : url.hostname,
          headers: {
            accept: "application/json",
            ...(payload !== undefined ? { "content-type": "application/json" } : {}),
          },
          signal: opts.signal,
        }, (res) => {
          const chunks: Uint8Array[] = [];
          res.on("data", (c: Uint8Array) => chunks.push(c));
          res.on("end", () =>
            resolve({
              status: res.statusCode ?? 0,
              text: new TextDecoder().decode(concat(chunks)),
            }));
          res.on("error", reject);
        });
        req.on("error", reject);
        req.end(payload);
      }));
    } catch (err) {
      if (opts.signal?.aborted) throw err;
      throw new CliError(
        `cannot reach the fleet server at ${this.baseUrl}: ${errorMessage(err)}`,
        1,
        "is 'k8s4r server' running? (or pass --server URL)",
      );
    }
    try {
      return { status, body: JSON.parse(text) };
    } catch {
      throw new CliError(
        `${url}: expected JSON from the fleet server, got HTTP ${status}: ${text.slice(0, 80)}`,
      );
    }
  }

  close(): void {
    this.agent.destroy();
  }
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.byteLength, 0));
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.byteLength;
  }
  return out;
}

/** `--server URL`, else K8S4R_SERVER_URL, else the URL recorded with the credentials. */
export function serverUrlFor(
  flag: string | undefined,
  io: Pick<Io, "env">,
  recorded: string,
): string {
  const raw = flag ?? io.env["K8S4R_SERVER_URL"] ?? recorded;
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    throw new UsageError(`--server: expected a URL like https://localhost:8090, got '${raw}'`);
  }
  if (u.protocol !== "https:") {
    throw new UsageError(
      `--server: the fleet server speaks HTTPS only (with client certificates), got '${raw}'`,
    );
  }
  return raw.replace(/\/+$/, "");
}

/**
 * The client every API command uses: the operator's credentials (found by themselves, see
 * resolveOperatorName), refused early with the command to run when they expired.
 */
export async function apiClient(
  io: Pick<Io, "env">,
  opts: { server?: string; operator?: string } = {},
): Promise<ApiClient> {
  const name = await resolveOperatorName(io.env, opts.operator);
  const creds = await loadCredentials(io.env, name);
  if (creds.expired) {
    throw new CliError(
      `operator ${name}'s certificate ${
        new Date() < creds.svid.notBefore ? "is not valid before" : "expired at"
      } ${
        (new Date() < creds.svid.notBefore ? creds.svid.notBefore : creds.svid.notAfter)
          .toISOString()
      }`,
      1,
      `renew it on the control host: k8s4r operator login ${name}`,
    );
  }
  return new ApiClient(serverUrlFor(opts.server, io, creds.meta.serverUrl), creds);
}
