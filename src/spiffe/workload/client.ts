/**
 * A SPIFFE Workload API client (go-spiffe's `workloadapi.Client`) over the small gRPC client in
 * `grpc.ts` (node:http2; see there why not @grpc/grpc-js).
 *
 * - Address: the `address` option, else `SPIFFE_ENDPOINT_SOCKET` from the `env` option (the
 *   environment is passed in, never read globally).
 * - Every call carries the metadata `workload.spiffe.io: true`.
 * - `watch*` methods stream forever: on errors they report to the watcher and reconnect with a
 *   backoff of 1 s growing by 1 s up to 30 s, reset by every message; they stop for good on
 *   InvalidArgument (and return its error) or when the signal aborts / the client closes.
 *   A message that cannot be decoded or validated is reported and skipped.
 * - `fetch*` methods make one attempt and throw a `WorkloadApiError` naming the cause.
 * - Responses arrive as raw bytes and are decoded here, so that one undecodable message in a
 *   stream is reported and skipped instead of ending the stream.
 */
import { X509Bundle, X509BundleSet } from "../bundle.ts";
import { parseSpiffeId, parseTrustDomain, type SpiffeId } from "../id.ts";
import { JwtBundle, type JwtSvid, parseJwtSvidInsecure } from "../jwt.ts";
import { parseX509Svid, type X509Svid } from "../svid.ts";
import { resolveWorkloadAddress, type WorkloadAddress } from "./address.ts";
import { mapGrpcError, socketMissing, socketPermission, WorkloadApiError } from "./errors.ts";
import { GrpcChannel } from "./grpc.ts";
import {
  decodeJwtBundlesResponse,
  decodeJwtSvidResponse,
  decodeValidateJwtSvidResponse,
  decodeX509BundlesResponse,
  decodeX509SvidResponse,
  encodeEmpty,
  encodeJwtSvidRequest,
  encodeValidateJwtSvidRequest,
  type JsonObject,
  type X509SvidResponse,
} from "./proto.ts";

/** The metadata every Workload API call must carry, with value "true". */
export const SECURITY_HEADER = "workload.spiffe.io";

/** The proto has no package, so the paths are `/SpiffeWorkloadAPI/<Method>`. */
const SERVICE = "/SpiffeWorkloadAPI/";

/** The SVIDs and bundles of one X509SVIDResponse. */
export interface X509Context {
  /** In the order the Workload API sent them; the first is the default. */
  svids: X509Svid[];
  /** The SVIDs' own trust domain bundle plus federated bundles. */
  bundles: X509BundleSet;
}

export interface Watcher<T> {
  onUpdate(value: T): void;
  /** Errors while watching (connection lost, bad message...); the watch goes on unless fatal. */
  onError?(err: WorkloadApiError): void;
}

export interface BackoffOptions {
  /** First delay. Default 1000 ms. */
  initialMs?: number;
  /** Added after each failed attempt. Default 1000 ms. */
  stepMs?: number;
  /** Upper bound. Default 30000 ms. */
  maxMs?: number;
}

/** Linear backoff, as go-spiffe's workloadapi: 1 s, 2 s, ... 30 s, reset on success. */
export class Backoff {
  #next: number;
  constructor(private readonly opts: Required<BackoffOptions>) {
    this.#next = opts.initialMs;
  }
  next(): number {
    const d = this.#next;
    this.#next = Math.min(this.#next + this.opts.stepMs, this.opts.maxMs);
    return d;
  }
  reset(): void {
    this.#next = this.opts.initialMs;
  }
}

export interface WorkloadApiClientOptions {
  /** `unix:///path`, `unix:/path`, `tcp://IP:PORT`, `tcp:IP:PORT` or an absolute path. */
  address?: string;
  /** Where `SPIFFE_ENDPOINT_SOCKET` is looked up when `address` is not given. */
  env?: Record<string, string | undefined>;
  backoff?: BackoffOptions;
  /** Largest response message accepted. Default 4 MiB (as go-spiffe's gRPC). */
  maxMessageBytes?: number;
}

export interface CallOptions {
  signal?: AbortSignal;
  /** Deadline for a one-shot call. */
  timeoutMs?: number;
}

type StreamMethod = "FetchX509SVID" | "FetchX509Bundles" | "FetchJWTBundles";

