/**
 * Bounds on what a robot's heartbeats can do to its counters. A robot chooses its `seq` (any
 * safe integer) and its `bootId`: seq 0 then Number.MAX_SAFE_INTEGER, on a new boot each time,
 * would add 2^53 missing heartbeats per pair, and after 1025 pairs the counter passes 2^63:
 * PostgreSQL refuses the UPDATE (BIGINT out of range, 22003) on every redelivery, so the batch
 * never commits and every robot's messages behind it wait forever; SQLite silently turns the
 * counter into a float. So:
 *
 * - one gap counts at most `MAX_HEARTBEAT_GAP` missing heartbeats: a year of the shortest
 *   interval the protocol allows (1 s) is more than any real outage, and a larger jump says
 *   nothing more;
 * - a counter never passes `COUNTER_CEILING` (the largest integer a JSON number or a JS number
 *   holds exactly; far below 2^63).
 */

/** At most this many heartbeats missing in one gap (366 days of 1 s heartbeats). */
export const MAX_HEARTBEAT_GAP = 366 * 24 * 3600;

/** Counters stop here (2^53 - 1). */
export const COUNTER_CEILING = Number.MAX_SAFE_INTEGER;

/** The missing heartbeats one gap counts: 0 .. MAX_HEARTBEAT_GAP. */
export function boundedGap(gap: number): number {
  if (!(gap > 0)) return 0;
  return Math.min(gap, MAX_HEARTBEAT_GAP);
}

/** `total + add`, stopping at COUNTER_CEILING (for counters computed in code). */
export function addBounded(total: number, add: number): number {
  return Math.min(COUNTER_CEILING, total + Math.max(0, add));
}

/**
 * SQL that adds `add` (>= 0) to column `col` and stops at COUNTER_CEILING, in both dialects,
 * with its parameters (in order): the value never passes the ceiling, so never 2^63 either.
 */
export function boundedIncrement(col: string, add: number): { sql: string; params: number[] } {
  const n = Math.max(0, Math.min(add, COUNTER_CEILING));
  return {
    sql: `CASE WHEN ${col} >= ? THEN ? ELSE ${col} + ? END`,
    params: [COUNTER_CEILING - n, COUNTER_CEILING, n],
  };
}
