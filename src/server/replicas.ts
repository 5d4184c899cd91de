/**
 * Fleet-server replicas on one PostgreSQL registry (`k8s4r server --database postgres://...
 * --shared-subscription`): what they share, beyond the robots and tasks.
 *
 * - A row per replica (`replicas`, keyed by its MQTT client id): a lease (`lease_until`, in the
 *   database's clock, renewed every `tickMs`), and its probe clock (`confirmed_at`: the broker
 *   has delivered, and this replica has committed, everything queued for its session before
 *   that time). Every replica reads all rows on each tick.
 * - The fleet's clock is the OLDEST `confirmed_at`: the broker gives each message of the shared
 *   subscription to one session, round robin, whether its owner is connected or not (Mosquitto
 *   `subs__shared_process`), so a robot's heartbeat may sit in any replica's session. Silence is
 *   judged, and shown as `unknown`, by that clock on every replica alike: a replica that cannot
 *   hear the broker stops all of them from marking robots offline.
 * - One sweeper: the holder of `pg_try_advisory_lock(SWEEPER_LOCK)` (a connection of its own:
 *   the lock dies with the process) marks silent robots offline, expires and fails tasks, and
 *   adopts sessions.
 * - Adoption: Mosquitto keeps a dead subscriber's session, its in-flight messages and the
 *   messages still routed to it, for that client id only (tests/server_replicas_test.ts). So
 *   when a replica's lease has expired (it died, or lost the database), or its link has been
 *   down with its clock stalled, the sweeper connects AS that client id: the broker hands it
 *   the session, redelivers what was in flight, and it applies that share of the traffic until
 *   the owner comes back (the owner's CONNECT takes the session back: MQTT 5 "session taken
 *   over", and the adopter lets go). Each replica's connection carries a last will naming its
 *   process (`serverGoneTopic`): when it dies without a DISCONNECT (`kill -9`) the broker
 *   publishes it and the sweeper adopts that process's sessions at once, without waiting for
 *   the lease; its task claims are released, so what it was publishing is sent again.
 * - Time: each replica measures the offset of its clock to PostgreSQL's `now()` at every tick
 *   and stamps everything (last seen, probes, claims) with the database's time, so replicas on
 *   different hosts compare times from one clock (within a round trip).
 */
import type { Registry, ReplicaRow, SessionLock } from "./registry.ts";
import type { Logger, SharedClock } from "./fleet.ts";

/** 'k8s4rswp': the sweeper's advisory lock (any key, as long as every k8s4r uses it). */
export const SWEEPER_LOCK = "7725019788023934832";

export interface ReplicaSetOptions {
  clientId: string;
  /** This process (claims and adoptions are recorded under it). */
  instance: string;
  /** Default 4000 ms. */
  leaseMs?: number;
  log: Logger;
}

export interface SessionClock {
  clientId: string;
  /** Newest committed probe echo (database time, ms), if any yet. */
  confirmedAt?: number;
  linkUp: boolean;
}

export class ReplicaSet implements SharedClock {
  readonly clientId: string;
  readonly instance: string;
  readonly leaseMs: number;
  /** Database time minus local time, ms (smoothed). */
  offsetMs = 0;
  private offsetKnown = false;
  /** Every replica, as of the last tick. */
  rows: ReplicaRow[] = [];
  /** Local time of the last successful renewal. */
  lastRenewOk = 0;
  /** Local time since which renewals fail (undefined while they work). */
  failingSince?: number;
  lastError?: string;
  private lock?: SessionLock;
  /** Local time since which this process holds the sweeper lock. */
  leaderSince?: number;

  constructor(private readonly registry: Registry, private readonly o: ReplicaSetOptions) {
    this.clientId = o.clientId;
    this.instance = o.instance;
    this.leaseMs = o.leaseMs ?? 4000;
  }

  /** The database's clock, as this process knows it. */
  now(): number {
    return Date.now() + this.offsetMs;
  }

  private measure(t0: number, t1: number, dbNow: string): void {
    const sample = Date.parse(dbNow) - (t0 + t1) / 2;
    if (!Number.isFinite(sample)) return;
    if (!this.offsetKnown || Math.abs(sample - this.offsetMs) > 1000) {
      this.offsetMs = sample;
      this.offsetKnown = true;
    } else {
      this.offsetMs += (sample - this.offsetMs) * 0.2;
    }
  }

  /** The oldest replica's confirmed time (database clock), undefined before the first tick. */
  confirmedAt(): number | undefined {
    if (this.rows.length === 0) return undefined;
    let min = Infinity;
    for (const r of this.rows) min = Math.min(min, Date.parse(r.confirmedAt));
    return Number.isFinite(min) ? min : undefined;
  }

  /**
   * Takes this client id (a row of an earlier process is taken over: its broker session is
   * ours). Throws when the database cannot be reached.
   */
  async join(): Promise<void> {
    const t0 = Date.now();
    const r = await this.registry.transaction((tx) =>
      tx.replicaJoin(this.clientId, this.instance, this.leaseMs)
    );
    this.measure(t0, Date.now(), r.dbNow);
    this.lastRenewOk = Date.now();
    this.failingSince = undefined;
    if (r.previous && r.previous !== this.instance) {
      this.o.log.info(`replica ${this.clientId}: took over from ${r.previous}`);
    }
    await this.refresh();
  }

