/**
 * Output is kept apart from checking: `renderHuman` for people (like `flutter doctor`),
 * `renderJson` for machines. Both are pure functions of a `Report`.
 */
import type { Status } from "./check.ts";
import type { Report } from "./runner.ts";

export const SYMBOLS: Record<Status, string> = {
  ok: "✓",
  warn: "!",
  fail: "✗",
  skip: "-",
  crash: "☠",
};

const COLORS: Record<Status, string> = {
  ok: "\x1b[32m", // green
  warn: "\x1b[33m", // yellow
  fail: "\x1b[31m", // red
  skip: "\x1b[90m", // grey
  crash: "\x1b[35m", // magenta
};
const RESET = "\x1b[0m";
const BOLD = "\x1b[1m";
const DIM = "\x1b[2m";

export interface HumanOptions {
  color: boolean;
  verbose: boolean;
}

export function renderHuman(report: Report, opts: HumanOptions): string {
  const c = (code: string, s: string) => (opts.color ? `${code}${s}${RESET}` : s);
  const lines: string[] = [];
  let group = "";
  for (const r of report.checks) {
    if (r.group !== group) {
      if (group) lines.push("");
      group = r.group;
      lines.push(c(BOLD, `[${group}]`));
    }
    const time = opts.verbose ? c(DIM, ` (${r.ms} ms)`) : "";
    lines.push(`${c(COLORS[r.status], SYMBOLS[r.status])} ${r.title}${time}`);
    lines.push(`    ${r.detail}`);
    if (r.hint && r.status !== "ok") lines.push(`    ${c(COLORS[r.status], "hint:")} ${r.hint}`);
    if (opts.verbose) { for (const i of r.info ?? []) lines.push(c(DIM, `      ${i}`)); }
  }
  const s = report.summary;
  if (lines.length) lines.push("");
  lines.push(
    `${s.ok} ok, ${s.warn} warnings, ${s.fail} failed, ${s.skip} skipped, ${s.crash} crashed in ${report.ms} ms`,
  );
  return lines.join("\n") + "\n";
}

/** Exactly `{"checks":[{id,group,title,status,detail,hint,ms}],"summary":{ok,warn,fail,skip,crash}}`. */
export function renderJson(report: Report): string {
  return JSON.stringify({
    checks: report.checks.map((r) => ({
      id: r.id,
      group: r.group,
      title: r.title,
      status: r.status,
      detail: r.detail,
      hint: r.hint ?? null,
      ms: r.ms,
    })),
    summary: {
      ok: report.summary.ok,
      warn: report.summary.warn,
      fail: report.summary.fail,
      skip: report.summary.skip,
      crash: report.summary.crash,
    },
  }) + "\n";
}
