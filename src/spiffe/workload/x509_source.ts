/**
 * `X509Source` (go-spiffe's `workloadapi.X509Source`): watches the Workload API and always holds
 * the newest X.509 SVID and bundles.
 *
 * - `create()` resolves once the first usable SVID and its bundle arrive; it rejects with a
 *   clear error when the wanted SPIFFE ID does not arrive within `timeoutMs`, on a fatal error
 *   (InvalidArgument) or when `signal` aborts.
 * - Afterwards it keeps the newest SVID; reconnects with linear backoff (1 s, 2 s, ... 30 s,
 *   reset on every message); keeps the last good SVID while the agent is unreachable; reports
 *   errors to `onError` and `lastError` without stopping; skips bad messages; stops for good on
 *   InvalidArgument, `signal` abort or `close()`.
 * - Listeners registered with `onUpdate` fire once per burst of changes (updates within
 *   `coalesceMs` collapse into one), and only when the SVID or a bundle really changed.
 */
import type { X509Bundle, X509BundleSet } from "../bundle.ts";
import { parseSpiffeId, type TrustDomain } from "../id.ts";
import type { X509SvidSource } from "../source.ts";
import type { X509Svid } from "../svid.ts";
import { type BackoffOptions, WorkloadApiClient, type X509Context } from "./client.ts";
import { WorkloadApiError } from "./errors.ts";

export interface X509SourceOptions {
  /** Workload API address; default `SPIFFE_ENDPOINT_SOCKET` from `env`. */
  address?: string;
  env?: Record<string, string | undefined>;
  /** Pick the SVID with this SPIFFE ID (the agent may return several). */
  spiffeId?: string;
  /** Pick an SVID yourself (ignored when `spiffeId` is set). Default: the first. */
  picker?: (svids: X509Svid[]) => X509Svid | undefined;
  /** Aborting cancels `create()`, or stops watching after it resolved. */
  signal?: AbortSignal;
  /** How long `create()` waits for the first usable SVID. Default 30 s; Infinity waits forever. */
  timeoutMs?: number;
  /** Called with every error while watching (the source goes on unless the error is fatal). */
  onError?: (err: Error) => void;
  /** Use this client (it is not closed by `close()`). Default: a new one for `address`. */
  client?: WorkloadApiClient;
  backoff?: BackoffOptions;
  /** Window in which updates collapse into one emitted update. Default 25 ms. */
  coalesceMs?: number;
  /** Monotonic milliseconds, for `firstUpdateMs`. Default `performance.now`. */
  clock?: () => number;
}

export class X509Source implements X509SvidSource {
  #svid: X509Svid | undefined;
  #svids: X509Svid[] = [];
  #bundles: X509BundleSet | undefined;
  readonly #listeners = new Set<() => void>();
  readonly #ac = new AbortController();
  readonly #client: WorkloadApiClient;
  readonly #ownsClient: boolean;
  readonly #opts: X509SourceOptions;
  readonly #clock: () => number;
  readonly #startedAt: number;
  #emitTimer: ReturnType<typeof setTimeout> | undefined;
  #watchDone: Promise<void> = Promise.resolve();
  #ready!: { resolve: () => void; reject: (err: Error) => void; settled: boolean };
  #lastSeenIds: string[] | undefined;
  #stopped = false;

  /** The last error seen while watching, if any (cleared by the next good update). */
  lastError: Error | undefined;
  /** Usable updates applied so far (rotations, bundle changes and identical re-sends). */
  updates = 0;
  /** Listener notifications emitted so far (after coalescing and de-duplication). */
  emitted = 0;
  /** Milliseconds from `create()` to the first usable SVID. */
  firstUpdateMs: number | undefined;

  private constructor(opts: X509SourceOptions) {
    this.#opts = opts;
    this.#clock = opts.clock ?? (() => performance.now());
    this.#startedAt = this.#clock();
    this.#ownsClient = !opts.client;
    this.#client = opts.client ??
      new WorkloadApiClient({ address: opts.address, env: opts.env, backoff: opts.backoff });
  }

  /** Starts watching and resolves with the source once the first SVID and bundle arrived. */
  static async create(opts: X509SourceOptions = {}): Promise<X509Source> {
    if (opts.spiffeId) parseSpiffeId(opts.spiffeId); // fail fast on a malformed wanted ID
    const src = new X509Source(opts);
    try {
      await src.#start();
    } catch (err) {
      await src.close();
      throw err;
    }
    return src;
  }

