/** Durations as people read them, for messages: "12s", "52m", "3h 4m", "5d". */

/** "52m", "3h 4m", "12s". */
export function formatDuration(ms: number): string {
  const s = Math.round(Math.abs(ms) / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m`;
  const h = Math.floor(m / 60);
  if (h < 48) return m % 60 ? `${h}h ${m % 60}m` : `${h}h`;
  return `${Math.floor(h / 24)}d`;
}

/**
 * A duration as people write it on a command line: `600` (seconds), `90s`, `10m`, `24h`, `365d`,
 * or a sum like `1h30m`. Returns milliseconds; throws an Error saying what was expected.
 */
export function parseDuration(text: string): number {
  const t = text.trim();
  if (/^\d+$/.test(t)) return Number(t) * 1000;
  const unit: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
  const parts = [...t.matchAll(/(\d+)([smhd])/g)];
  if (!parts.length || parts.map((p) => p[0]).join("") !== t) {
    throw new Error(`expected a duration like 600, 10m, 24h or 365d, got '${text}'`);
  }
  return parts.reduce((ms, p) => ms + Number(p[1]) * unit[p[2]], 0);
}
