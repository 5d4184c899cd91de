/**
 * `FakeWorkloadApi`: a real gRPC Workload API server on a unix socket in a temp dir, faithful to
 * SPIRE where clients can tell: DER chains and PKCS#8 keys, InvalidArgument "security header
 * missing from request" without the `workload.spiffe.io: true` metadata, PermissionDenied
 * "no identity issued" when it has no identity, and new responses pushed to open streams.
 * It can be stopped and started again on the same socket to test reconnects.
 */
import * as grpc from "@grpc/grpc-js";
import { join } from "node:path";
import { Buffer } from "node:buffer";
import { X509Certificate } from "node:crypto";
import { splitDer } from "../der.ts";
import { parseSpiffeId } from "../id.ts";
import { spiffeIdFromCert } from "../svid.ts";
import {
  decodeJwtSvidRequest,
  decodeValidateJwtSvidRequest,
  encodeJwtBundlesResponse,
  encodeJwtSvidResponse,
  encodeValidateJwtSvidResponse,
  encodeX509BundlesResponse,
  encodeX509SvidResponse,
  type JsonObject,
  type X509SvidResponse,
} from "../workload/proto.ts";
import { SECURITY_HEADER, workloadServiceDefinition } from "./workload_service.ts";

/** One SVID the fake hands out. `IssuedCert` from TestCa fits. */
export interface FakeSvid {
  /** Defaults to the certificate's own ID, as SPIRE sends it. */
  spiffeId?: string;
  chainDer: Uint8Array;
  keyDer: Uint8Array;
  hint?: string;
}

export interface FakeJwtSvid {
  spiffeId: string;
  token: string;
  hint?: string;
}

export interface RecordedCall {
  method: string;
  hasHeader: boolean;
  request?: unknown;
}

type Stream = grpc.ServerWritableStream<Uint8Array, Uint8Array>;

function hasHeader(md: grpc.Metadata): boolean {
  return md.get(SECURITY_HEADER).some((v) => String(v) === "true");
}

const NO_HEADER = {
  code: grpc.status.INVALID_ARGUMENT,
  details: "security header missing from request",
};
const NO_IDENTITY = { code: grpc.status.PERMISSION_DENIED, details: "no identity issued" };

export class FakeWorkloadApi {
  readonly dir: string;
  readonly socketPath: string;
  /** Every call received, in order. */
  readonly calls: RecordedCall[] = [];

  #server: grpc.Server | undefined;
  #svids: FakeSvid[] = [];
  /** DER bundles keyed by trust domain ID (`spiffe://td`). */
  #bundles = new Map<string, Uint8Array>();
  #jwtSvids: FakeJwtSvid[] = [];
  #jwtBundles = new Map<string, Uint8Array>();
  #validations = new Map<string, { spiffeId: string; claims: JsonObject }>();
  #x509Streams = new Set<Stream>();
  #bundleStreams = new Set<Stream>();
  #jwtBundleStreams = new Set<Stream>();
  #ownsDir: boolean;

  private constructor(dir: string, ownsDir: boolean) {
    this.dir = dir;
    this.#ownsDir = ownsDir;
    this.socketPath = join(dir, "agent.sock");
  }

  /** Runs `fn` against a fresh fake, and closes it afterwards whatever happens. */
  static async using(fn: (fake: FakeWorkloadApi) => Promise<void>): Promise<void> {
    const fake = await FakeWorkloadApi.start();
    try {
      await fn(fake);
    } finally {
      await fake.close();
    }
  }

  /** Starts a fake in a fresh 0700 temp dir (or `dir`). */
  static async start(opts: { dir?: string } = {}): Promise<FakeWorkloadApi> {
    const dir = opts.dir ?? await Deno.makeTempDir({ prefix: "k8s4r-fake-wlapi-" });
    await Deno.chmod(dir, 0o700);
    const fake = new FakeWorkloadApi(dir, opts.dir === undefined);
    await fake.restart();
    return fake;
  }

  /** `unix:///.../agent.sock`. */
  get address(): string {
    return `unix://${this.socketPath}`;
  }

  get running(): boolean {
    return this.#server !== undefined;
  }

  /** Number of currently open FetchX509SVID streams. */
  get openX509Streams(): number {
    return this.#x509Streams.size;
  }

