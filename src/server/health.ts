/**
 * What `GET /healthz` answers: cheap for the server and honest about the registry.
 *
 * - Anyone may call /healthz (no client certificate), so it must not cost the database
 *   anything per call: the registry's counters (robots, tasks) are read at most once per
 *   `refreshMs` (1 s), by one read that every caller in the meantime shares, bounded by
 *   `readTimeoutMs` (a database that does not answer makes /healthz say so, never hang). The
 *   counters shown are those of the last read that answered (`registry.countedAt`).
 *   600 concurrent calls over 3000 robots used to take every connection of the pool the ingest
 *   writer shares (registry_postgres.ts keeps the writer a connection of its own, too).
 * - Details (the database's error, hence its address or file) only for a caller that presented
 *   an operator certificate with a role (the doctor does); anyone else gets the same problems in
 *   general words and the SQLSTATE: enough to know where to look (the server's log), nothing
 *   about where the database is.
 * - 200 only when the broker link is up, the registry answers reads, and its writes succeed
 *   (`WriteHealth`, write_errors.ts: the last batch of messages committed). Else 503 with
 *   `problems`, one line each (`registry: ...`, `mqtt: ...`), so that a registry that fails
 *   every write (a full disk, a read-only standby: 25006) no longer hides behind a 200.
 */
import type { FleetService } from "./fleet.ts";
import { writeErrorCode } from "./write_errors.ts";

export interface HealthOptions {
  fleet: FleetService;
  mqttConnected: () => boolean;
  version?: string;
  /** More for the body (the HTTP refusal counters); `detailed` for an operator. */
  extra?: (detailed: boolean) => Record<string, unknown>;
  /** More problems (one line each, e.g. a replica's lease); none by default. */
  problems?: (detailed: boolean) => string[];
  /** Registry counters are read at most this often. Default 1000 ms. */
  refreshMs?: number;
  /** A counters read that takes longer is given up: the registry does not answer. Default 1500. */
  readTimeoutMs?: number;
  now?: () => number;
}

interface Counts {
  at: number;
  total: number;
  online: number;
  tasks: Record<string, number>;
}

/** Reads `p`, or rejects after `ms` (the read itself goes on and is dropped). */
function within<T>(p: Promise<T>, ms: number): Promise<T> {
  let t: ReturnType<typeof setTimeout> | undefined;
  return Promise.race([
    p,
    new Promise<never>((_, reject) => {
      t = setTimeout(() => reject(new Error(`no answer within ${ms / 1000} s`)), ms);
    }),
  ]).finally(() => clearTimeout(t));
}

export class HealthView {
  #counts?: Counts;
  #readError?: { at: number; message: string; code?: string };
  #reading?: Promise<void>;
  private readonly refreshMs: number;
  private readonly readTimeoutMs: number;
  private readonly now: () => number;

  constructor(private readonly o: HealthOptions) {
    this.refreshMs = o.refreshMs ?? 1000;
    // (Two reads per refresh: the robots, the tasks by state.)
    this.readTimeoutMs = o.readTimeoutMs ?? 1500;
    this.now = o.now ?? Date.now;
  }

  /** One read for everyone who asks within `refreshMs` (and while it runs). */
  private refresh(): Promise<void> {
    const last = Math.max(this.#counts?.at ?? -Infinity, this.#readError?.at ?? -Infinity);
    if (this.now() - last < this.refreshMs) return Promise.resolve();
    if (!this.#reading) {
      const reg = this.o.fleet.registry;
      this.#reading = within(
        (async () => ({
          robots: await reg.listRobots(),
          tasks: await reg.countTasksByState(),
        }))(),
        this.readTimeoutMs,
      ).then(
        (r) => {
          this.#counts = {
            at: this.now(),
            total: r.robots.length,
            online: r.robots.filter((x) => x.online).length,
            tasks: r.tasks,
          };
          this.#readError = undefined;
        },
        (err) => {
          this.#readError = {
            at: this.now(),
            message: (err as Error).message,
            code: writeErrorCode(err),
          };
        },
      ).finally(() => (this.#reading = undefined));
    }
    return this.#reading;
  }

  /**
   * `[status, body]` of /healthz. `detailed` for an operator: the errors as they are (they name
   * the database: its address, its file); otherwise their kind and code only.
   */
  async answer(detailed = false): Promise<[number, Record<string, unknown>]> {
    await this.refresh();
    const { fleet } = this.o;
    const link = fleet.linkState();
    const problems: string[] = [];
    const seeLog = "see the server's log";
    const re = this.#readError;
    if (re) {
      problems.push(
        detailed
          ? `registry: reads fail: ${re.message}`
          : `registry: reads fail${re.code ? ` (${re.code})` : ""}; ${seeLog}`,
      );
    }
    const state = fleet.writes.state();
    if (!state.ok) {
      problems.push(
        detailed
          ? `registry: writes failing since ${state.failingSince}: ${state.lastError}`
          : `registry: writes failing since ${state.failingSince}${
            state.code ? ` (${state.code})` : ""
          }; ${seeLog}`,
      );
    }
    const w = detailed ? state : { ...state, lastError: undefined };
    const connected = this.o.mqttConnected();
    if (!connected) problems.push("mqtt: not connected to the broker");
    problems.push(...(this.o.problems?.(detailed) ?? []));
    const c = this.#counts;
    const ok = problems.length === 0;
    return [ok ? 200 : 503, {
      ok,
      version: this.o.version,
      ...(ok ? {} : { problems }),
      // since: when the link went up (subscribed) or down; robots are unknown while it is down.
      // delivering: the broker echoed the server's probe lately (false while it is frozen).
      mqtt: {
        connected,
        since: link.since,
        delivering: link.delivering,
        confirmedAt: link.confirmedAt,
      },
      messages: fleet.stats,
      tasks: c?.tasks ?? {},
      robots: {
        total: c?.total ?? 0,
        /** Last known: while the link is down these are also counted as unknown. */
        online: c?.online ?? 0,
        unknown: fleet.fleetDelivering() ? 0 : (c?.total ?? 0),
      },
      registry: {
        reads: re ? { ok: false, at: new Date(re.at).toISOString() } : { ok: true },
        writes: JSON.parse(JSON.stringify(w)),
        countedAt: c ? new Date(c.at).toISOString() : null,
      },
      ...(this.o.extra?.(detailed) ?? {}),
    }];
  }
}