  #start(): Promise<void> {
    const ready = new Promise<void>((resolve, reject) => {
      this.#ready = { resolve, reject, settled: false };
    });
    let timer: ReturnType<typeof setTimeout> | undefined;
    const settle = (err?: Error) => {
      if (this.#ready.settled) return;
      this.#ready.settled = true;
      clearTimeout(timer);
      this.#opts.signal?.removeEventListener("abort", onAbortBeforeReady);
      if (err) this.#ready.reject(err);
      else this.#ready.resolve();
    };
    this.#settle = settle;

    const onAbortBeforeReady = () => {
      settle(new WorkloadApiError("cancelled", "X509Source creation was cancelled"));
    };
    const signal = this.#opts.signal;
    if (signal?.aborted) onAbortBeforeReady();
    signal?.addEventListener("abort", onAbortBeforeReady);
    signal?.addEventListener("abort", () => void this.close(), { once: true });

    const timeoutMs = this.#opts.timeoutMs ?? 30_000;
    if (Number.isFinite(timeoutMs)) {
      timer = setTimeout(() => settle(this.#timeoutError(timeoutMs)), timeoutMs);
    }

    this.#watchDone = this.#client.watchX509Context({
      onUpdate: (ctx) => this.#apply(ctx),
      onError: (err) => this.#report(err),
    }, { signal: this.#ac.signal }).then(
      () => settle(new WorkloadApiError("cancelled", "X509Source was closed")),
      (err: Error) => {
        // Fatal (InvalidArgument): stop for good, keep the last SVID.
        this.#stopped = true;
        settle(err);
      },
    );
    return ready;
  }

  #settle: (err?: Error) => void = () => {};

  #timeoutError(ms: number): Error {
    const secs = `${Math.round(ms / 100) / 10} s`;
    const want = this.#opts.spiffeId;
    if (want && this.#lastSeenIds) {
      return new WorkloadApiError(
        "timeout",
        `no X.509 SVID for ${want} within ${secs} (the Workload API returned: ${
          this.#lastSeenIds.join(", ")
        })`,
      );
    }
    const last = this.lastError ? ` (last error: ${this.lastError.message})` : "";
    return new WorkloadApiError(
      "timeout",
      `no X.509 SVID${
        want ? ` for ${want}` : ""
      } from the Workload API at ${this.#client.address.original} within ${secs}${last}`,
    );
  }

  #report(err: Error): void {
    this.lastError = err;
    try {
      this.#opts.onError?.(err);
    } catch {
      // A failing error handler must not stop the source.
    }
  }

  #pick(ctx: X509Context): X509Svid {
    const want = this.#opts.spiffeId;
    if (want) {
      this.#lastSeenIds = ctx.svids.map((s) => s.id.toString());
      const svid = ctx.svids.find((s) => s.id.toString() === want);
      if (!svid) {
        throw new WorkloadApiError(
          "bad-response",
          `no X.509 SVID for ${want} (the Workload API returned: ${this.#lastSeenIds.join(", ")})`,
        );
      }
      return svid;
    }
    if (this.#opts.picker) {
      const svid = this.#opts.picker(ctx.svids);
      if (!svid) {
        throw new WorkloadApiError(
          "bad-response",
          `the picker chose no X.509 SVID among ${ctx.svids.map(String).join(", ")}`,
        );
      }
      return svid;
    }
    return ctx.svids[0];
  }

  #apply(ctx: X509Context): void {
    if (this.#stopped) return;
    let svid: X509Svid;
    try {
      svid = this.#pick(ctx);
      if (!ctx.bundles.has(svid.id.trustDomain)) {
        throw new WorkloadApiError(
          "bad-response",
          `no X.509 bundle for trust domain ${svid.id.trustDomain.name} of ${svid.id}`,
        );
      }
    } catch (err) {
      this.#report(err as Error);
      return;
    }
    const changed = !this.#svid ||
      this.#svid.certChainPem() !== svid.certChainPem() ||
      !this.#bundles || !this.#bundles.equals(ctx.bundles);
    this.#svid = svid;
    this.#svids = ctx.svids;
    this.#bundles = ctx.bundles;
    this.lastError = undefined;
    this.updates++;
    if (this.firstUpdateMs === undefined) {
      this.firstUpdateMs = Math.max(0, this.#clock() - this.#startedAt);
      this.#settle();
      return; // the first SVID is what create() resolves with, not an update
    }
    if (changed) this.#scheduleEmit();
  }

  #scheduleEmit(): void {
    if (this.#emitTimer !== undefined) return;
    this.#emitTimer = setTimeout(() => {
      this.#emitTimer = undefined;
      if (this.#stopped && this.#ac.signal.aborted) return;
      this.emitted++;
      for (const l of [...this.#listeners]) {
        try {
          l();
        } catch (err) {
          this.#report(err as Error);
        }
      }
    }, this.#opts.coalesceMs ?? 25);
  }

  /** The newest picked SVID. Throws only if called on a source that never became ready. */
  getX509Svid(): X509Svid {
    if (!this.#svid) throw new WorkloadApiError("cancelled", "the X509Source has no SVID");
    return this.#svid;
  }

  /** Every SVID of the newest update, in the Workload API's order. */
  getX509Svids(): X509Svid[] {
    return [...this.#svids];
  }

  getX509BundleForTrustDomain(td: string | TrustDomain): X509Bundle | undefined {
    return this.#bundles?.get(td);
  }

  /** The newest bundle set (own trust domain plus federated). */
  get bundles(): X509BundleSet | undefined {
    return this.#bundles;
  }

  /** False after `close()` or a fatal error. */
  get watching(): boolean {
    return !this.#stopped && !this.#ac.signal.aborted;
  }

  onUpdate(listener: () => void): () => void {
    this.#listeners.add(listener);
    return () => void this.#listeners.delete(listener);
  }

  /** Stops watching, clears timers, closes the client it created. Idempotent. */
  async close(): Promise<void> {
    this.#stopped = true;
    this.#ac.abort();
    clearTimeout(this.#emitTimer);
    this.#emitTimer = undefined;
    this.#settle(new WorkloadApiError("cancelled", "X509Source was closed"));
    await this.#watchDone;
    if (this.#ownsClient) this.#client.close();
  }
}
