/**
 * A minimal gRPC client over `node:http2`: just what the Workload API and the gRPC health check
 * need (unary and server-streaming calls with raw-byte messages, metadata, deadlines,
 * cancellation), over a unix socket or TCP. It replaces @grpc/grpc-js in production code: the
 * agent keeps one stream open forever and makes a health check now and then, and grpc-js's
 * channel machinery (load balancing, name resolution, retries, channelz: ~670 KB of JavaScript
 * in 65 modules) cost the long-running agent ~3 MB of private memory (docs/BENCHMARKS.md,
 * agent memory). grpc-js stays a test-only dependency: the fake Workload API serves with it, so
 * this client is tested against an independent implementation, and against a real SPIRE agent.
 *
 * The wire protocol (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md):
 * - request: `POST /Service/Method`, `content-type: application/grpc`, `te: trailers`, custom
 *   metadata as headers, optional `grpc-timeout`; the body is one length-prefixed message
 *   (1 byte compressed flag = 0, 4 bytes big-endian length, the message), then end of stream;
 * - response: `:status 200` headers, length-prefixed messages in DATA frames, then trailers
 *   with `grpc-status` and the percent-encoded `grpc-message`. An error may come as
 *   "trailers only" (the status in the headers, with end of stream).
 *
 * Bounded: a message longer than `maxMessageBytes` (default 4 MiB, as grpc-go and grpc-js)
 * fails the call with RESOURCE_EXHAUSTED before anything is allocated for it, and at most one
 * incomplete message is buffered. We never ask for compression, so a compressed message is an
 * INTERNAL error.
 */
import * as http2 from "node:http2";
import * as net from "node:net";

/** gRPC status codes. */
export const GrpcStatus = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  UNAUTHENTICATED: 16,
} as const;

const STATUS_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(GrpcStatus).map(([k, v]) => [v, k]),
);

/** A call that ended with a non-OK status. Shaped like grpc-js's ServiceError (code, details). */
export class GrpcError extends Error {
  constructor(readonly code: number, readonly details: string) {
    super(`${code} ${STATUS_NAMES[code] ?? "UNKNOWN"}: ${details}`);
    this.name = "GrpcError";
  }
}

export const DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024;
const PREFIX = 5;

/** One length-prefixed gRPC message. */
export function frameMessage(msg: Uint8Array): Uint8Array {
  const out = new Uint8Array(PREFIX + msg.length);
  new DataView(out.buffer).setUint32(1, msg.length);
  out.set(msg, PREFIX);
  return out;
}

/**
 * Splits a byte stream into gRPC messages, whatever the chunking. Throws GrpcError
 * (RESOURCE_EXHAUSTED for an oversized message, INTERNAL for a compressed one) and is then
 * unusable. Holds at most one incomplete message.
 */
export class GrpcDeframer {
  #head = new Uint8Array(PREFIX);
  #headLen = 0;
  #body: Uint8Array | undefined;
  #bodyLen = 0;

  constructor(readonly maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES) {}

  /** Bytes of an incomplete message held (0 between messages). */
  get pending(): number {
    return this.#headLen + this.#bodyLen;
  }

