/**
 * The fleet's events, for the dashboard's live timeline (`GET /api/events`, and the SSE stream
 * `GET /api/events/stream`): robots going online and offline, SVID rotations, refused tasks,
 * dropped messages, and the server's own broker link. Also the last heartbeats of each robot
 * (the robot page shows them with their gaps).
 *
 * Everything here is fed from what the registry committed (`Registry.onCommit`, via
 * `observeFleet`), so an event never describes a write that was rolled back, and from
 * counters polled once a second (dropped messages, the broker link), so a flood of malformed
 * messages is one event per reason per second, not one per message.
 *
 * In memory and bounded: the newest `capacity` events (ids increase, so a stream resumes with
 * `Last-Event-ID`), and `heartbeatHistory` heartbeats per robot. A restart starts empty.
 */

export type FleetEventKind =
  | "online"
  | "offline"
  | "rotation"
  | "task-refused"
  | "dropped"
  | "broker";

export interface FleetEvent {
  /** 1, 2, 3... within this server process. */
  id: number;
  at: string;
  kind: FleetEventKind;
  robotId?: string;
  /** One line for people. */
  text: string;
  /** Machine-readable details (reason, task id, counts...). */
  detail?: Record<string, unknown>;
}

export interface HeartbeatSample {
  at: string;
  seq: number;
  /** Heartbeats missing just before this one (0 when none). */
  missing: number;
  bootId: string | null;
}

export interface FleetEventsOptions {
  capacity?: number;
  heartbeatHistory?: number;
  now?: () => Date;
}

export class FleetEvents {
  readonly #capacity: number;
  readonly #hbHistory: number;
  readonly #now: () => Date;
  readonly #events: FleetEvent[] = [];
  readonly #listeners = new Set<(e: FleetEvent) => void>();
  readonly #heartbeats = new Map<string, HeartbeatSample[]>();
  /** The last SVID expiry each robot reported, to tell a rotation. */
  readonly #svid = new Map<string, string>();
  #nextId = 1;

  constructor(opts: FleetEventsOptions = {}) {
    this.#capacity = opts.capacity ?? 500;
    this.#hbHistory = opts.heartbeatHistory ?? 60;
    this.#now = opts.now ?? (() => new Date());
  }

  /** Records an event and tells every subscriber. */
  push(e: Omit<FleetEvent, "id" | "at"> & { at?: string }): FleetEvent {
    const ev: FleetEvent = { ...e, id: this.#nextId++, at: e.at ?? this.#now().toISOString() };
    this.#events.push(ev);
    if (this.#events.length > this.#capacity) {
      this.#events.splice(0, this.#events.length - this.#capacity);
    }
    for (const l of this.#listeners) {
      try {
        l(ev);
      } catch { /* a broken subscriber (a closed stream) never stops the others */ }
    }
    return ev;
  }

  /** The newest `limit` events, oldest first. */
  recent(limit = 100): FleetEvent[] {
    return this.#events.slice(-Math.max(0, limit));
  }

  /** Events after `id` still held (a resumed stream), oldest first. */
  since(id: number): FleetEvent[] {
    return this.#events.filter((e) => e.id > id);
  }

  get lastId(): number {
    return this.#nextId - 1;
  }

  /** Calls `fn` for every new event; returns the unsubscribe function. */
  subscribe(fn: (e: FleetEvent) => void): () => void {
    this.#listeners.add(fn);
    return () => this.#listeners.delete(fn);
  }

  get subscribers(): number {
    return this.#listeners.size;
  }

  /** A heartbeat the registry counted (not a duplicate). */
  heartbeat(robotId: string, h: HeartbeatSample): void {
    let list = this.#heartbeats.get(robotId);
    if (!list) this.#heartbeats.set(robotId, list = []);
    list.push(h);
    if (list.length > this.#hbHistory) list.splice(0, list.length - this.#hbHistory);
  }

  /** The robot's last heartbeats, oldest first. */
  heartbeats(robotId: string): HeartbeatSample[] {
    return [...(this.#heartbeats.get(robotId) ?? [])];
  }

  /**
   * The SVID expiry a register or heartbeat reported: a change from the one before is a
   * rotation (the first value a process hears of is not).
   */
  svidReported(robotId: string, expiresAt: string, issuedAt?: string): void {
    const prev = this.#svid.get(robotId);
    this.#svid.set(robotId, expiresAt);
    if (prev === undefined || prev === expiresAt) return;
    this.push({
      kind: "rotation",
      robotId,
      text: `${robotId} took up a new SVID, valid until ${expiresAt}`,
      detail: { previousExpiresAt: prev, expiresAt, ...(issuedAt ? { issuedAt } : {}) },
    });
  }
}

/** One Server-Sent Events frame (`id`, `event`, `data` as one JSON line). */
export function sseFrame(e: FleetEvent): string {
  return `id: ${e.id}\nevent: fleet\ndata: ${JSON.stringify(e)}\n\n`;
}
