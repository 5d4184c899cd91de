/**
 * Small statistics for benchmark figures: median, percentiles (linear interpolation between
 * closest ranks, as numpy's default), spread. Pure functions; unit-tested in stats_test.ts.
 */

export interface Summary {
  /** How many values (runs or samples) the summary is made of. */
  n: number;
  median: number;
  min: number;
  max: number;
  p10: number;
  p90: number;
  p99: number;
  mean: number;
}

/** The q-th percentile (0..100) of `values`, linearly interpolated. Throws on an empty list. */
export function percentile(values: readonly number[], q: number): number {
  if (values.length === 0) throw new RangeError("percentile of an empty list");
  if (!(q >= 0 && q <= 100)) throw new RangeError(`percentile: q must be in [0, 100], got ${q}`);
  for (const v of values) {
    if (!Number.isFinite(v)) throw new RangeError(`percentile: non-finite value ${v}`);
  }
  const s = [...values].sort((a, b) => a - b);
  const pos = (s.length - 1) * (q / 100);
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return s[lo] + (s[hi] - s[lo]) * (pos - lo);
}

export function median(values: readonly number[]): number {
  return percentile(values, 50);
}

export function mean(values: readonly number[]): number {
  if (values.length === 0) throw new RangeError("mean of an empty list");
  return values.reduce((a, b) => a + b, 0) / values.length;
}

export function summarize(values: readonly number[]): Summary {
  if (values.length === 0) throw new RangeError("summarize: no values");
  return {
    n: values.length,
    median: percentile(values, 50),
    min: Math.min(...values),
    max: Math.max(...values),
    p10: percentile(values, 10),
    p90: percentile(values, 90),
    p99: percentile(values, 99),
    mean: mean(values),
  };
}

/** Rounds to a number of significant digits that reads well in a table (3 by default). */
export function round(v: number, digits = 3): number {
  if (v === 0 || !Number.isFinite(v)) return v;
  const mag = Math.floor(Math.log10(Math.abs(v)));
  const f = 10 ** Math.max(0, digits - 1 - mag);
  return Math.round(v * f) / f;
}

/**
 * Rate of a monotonically growing counter over [from, to] from timestamped samples
 * (`{t: ms, count}`), using the samples closest inside the window. Undefined when fewer than two
 * samples fall inside or no time passed.
 */
export function rateInWindow(
  samples: readonly { t: number; count: number }[],
  from: number,
  to: number,
): number | undefined {
  const inside = samples.filter((s) => s.t >= from && s.t <= to);
  if (inside.length < 2) return undefined;
  const a = inside[0];
  const b = inside[inside.length - 1];
  const dt = (b.t - a.t) / 1000;
  return dt > 0 ? (b.count - a.count) / dt : undefined;
}