/** Builds an X509Context from a response; throws WorkloadApiError("bad-response"). */
export function x509ContextFromResponse(res: X509SvidResponse): X509Context {
  try {
    if (res.svids.length === 0) throw new Error("the response holds no X.509 SVIDs");
    const bundles = new X509BundleSet();
    const svids = res.svids.map((m, i) => {
      const svid = parseX509Svid(m.x509Svid, m.x509SvidKey, m.hint);
      if (m.spiffeId && m.spiffeId !== svid.id.toString()) {
        throw new Error(
          `SVID ${i + 1}: spiffe_id ${m.spiffeId} does not match the certificate's ${svid.id}`,
        );
      }
      if (!bundles.has(svid.id.trustDomain) && m.bundle.length) {
        bundles.add(X509Bundle.fromDer(svid.id.trustDomain, m.bundle));
      }
      return svid;
    });
    for (const [tdId, der] of res.federatedBundles) {
      const td = parseTrustDomain(tdId);
      if (!bundles.has(td)) bundles.add(X509Bundle.fromDer(td, der));
    }
    if (!bundles.has(svids[0].id.trustDomain)) {
      throw new Error(`no bundle for trust domain ${svids[0].id.trustDomain.name}`);
    }
    return { svids, bundles };
  } catch (err) {
    throw new WorkloadApiError("bad-response", `bad X509SVIDResponse: ${(err as Error).message}`);
  }
}

function bundleSetFromMap(m: Map<string, Uint8Array>): X509BundleSet {
  try {
    const set = new X509BundleSet();
    for (const [tdId, der] of m) set.add(X509Bundle.fromDer(parseTrustDomain(tdId), der));
    return set;
  } catch (err) {
    throw new WorkloadApiError(
      "bad-response",
      `bad X509BundlesResponse: ${(err as Error).message}`,
    );
  }
}

function jwtBundlesFromMap(m: Map<string, Uint8Array>): Map<string, JwtBundle> {
  try {
    const out = new Map<string, JwtBundle>();
    for (const [tdId, json] of m) {
      const b = JwtBundle.fromJwks(parseTrustDomain(tdId), json);
      out.set(b.trustDomain.name, b);
    }
    return out;
  } catch (err) {
    throw new WorkloadApiError("bad-response", `bad JWTBundlesResponse: ${(err as Error).message}`);
  }
}

function badResponse(err: unknown, what: string): WorkloadApiError {
  if (err instanceof WorkloadApiError) return err;
  return new WorkloadApiError("bad-response", `bad ${what}: ${(err as Error).message}`);
}

export class WorkloadApiClient {
  readonly address: WorkloadAddress;
  readonly #channel: GrpcChannel;
  readonly #backoff: Required<BackoffOptions>;
  readonly #closer = new AbortController();