  push(chunk: Uint8Array): Uint8Array[] {
    const out: Uint8Array[] = [];
    let off = 0;
    while (off < chunk.length) {
      if (!this.#body) {
        const n = Math.min(PREFIX - this.#headLen, chunk.length - off);
        this.#head.set(chunk.subarray(off, off + n), this.#headLen);
        this.#headLen += n;
        off += n;
        if (this.#headLen < PREFIX) break;
        const flag = this.#head[0];
        const len = new DataView(this.#head.buffer).getUint32(1);
        if (flag !== 0) {
          throw new GrpcError(
            GrpcStatus.INTERNAL,
            flag === 1
              ? "the server sent a compressed message, but no compression was negotiated"
              : `bad message flag ${flag}`,
          );
        }
        if (len > this.maxMessageBytes) {
          throw new GrpcError(
            GrpcStatus.RESOURCE_EXHAUSTED,
            `received message larger than max (${len} vs. ${this.maxMessageBytes})`,
          );
        }
        this.#body = new Uint8Array(len);
        this.#bodyLen = 0;
      }
      const n = Math.min(this.#body.length - this.#bodyLen, chunk.length - off);
      this.#body.set(chunk.subarray(off, off + n), this.#bodyLen);
      this.#bodyLen += n;
      off += n;
      if (this.#bodyLen === this.#body.length) {
        out.push(this.#body);
        this.#body = undefined;
        this.#bodyLen = 0;
        this.#headLen = 0;
      }
    }
    return out;
  }
}

/** Where the server listens. */
export type GrpcTarget = { kind: "unix"; path: string } | {
  kind: "tcp";
  host: string;
  port: number;
};

export interface StreamHandlers {
  onMessage(msg: Uint8Array): void;
  /** Called exactly once: undefined for status OK, else the error. */
  onEnd(err: GrpcError | undefined): void;
}

export interface CallOptions {
  /** Deadline relative to now; sent as `grpc-timeout` and enforced here. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** Maps an HTTP status without a grpc-status (a proxy, or not a gRPC server) to a gRPC code. */
function codeForHttpStatus(s: number): number {
  switch (s) {
    case 400:
      return GrpcStatus.INTERNAL;
    case 401:
      return GrpcStatus.UNAUTHENTICATED;
    case 403:
      return GrpcStatus.PERMISSION_DENIED;
    case 404:
      return GrpcStatus.UNIMPLEMENTED;
    case 429:
    case 502:
    case 503:
    case 504:
      return GrpcStatus.UNAVAILABLE;
    default:
      return GrpcStatus.UNKNOWN;
  }
}

function decodeGrpcMessage(v: unknown): string {
  const s = Array.isArray(v) ? v.join(",") : typeof v === "string" ? v : "";
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}

/** The status in a header block, if it holds one. */
function statusOf(h: http2.IncomingHttpHeaders): GrpcError | null | undefined {
  const raw = h["grpc-status"];
  if (raw === undefined) return undefined;
  const code = Number(Array.isArray(raw) ? raw[0] : raw);
  if (!Number.isInteger(code) || code < 0) {
    return new GrpcError(GrpcStatus.UNKNOWN, `invalid grpc-status '${raw}'`);
  }
  if (code === GrpcStatus.OK) return null;
  return new GrpcError(code, decodeGrpcMessage(h["grpc-message"]));
}

/** The reason a stream was reset, as a gRPC status (as grpc-js reports it). */
function codeForRst(rst: number): number {
  if (rst === http2.constants.NGHTTP2_REFUSED_STREAM) return GrpcStatus.UNAVAILABLE;
  if (rst === http2.constants.NGHTTP2_CANCEL) return GrpcStatus.CANCELLED;
  if (rst === http2.constants.NGHTTP2_ENHANCE_YOUR_CALM) return GrpcStatus.RESOURCE_EXHAUSTED;
  return GrpcStatus.INTERNAL;
}

function errText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

interface Active {
  fail(err: GrpcError): void;
}

/**
 * One HTTP/2 connection, opened on the first call and again after it drops. While no call is
 * active it does not keep the process alive.
 */
export class GrpcChannel {
  #session: http2.ClientHttp2Session | undefined;
  #active = new Set<Active>();
  #closed = false;
  readonly #authority: string;

  constructor(
    readonly target: GrpcTarget,
    readonly opts: { maxMessageBytes?: number } = {},
  ) {
    this.#authority = target.kind === "unix" ? "localhost" : `${target.host}:${target.port}`;
  }

  #connect(): http2.ClientHttp2Session {
    const existing = this.#session;
    if (existing && !existing.closed && !existing.destroyed) return existing;
    const t = this.target;
    const session = http2.connect(`http://${this.#authority}`, {
      createConnection: () =>
        t.kind === "unix"
          ? net.connect({ path: t.path })
          : net.connect({ host: t.host, port: t.port }),
    });
    let lastError = "";
    const drop = () => {
      if (this.#session === session) this.#session = undefined;
      for (const a of [...this.#active]) {
        a.fail(
          new GrpcError(
            GrpcStatus.UNAVAILABLE,
            lastError ? `connection failed: ${lastError}` : "the connection was closed",
          ),
        );
      }
    };
    session.on("error", (err: unknown) => {
      lastError = errText(err);
      drop();
    });
    session.on("close", drop);
    session.on("goaway", () => {
      // Calls in flight may finish; new calls open a new connection.
      if (this.#session === session) this.#session = undefined;
    });
    this.#session = session;
    return session;
  }

  #ref(): void {
    this.#session?.ref();
  }

  #unrefIfIdle(): void {
    if (this.#active.size === 0) this.#session?.unref();
  }

  /** A server-streaming (or unary) call; returns a cancel function. */
  call(
    path: string,
    request: Uint8Array,
    metadata: Record<string, string>,
    handlers: StreamHandlers,
    opts: CallOptions = {},
  ): () => void {
    let ended = false;
    let stream: http2.ClientHttp2Stream | undefined;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const deframer = new GrpcDeframer(this.opts.maxMessageBytes);
    const active: Active = { fail: (err) => finish(err, true) };
    const onAbort = () =>
      finish(new GrpcError(GrpcStatus.CANCELLED, "cancelled by the caller"), true);
    const finish = (err: GrpcError | undefined, reset: boolean) => {
      if (ended) return;
      ended = true;
      clearTimeout(timer);
      opts.signal?.removeEventListener("abort", onAbort);
      this.#active.delete(active);
      if (reset && stream && !stream.destroyed) stream.close(http2.constants.NGHTTP2_CANCEL);
      this.#unrefIfIdle();
      handlers.onEnd(err);
    };
    if (this.#closed) {
      queueMicrotask(() =>
        finish(new GrpcError(GrpcStatus.CANCELLED, "the channel is closed"), false)
      );
      return () => {};
    }
    if (opts.signal?.aborted) {
      queueMicrotask(onAbort);
      return () => {};
    }
    this.#active.add(active);
    opts.signal?.addEventListener("abort", onAbort);
    if (opts.timeoutMs !== undefined) {
      timer = setTimeout(
        () => finish(new GrpcError(GrpcStatus.DEADLINE_EXCEEDED, "deadline exceeded"), true),
        opts.timeoutMs,
      );
    }
    const headers: http2.OutgoingHttpHeaders = {
      ":method": "POST",
      ":scheme": "http",
      ":path": path,
      ":authority": this.#authority,
      "content-type": "application/grpc",
      "te": "trailers",
      ...metadata,
    };
    if (opts.timeoutMs !== undefined) {
      headers["grpc-timeout"] = `${Math.max(1, Math.ceil(opts.timeoutMs))}m`;
    }
    let status: GrpcError | null | undefined; // null = OK
    try {
      const session = this.#connect();
      this.#ref();
      stream = session.request(headers);
    } catch (err) {
      queueMicrotask(() => finish(new GrpcError(GrpcStatus.UNAVAILABLE, errText(err)), false));
      return () => {};
    }
    const s = stream;
    // Deno's node:http2 may emit DATA before the 'response' event: hold it until the headers
    // are checked (bounded like one message).
    let early: Uint8Array[] | undefined = [];
    let earlyBytes = 0;
    const onData = (chunk: Uint8Array) => {
      if (ended) return;
      let msgs: Uint8Array[];
      try {
        msgs = deframer.push(chunk);
      } catch (err) {
        finish(err as GrpcError, true);
        return;
      }
      for (const m of msgs) {
        if (ended) return;
        handlers.onMessage(m);
      }
    };
    s.on("response", (h: http2.IncomingHttpHeaders & http2.IncomingHttpStatusHeader) => {
      const httpStatus = Number(h[":status"]);
      status = statusOf(h); // trailers-only response
      if (status === undefined && httpStatus !== 200) {
        finish(
          new GrpcError(codeForHttpStatus(httpStatus), `unexpected HTTP status ${httpStatus}`),
          true,
        );
        return;
      }
      const ct = String(h["content-type"] ?? "");
      if (status === undefined && !ct.startsWith("application/grpc")) {
        finish(new GrpcError(GrpcStatus.UNKNOWN, `unexpected content-type '${ct}'`), true);
        return;
      }
      const held = early ?? [];
      early = undefined;
      for (const c of held) onData(c);
    });
    s.on("data", (chunk: Uint8Array) => {
      if (ended) return;
      if (!early) return onData(chunk);
      early.push(chunk);
      earlyBytes += chunk.length;
      if (earlyBytes > deframer.maxMessageBytes + PREFIX) {
        finish(new GrpcError(GrpcStatus.INTERNAL, "data before the response headers"), true);
      }
    });
    s.on("trailers", (h: http2.IncomingHttpHeaders) => {
      const st = statusOf(h);
      status = st !== undefined
        ? st
        : new GrpcError(GrpcStatus.UNKNOWN, "the server sent trailers without grpc-status");
    });
    s.on("error", (err: unknown) => {
      if (status === undefined) {
        status = new GrpcError(GrpcStatus.UNAVAILABLE, `stream failed: ${errText(err)}`);
      }
    });
    s.on("close", () => {
      if (status === undefined) {
        const rst = s.rstCode ?? 0;
        status = rst !== http2.constants.NGHTTP2_NO_ERROR
          ? new GrpcError(codeForRst(rst), `stream reset by the server (RST_STREAM code ${rst})`)
          : new GrpcError(GrpcStatus.UNAVAILABLE, "the stream ended without a status");
      }
      if (status === null && deframer.pending > 0) {
        status = new GrpcError(GrpcStatus.INTERNAL, "the stream ended inside a message");
      }
      finish(status ?? undefined, false);
    });
    s.end(frameMessage(request));
    return () => finish(new GrpcError(GrpcStatus.CANCELLED, "cancelled by the caller"), true);
  }

  /** A unary call: resolves with the one response message, rejects with a GrpcError. */
  unary(
    path: string,
    request: Uint8Array,
    metadata: Record<string, string>,
    opts: CallOptions = {},
  ): Promise<Uint8Array> {
    return new Promise((resolve, reject) => {
      let response: Uint8Array | undefined;
      let extra = false;
      this.call(path, request, metadata, {
        onMessage: (m) => {
          if (response) extra = true;
          else response = m;
        },
        onEnd: (err) => {
          if (err) reject(err);
          else if (!response) {
            reject(new GrpcError(GrpcStatus.UNIMPLEMENTED, "no response message for a unary call"));
          } else if (extra) {
            reject(
              new GrpcError(GrpcStatus.UNIMPLEMENTED, "several response messages for a unary call"),
            );
          } else resolve(response);
        },
      }, opts);
    });
  }

  /** Fails every active call with CANCELLED and closes the connection. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const a of [...this.#active]) {
      a.fail(new GrpcError(GrpcStatus.CANCELLED, "the channel was closed"));
    }
    const s = this.#session;
    this.#session = undefined;
    // destroy, not close: every call was just cancelled, so nothing is left to wait for, and a
    // graceful close leaves the session open to the server's GOAWAY. Deno 2.9.6's node:http2
    // can abort the whole process inside nghttp2 while it processes a GOAWAY
    // (denoland/deno#36788, "find_stream_on_goaway_func: Assertion ... failed"; seen once in
    // our unit run when a test's server shut down after its client closed gracefully): a
    // destroyed session processes no more frames.
    s?.destroy();
  }
}
