/**
 * Heartbeat accounting that does not depend on arrival order. With several fleet-server
 * replicas on one shared subscription, the broker hands a robot's heartbeats to whichever
 * replica is next, so seq 12 may be written before seq 11: "a seq at or below the last one is a
 * duplicate" would then count 11 as lost. Instead each robot keeps, per agent boot:
 *
 * - `max`: the highest seq received;
 * - `window`: a bitmap of the `WINDOW` seqs at and below `max` (bit i = seq `max - i` received);
 * - `low`: the lowest seq received;
 * - `lost`: seqs that left the window without having arrived (final).
 *
 * A seq inside the window is a duplicate when its bit is set, otherwise it fills its gap. Missing
 * = `lost` + the gaps still open inside the window (between `low` and `max`), so a late heartbeat
 * lowers it again. A seq older than the window cannot be told from a duplicate: it is ignored
 * (and stays counted missing). 1024 seqs: 17 min of 1 s heartbeats, 2.8 h of 10 s ones.
 */

export const WINDOW = 1024;
const MASK = (1n << BigInt(WINDOW)) - 1n;

export interface HeartbeatWindow {
  max: number;
  /** Hex, no prefix. */
  window: string;
  low: number;
  /** Left the window unseen. */
  lost: number;
}

export type HeartbeatVerdict =
  | { kind: "new"; state: HeartbeatWindow }
  | { kind: "duplicate" }
  | { kind: "too-old" };

function bits(hex: string | null | undefined): bigint {
  if (!hex) return 1n;
  try {
    return BigInt(`0x${hex}`) & MASK;
  } catch {
    return 1n;
  }
}

function popcount(x: bigint): number {
  let n = 0;
  while (x > 0n) {
    x &= x - 1n;
    n++;
  }
  return n;
}

/** The bits of the window that stand for seqs `>= low` (the ones that can be gaps). */
function span(max: number, low: number): number {
  return Math.min(WINDOW, Math.max(0, max - low) + 1);
}

/** A boot's first heartbeat. */
export function firstHeartbeat(seq: number): HeartbeatWindow {
  return { max: seq, window: "1", low: seq, lost: 0 };
}

/**
 * Applies `seq` to a boot's state (`prev`; a row written before the window existed has
 * `window` null: only `max` is known to have arrived).
 */
export function applyHeartbeat(
  prev: { max: number; window: string | null; low: number | null; lost: number },
  seq: number,
): HeartbeatVerdict {
  let w = bits(prev.window);
  const low = prev.low ?? prev.max;
  if (seq > prev.max) {
    const d = seq - prev.max;
    let lost = prev.lost;
    // Bits pushed out of the window: the seqs max-WINDOW+1 .. max-WINDOW+d (those >= low).
    const out = Math.min(d, WINDOW);
    const n = span(prev.max, low);
    // Positions (from bit 0 = max) that leave: WINDOW-out .. WINDOW-1, limited to the span.
    for (let i = WINDOW - out; i < WINDOW; i++) {
      if (i >= n) break;
      if (((w >> BigInt(i)) & 1n) === 0n) lost++;
    }
    // Seqs skipped entirely (never in the window: more than WINDOW ahead).
    if (d > WINDOW) lost += d - WINDOW;
    w = d >= WINDOW ? 1n : ((w << BigInt(d)) | 1n) & MASK;
    return {
      kind: "new",
      state: { max: seq, window: w.toString(16), low, lost },
    };
  }
  const i = prev.max - seq;
  if (i >= WINDOW) return { kind: "too-old" };
  if (((w >> BigInt(i)) & 1n) === 1n) return { kind: "duplicate" };
  w |= 1n << BigInt(i);
  return {
    kind: "new",
    state: { max: prev.max, window: w.toString(16), low: Math.min(low, seq), lost: prev.lost },
  };
}

/** Seqs between `low` and `max` not received yet (gaps a late heartbeat may still fill). */
export function openGaps(max: number, window: string | null, low: number | null): number {
  if (window === null || low === null) return 0;
  const n = span(max, low);
  const w = bits(window) & ((1n << BigInt(n)) - 1n);
  return n - popcount(w);
}