  /**
   * Renews the lease, records the probe clocks of this process's sessions (its own and the ones
   * it adopted), and reads every row. Returns false for `own` when another process took this
   * client id; `revoked` lists adoptions that are over (the owner came back).
   */
  async tick(
    own: SessionClock,
    adopted: SessionClock[],
  ): Promise<{ own: boolean; revoked: string[] }> {
    const revoked: string[] = [];
    try {
      const t0 = Date.now();
      const iso = (ms?: number) => (ms === undefined ? null : new Date(ms).toISOString());
      const r = await this.registry.transaction(async (tx) => {
        const mine = await tx.replicaRenew(
          this.clientId,
          this.instance,
          this.leaseMs,
          iso(own.confirmedAt),
          own.linkUp,
        );
        for (const a of adopted) {
          if (!(await tx.replicaAdoptedTick(a.clientId, this.instance, iso(a.confirmedAt)))) {
            revoked.push(a.clientId);
          }
        }
        return mine;
      });
      this.measure(t0, Date.now(), r.dbNow);
      if (!r.ok) return { own: false, revoked };
      this.lastRenewOk = Date.now();
      this.failingSince = undefined;
      this.lastError = undefined;
      await this.refresh();
      // Alive with a lease, yet marked adopted (its connection was cut for a moment and the
      // sweeper took the session): the adoption ends, the adopter lets go at its next tick.
      if (this.rows.find((x) => x.clientId === this.clientId)?.adoptedBy) {
        await this.registry.transaction((tx) => tx.replicaReclaim(this.clientId, this.instance));
        this.o.log.info(`replica ${this.clientId}: took its session back from its adopter`);
      }
      return { own: true, revoked };
    } catch (err) {
      this.failingSince ??= Date.now();
      this.lastError = (err as Error).message;
      return { own: true, revoked };
    }
  }

  private async refresh(): Promise<void> {
    this.rows = (await this.registry.read((tx) => tx.replicaList())).rows;
  }

  /** This process holds no valid lease (renewals have failed for a lease's length). */
  leaseLost(): boolean {
    return this.failingSince !== undefined && Date.now() - this.lastRenewOk > this.leaseMs;
  }

  /** Gives the sweeper lock up (this process cannot hear the broker: another should sweep). */
  async resign(why: string): Promise<void> {
    if (!this.lock) return;
    this.o.log.warn(`replica ${this.clientId}: no longer the fleet's sweeper (${why})`);
    await this.lock.release().catch(() => {});
    this.lock = undefined;
    this.leaderSince = undefined;
  }

  /** Tries to become (or checks it still is) the sweeper. */
  async lead(): Promise<boolean> {
    if (this.lock?.held()) return true;
    if (this.lock) {
      this.o.log.warn(`replica ${this.clientId}: lost the sweeper lock (its connection is gone)`);
      this.lock = undefined;
      this.leaderSince = undefined;
    }
    if (this.leaseLost()) return false;
    try {
      this.lock = await this.registry.tryLock(SWEEPER_LOCK);
    } catch {
      this.lock = undefined;
    }
    if (this.lock) {
      this.leaderSince = Date.now();
      this.o.log.info(`replica ${this.clientId}: the fleet's sweeper from now`);
    }
    return this.lock !== undefined;
  }

  /**
   * Sessions to adopt: not ours, not adopted by a live process, and whose owner's lease has
   * expired for `adoptAfterMs`, or whose owner has been cut from the broker (link down) with
   * its clock stalled for `stalledMs`. Only once this process has led for a lease and a bit, so
   * that after a database outage every live replica has renewed first.
   */
  adoptable(adoptAfterMs: number, stalledMs: number, adoptedByMe: Set<string>): ReplicaRow[] {
    if (this.leaderSince === undefined || Date.now() - this.leaderSince < this.leaseMs + 1000) {
      return [];
    }
    const live = new Set(this.rows.filter((r) => !r.expired).map((r) => r.instance));
    const now = this.now();
    return this.rows.filter((r) =>
      r.clientId !== this.clientId && !adoptedByMe.has(r.clientId) &&
      (r.adoptedBy === null || !live.has(r.adoptedBy) || r.adoptedBy === this.instance) &&
      ((r.expired && r.expiredForMs >= adoptAfterMs) ||
        (!r.linkUp && now - Date.parse(r.confirmedAt) > stalledMs))
    );
  }

  /**
   * Sessions of a process whose last will the broker published (`deadInstance`): its own, and
   * the ones it had adopted. No waiting: the broker saw its connection die.
   */
  orphansOf(deadInstance: string, adoptedByMe: Set<string>): ReplicaRow[] {
    return this.rows.filter((r) =>
      r.clientId !== this.clientId && !adoptedByMe.has(r.clientId) &&
      (r.instance === deadInstance || r.adoptedBy === deadInstance)
    );
  }

  /** Records the adoption (false: someone else has it, or the owner is back). */
  async adopt(
    row: ReplicaRow,
    why: { expiredForMs: number } | { stalledForMs: number } | { deadInstance: string },
  ): Promise<boolean> {
    return await this.registry.transaction((tx) =>
      tx.replicaAdopt(row.clientId, this.instance, why)
    );
  }

  async release(clientId: string): Promise<void> {
    await this.registry.transaction((tx) => tx.replicaReleaseAdoption(clientId, this.instance))
      .catch(() => {});
  }

  /** A clean stop: the lease ends now (the sweeper adopts the session at once). */
  async leave(): Promise<void> {
    await this.lock?.release().catch(() => {});
    this.lock = undefined;
    await this.registry.transaction((tx) => tx.replicaLeave(this.clientId, this.instance))
      .catch(() => {});
  }

  /** Tests only: the lock's connection goes as in a crash (nothing written). */
  async crash(): Promise<void> {
    await this.lock?.release().catch(() => {});
  }

  isLeader(): boolean {
    return this.lock?.held() === true;
  }
}