  /** (Re)starts serving on the same socket. */
  async restart(): Promise<void> {
    if (this.#server) return;
    await Deno.remove(this.socketPath).catch(() => {});
    const server = new grpc.Server();
    server.addService(workloadServiceDefinition, {
      FetchX509SVID: (call: Stream) =>
        this.#openStream(call, "FetchX509SVID", this.#x509Streams, () => this.#x509Response()),
      FetchX509Bundles: (call: Stream) =>
        this.#openStream(
          call,
          "FetchX509Bundles",
          this.#bundleStreams,
          () => this.#bundlesResponse(),
        ),
      FetchJWTBundles: (call: Stream) =>
        this.#openStream(
          call,
          "FetchJWTBundles",
          this.#jwtBundleStreams,
          () => this.#jwtBundlesResponse(),
        ),
      FetchJWTSVID: (
        call: grpc.ServerUnaryCall<Uint8Array, Uint8Array>,
        cb: grpc.sendUnaryData<Uint8Array>,
      ) => this.#fetchJwtSvid(call, cb),
      ValidateJWTSVID: (
        call: grpc.ServerUnaryCall<Uint8Array, Uint8Array>,
        cb: grpc.sendUnaryData<Uint8Array>,
      ) => this.#validate(call, cb),
    });
    await new Promise<void>((resolve, reject) =>
      server.bindAsync(
        `unix://${this.socketPath}`,
        grpc.ServerCredentials.createInsecure(),
        (err) => (err ? reject(err) : resolve()),
      )
    );
    this.#server = server;
  }

  /** Stops serving (open streams fail with UNAVAILABLE-like errors); state is kept. */
  async stop(): Promise<void> {
    const server = this.#server;
    if (!server) return;
    this.#server = undefined;
    for (const set of [this.#x509Streams, this.#bundleStreams, this.#jwtBundleStreams]) {
      for (const s of set) {
        fail(s, { code: grpc.status.UNAVAILABLE, details: "fake Workload API stopped" });
      }
      set.clear();
    }
    server.forceShutdown();
    await Deno.remove(this.socketPath).catch(() => {});
  }

  /** Stops and removes the temp dir. */
  async close(): Promise<void> {
    await this.stop();
    if (this.#ownsDir) await Deno.remove(this.dir, { recursive: true }).catch(() => {});
  }

  /**
   * Sets the SVIDs (first = default) and optionally the bundles (DER, keyed by trust domain ID
   * or name), and pushes the new response to every open FetchX509SVID stream. An empty list
   * means "no identity": open streams end with PermissionDenied, as SPIRE does.
   */
  setX509Svids(svids: FakeSvid[], bundles?: Record<string, Uint8Array>): void {
    this.#svids = [...svids];
    if (bundles) this.#setBundles(bundles);
    this.#pushX509();
    if (bundles) this.#pushBundles();
  }

  /** Replaces the X.509 bundles and pushes them to FetchX509SVID and FetchX509Bundles streams. */
  setBundles(bundles: Record<string, Uint8Array>): void {
    this.#setBundles(bundles);
    this.#pushX509();
    this.#pushBundles();
  }

  /** Sends an arbitrary (possibly invalid) response to open FetchX509SVID streams. */
  pushRawX509Response(res: X509SvidResponse | Uint8Array): void {
    const bytes = res instanceof Uint8Array ? res : encodeX509SvidResponse(res);
    for (const s of this.#x509Streams) s.write(bytes);
  }

  setJwtSvids(svids: FakeJwtSvid[]): void {
    this.#jwtSvids = [...svids];
  }

  setJwtBundles(bundles: Record<string, string>): void {
    this.#jwtBundles = new Map(
      Object.entries(bundles).map(([k, v]) => [tdKey(k), new TextEncoder().encode(v)]),
    );
    for (const s of this.#jwtBundleStreams) s.write(this.#jwtBundlesResponse() as Uint8Array);
  }

  /** ValidateJWTSVID accepts `token` for any audience in `claims.aud` and returns these. */
  acceptJwt(token: string, spiffeId: string, claims: JsonObject): void {
    this.#validations.set(token, { spiffeId, claims });
  }

  #setBundles(bundles: Record<string, Uint8Array>): void {
    this.#bundles = new Map(Object.entries(bundles).map(([k, v]) => [tdKey(k), v]));
  }

  #openStream(
    call: Stream,
    method: string,
    set: Set<Stream>,
    first: () => Uint8Array | grpc.StatusObject | undefined,
  ): void {
    const ok = hasHeader(call.metadata);
    this.calls.push({ method, hasHeader: ok });
    if (!ok) {
      fail(call, NO_HEADER);
      return;
    }
    const msg = first();
    if (msg === undefined || !(msg instanceof Uint8Array)) {
      fail(call, NO_IDENTITY);
      return;
    }
    set.add(call);
    call.on("cancelled", () => set.delete(call));
    call.on("close", () => set.delete(call));
    call.write(msg);
  }

  #x509Response(): Uint8Array | undefined {
    if (this.#svids.length === 0) return undefined;
    const ownTds = new Set<string>();
    const res: X509SvidResponse = {
      svids: this.#svids.map((s) => {
        const id = s.spiffeId ?? idOfChain(s.chainDer);
        let td = "";
        try {
          td = parseSpiffeId(id).trustDomain.idString();
        } catch { /* a deliberately bad ID: send it without a bundle */ }
        ownTds.add(td);
        return {
          spiffeId: id,
          x509Svid: s.chainDer,
          x509SvidKey: s.keyDer,
          bundle: this.#bundles.get(td) ?? new Uint8Array(),
          hint: s.hint ?? "",
        };
      }),
      crl: [],
      federatedBundles: new Map([...this.#bundles].filter(([k]) => !ownTds.has(k))),
    };
    return encodeX509SvidResponse(res);
  }

  #bundlesResponse(): Uint8Array | undefined {
    if (this.#svids.length === 0) return undefined;
    return encodeX509BundlesResponse({ crl: [], bundles: this.#bundles });
  }

  #jwtBundlesResponse(): Uint8Array | undefined {
    if (this.#svids.length === 0 && this.#jwtSvids.length === 0) return undefined;
    return encodeJwtBundlesResponse({ bundles: this.#jwtBundles });
  }

  #pushX509(): void {
    const msg = this.#x509Response();
    for (const s of this.#x509Streams) {
      if (msg) s.write(msg);
      else fail(s, NO_IDENTITY);
    }
    if (!msg) this.#x509Streams.clear();
  }

  #pushBundles(): void {
    const msg = this.#bundlesResponse();
    if (msg) { for (const s of this.#bundleStreams) s.write(msg); }
  }

  #fetchJwtSvid(
    call: grpc.ServerUnaryCall<Uint8Array, Uint8Array>,
    cb: grpc.sendUnaryData<Uint8Array>,
  ): void {
    const ok = hasHeader(call.metadata);
    const req = decodeJwtSvidRequest(call.request);
    this.calls.push({ method: "FetchJWTSVID", hasHeader: ok, request: req });
    if (!ok) return cb(NO_HEADER);
    if (req.audience.length === 0) {
      return cb({ code: grpc.status.INVALID_ARGUMENT, details: "audience must be specified" });
    }
    const svids = this.#jwtSvids.filter((s) => !req.spiffeId || s.spiffeId === req.spiffeId);
    if (svids.length === 0) return cb(NO_IDENTITY);
    cb(
      null,
      encodeJwtSvidResponse({
        svids: svids.map((s) => ({ spiffeId: s.spiffeId, svid: s.token, hint: s.hint ?? "" })),
      }),
    );
  }

  #validate(
    call: grpc.ServerUnaryCall<Uint8Array, Uint8Array>,
    cb: grpc.sendUnaryData<Uint8Array>,
  ): void {
    const ok = hasHeader(call.metadata);
    const req = decodeValidateJwtSvidRequest(call.request);
    this.calls.push({ method: "ValidateJWTSVID", hasHeader: ok, request: req });
    if (!ok) return cb(NO_HEADER);
    const v = this.#validations.get(req.svid);
    const aud = v?.claims.aud;
    const auds = Array.isArray(aud) ? aud : [aud];
    if (!v || !auds.includes(req.audience)) {
      return cb({ code: grpc.status.INVALID_ARGUMENT, details: "unable to validate JWT-SVID" });
    }
    cb(null, encodeValidateJwtSvidResponse({ spiffeId: v.spiffeId, claims: v.claims }));
  }
}

/** Ends a server stream with a status (grpc-js turns an 'error' event into the status). */
function fail(call: Stream, status: { code: grpc.status; details: string }): void {
  call.emit("error", Object.assign(new Error(status.details), status));
}

function tdKey(k: string): string {
  return k.startsWith("spiffe://") ? k : `spiffe://${k}`;
}

/** The SPIFFE ID in a chain's leaf, or "" when there is none (deliberately bad SVIDs). */
function idOfChain(chainDer: Uint8Array): string {
  try {
    const [leaf] = splitDer(chainDer);
    return spiffeIdFromCert(new X509Certificate(Buffer.from(leaf))).toString();
  } catch {
    return "";
  }
}