  constructor(opts: WorkloadApiClientOptions = {}) {
    this.address = resolveWorkloadAddress(opts.address, opts.env);
    this.#backoff = {
      initialMs: opts.backoff?.initialMs ?? 1000,
      stepMs: opts.backoff?.stepMs ?? 1000,
      maxMs: opts.backoff?.maxMs ?? 30_000,
    };
    const a = this.address;
    this.#channel = new GrpcChannel(
      a.kind === "unix"
        ? { kind: "unix", path: a.path }
        : { kind: "tcp", host: a.host, port: a.port },
      { maxMessageBytes: opts.maxMessageBytes },
    );
  }

  get closed(): boolean {
    return this.#closer.signal.aborted;
  }

  #metadata(): Record<string, string> {
    return { [SECURITY_HEADER]: "true" };
  }

  /** Refines an UNAVAILABLE error by looking at the socket (missing, not accessible). */
  async #explain(err: unknown): Promise<WorkloadApiError> {
    const mapped = mapGrpcError(err, this.address);
    if (mapped.kind !== "unavailable" || this.address.kind !== "unix") return mapped;
    try {
      await Deno.stat(this.address.path);
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) return socketMissing(this.address, mapped.grpcCode);
      if (e instanceof Deno.errors.PermissionDenied) {
        return socketPermission(this.address, mapped.grpcCode);
      }
    }
    return mapped;
  }

  #checkOpen(): void {
    if (this.closed) {
      throw new WorkloadApiError("cancelled", "the Workload API client is closed");
    }
  }

  /**
   * One stream attempt. Resolves with the error that ended it (undefined when it ended because
   * the caller aborted).
   */
  #stream(
    method: StreamMethod,
    onMessage: (bytes: Uint8Array) => void,
    signal: AbortSignal,
  ): Promise<WorkloadApiError | undefined> {
    return new Promise((resolve) => {
      if (signal.aborted) return resolve(undefined);
      this.#channel.call(SERVICE + method, encodeEmpty(), this.#metadata(), {
        onMessage: (bytes) => {
          if (!signal.aborted) onMessage(bytes);
        },
        onEnd: (err) => {
          if (signal.aborted) return resolve(undefined);
          // The end of a stream with status OK: the server finished it.
          resolve(
            err ? this.#explain(err) : new WorkloadApiError(
              "unavailable",
              `the Workload API at ${this.address.original} ended the ${method} stream`,
            ),
          );
        },
      }, { signal });
    });
  }

  /** Runs a stream forever with reconnects; see the module comment. */
  async #watch<T>(
    method: StreamMethod,
    decode: (bytes: Uint8Array) => T,
    watcher: Watcher<T>,
    opts: CallOptions,
  ): Promise<void> {
    this.#checkOpen();
    const signal = opts.signal
      ? AbortSignal.any([opts.signal, this.#closer.signal])
      : this.#closer.signal;
    const backoff = new Backoff(this.#backoff);
    const report = (err: WorkloadApiError) => {
      try {
        watcher.onError?.(err);
      } catch {
        // A watcher's failure must not end the watch.
      }
    };
    while (!signal.aborted) {
      const err = await this.#stream(method, (bytes) => {
        backoff.reset();
        let value: T;
        try {
          value = decode(bytes);
        } catch (e) {
          report(badResponse(e, method + " response"));
          return;
        }
        watcher.onUpdate(value);
      }, signal);
      if (!err || signal.aborted) return;
      report(err);
      if (err.fatal) throw err;
      await sleep(backoff.next(), signal);
    }
  }

  /** Streams X.509 SVIDs and bundles (FetchX509SVID). Resolves on abort or close. */
  watchX509Context(watcher: Watcher<X509Context>, opts: CallOptions = {}): Promise<void> {
    return this.#watch(
      "FetchX509SVID",
      (b) => x509ContextFromResponse(decodeX509SvidResponse(b)),
      watcher,
      opts,
    );
  }

  /** Streams the X.509 bundles (FetchX509Bundles). Resolves on abort or close. */
  watchX509Bundles(watcher: Watcher<X509BundleSet>, opts: CallOptions = {}): Promise<void> {
    return this.#watch(
      "FetchX509Bundles",
      (b) => bundleSetFromMap(decodeX509BundlesResponse(b).bundles),
      watcher,
      opts,
    );
  }

  /** Streams the JWT bundles, keyed by trust domain name. */
  watchJwtBundles(watcher: Watcher<Map<string, JwtBundle>>, opts: CallOptions = {}): Promise<void> {
    return this.#watch(
      "FetchJWTBundles",
      (b) => jwtBundlesFromMap(decodeJwtBundlesResponse(b).bundles),
      watcher,
      opts,
    );
  }

  /** The first message of a stream, decoded; one attempt. */
  async #first<T>(
    method: StreamMethod,
    decode: (b: Uint8Array) => T,
    opts: CallOptions,
  ): Promise<T> {
    this.#checkOpen();
    const ac = new AbortController();
    const signals = [ac.signal, this.#closer.signal];
    if (opts.signal) signals.push(opts.signal);
    const signal = AbortSignal.any(signals);
    let timer: ReturnType<typeof setTimeout> | undefined;
    let result: { value?: T; error?: WorkloadApiError } | undefined;
    const timeout = new Promise<void>((resolve) => {
      if (opts.timeoutMs === undefined) return;
      timer = setTimeout(() => {
        result ??= {
          error: new WorkloadApiError(
            "timeout",
            `the Workload API at ${this.address.original} sent nothing within ${opts.timeoutMs} ms`,
          ),
        };
        ac.abort();
        resolve();
      }, opts.timeoutMs);
    });
    const streamDone = this.#stream(method, (bytes) => {
      if (result) return;
      try {
        result = { value: decode(bytes) };
      } catch (e) {
        result = { error: badResponse(e, method + " response") };
      }
      ac.abort();
    }, signal);
    const err = await Promise.race([streamDone, timeout]);
    clearTimeout(timer);
    ac.abort();
    await streamDone;
    if (result?.error) throw result.error;
    if (result) return result.value as T;
    if (err) throw err;
    throw new WorkloadApiError("cancelled", `the call to the Workload API was cancelled`);
  }

  /** The current X.509 SVIDs and bundles (first FetchX509SVID message). */
  fetchX509Context(opts: CallOptions = {}): Promise<X509Context> {
    return this.#first(
      "FetchX509SVID",
      (b) => x509ContextFromResponse(decodeX509SvidResponse(b)),
      opts,
    );
  }

  /** The current X.509 bundles (first FetchX509Bundles message). */
  fetchX509Bundles(opts: CallOptions = {}): Promise<X509BundleSet> {
    return this.#first(
      "FetchX509Bundles",
      (b) => bundleSetFromMap(decodeX509BundlesResponse(b).bundles),
      opts,
    );
  }

  /** The current JWT bundles, keyed by trust domain name. */
  fetchJwtBundles(opts: CallOptions = {}): Promise<Map<string, JwtBundle>> {
    return this.#first(
      "FetchJWTBundles",
      (b) => jwtBundlesFromMap(decodeJwtBundlesResponse(b).bundles),
      opts,
    );
  }

  async #unary(
    method: "FetchJWTSVID" | "ValidateJWTSVID",
    req: Uint8Array,
    opts: CallOptions,
  ): Promise<Uint8Array> {
    this.#checkOpen();
    const signals = [this.#closer.signal];
    if (opts.signal) signals.push(opts.signal);
    try {
      return await this.#channel.unary(SERVICE + method, req, this.#metadata(), {
        signal: AbortSignal.any(signals),
        timeoutMs: opts.timeoutMs,
      });
    } catch (err) {
      throw await this.#explain(err);
    }
  }

  /** Fetches JWT-SVIDs for the audience; all of them (or only `spiffeId`'s). */
  async fetchJwtSvids(
    params: { audience: string | string[]; spiffeId?: string },
    opts: CallOptions = {},
  ): Promise<JwtSvid[]> {
    const audience = typeof params.audience === "string" ? [params.audience] : params.audience;
    if (audience.length === 0) {
      throw new WorkloadApiError("invalid-argument", "a JWT-SVID needs at least one audience");
    }
    if (params.spiffeId) parseSpiffeId(params.spiffeId);
    const bytes = await this.#unary(
      "FetchJWTSVID",
      encodeJwtSvidRequest({ audience, spiffeId: params.spiffeId ?? "" }),
      opts,
    );
    try {
      const res = decodeJwtSvidResponse(bytes);
      if (res.svids.length === 0) throw new Error("the response holds no JWT-SVIDs");
      return res.svids.map((s) => parseJwtSvidInsecure(s.svid, s.hint));
    } catch (err) {
      throw badResponse(err, "JWTSVIDResponse");
    }
  }

  /** The first (default) JWT-SVID for the audience, or the one for `spiffeId`. */
  async fetchJwtSvid(
    params: { audience: string | string[]; spiffeId?: string },
    opts: CallOptions = {},
  ): Promise<JwtSvid> {
    return (await this.fetchJwtSvids(params, opts))[0];
  }

  /** Asks the agent to validate a JWT-SVID for `audience`; returns its ID and claims. */
  async validateJwtSvid(
    token: string,
    audience: string,
    opts: CallOptions = {},
  ): Promise<{ id: SpiffeId; claims: JsonObject }> {
    const bytes = await this.#unary(
      "ValidateJWTSVID",
      encodeValidateJwtSvidRequest({ audience, svid: token }),
      opts,
    );
    try {
      const res = decodeValidateJwtSvidResponse(bytes);
      return { id: parseSpiffeId(res.spiffeId), claims: res.claims };
    } catch (err) {
      throw badResponse(err, "ValidateJWTSVIDResponse");
    }
  }

  /** Cancels every call and watch, and closes the channel. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.#closer.abort();
    this.#channel.close();
  }
}

/** Sleeps, or returns early when the signal aborts; leaves no timer behind. */
export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const done = () => {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const t = setTimeout(done, ms);
    signal.addEventListener("abort", done);
  });
}
