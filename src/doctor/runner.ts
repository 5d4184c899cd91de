/**
 * Runs checks concurrently. Every check starts at once; one that depends on another awaits that
 * check's promise (so independent checks never wait for each other), and is skipped when the
 * dependency failed, was skipped or crashed. Each check has its own timeout, a thrown error
 * becomes `crash`, and results come back in the declared order whatever order they finish in.
 */
import { errorMessage } from "../cli/errors.ts";
import type { Check, CheckResult, DoctorContext, Status } from "./check.ts";

export interface CheckOutcome extends CheckResult {
  id: string;
  group: string;
  title: string;
  /** Time the check itself took (after its dependencies), rounded. */
  ms: number;
}

export interface Summary {
  ok: number;
  warn: number;
  fail: number;
  skip: number;
  crash: number;
}

export interface Report {
  checks: CheckOutcome[];
  summary: Summary;
  /** Wall time of the whole run. */
  ms: number;
}

export interface RunOptions {
  /** Default per-check timeout. */
  timeoutMs: number;
  /**
   * Wall-clock budget for the whole run. A check that starts late (after a dependency) gets only
   * what is left (but at least 100 ms), so a chain of slow checks cannot add up.
   */
  budgetMs?: number;
  now?: () => number;
}

const BLOCKING: ReadonlySet<Status> = new Set(["fail", "skip", "crash"]);

export async function runChecks(
  checks: Check[],
  ctx: DoctorContext,
  opts: RunOptions,
): Promise<Report> {
  const now = opts.now ?? (() => performance.now());
  const start = now();
  const budget = opts.budgetMs ?? opts.timeoutMs + 1000;
  const byId = new Map<string, Promise<CheckOutcome>>();
  const ids = new Set(checks.map((c) => c.id));
  const seen = new Set<string>();
  for (const c of checks) {
    if (seen.has(c.id)) throw new Error(`duplicate check id ${c.id}`);
    seen.add(c.id);
  }

  const runOne = async (check: Check, chain: string[]): Promise<CheckOutcome> => {
    // Dependencies outside the selected set (--only) are ignored: each check is self-contained.
    for (const dep of check.dependsOn ?? []) {
      if (!ids.has(dep)) continue;
      if (chain.includes(dep)) {
        return outcome(check, { status: "crash", detail: `dependency cycle via ${dep}` }, 0);
      }
      const d = await get(dep, [...chain, check.id]);
      if (BLOCKING.has(d.status)) {
        const verb = d.status === "skip"
          ? "was skipped"
          : d.status === "fail"
          ? "failed"
          : "crashed";
        return outcome(check, { status: "skip", detail: `skipped: ${dep} ${verb}` }, 0);
      }
    }
    const remaining = budget - (now() - start);
    const timeoutMs = Math.min(check.timeoutMs ?? opts.timeoutMs, Math.max(100, remaining));
    const ac = new AbortController();
    const t0 = now();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<CheckResult>((resolve) => {
      timer = setTimeout(() => {
        ac.abort(new Error(`timed out after ${Math.round(timeoutMs)} ms`));
        resolve({ status: "fail", detail: `timed out after ${Math.round(timeoutMs)} ms` });
      }, timeoutMs);
    });
    let result: CheckResult;
    try {
      const work = Promise.resolve().then(() =>
        check.run({ ...ctx, signal: ac.signal, timeoutMs })
      );
      result = await Promise.race([work, timeout]);
      work.catch(() => {}); // a late rejection after a timeout is not unhandled
    } catch (err) {
      result = { status: "crash", detail: errorMessage(err) };
    } finally {
      clearTimeout(timer);
    }
    if (!isResult(result)) result = { status: "crash", detail: "check returned no result" };
    return outcome(check, result, now() - t0);
  };

  const byCheck = new Map(checks.map((c) => [c.id, c]));
  const get = (id: string, chain: string[]): Promise<CheckOutcome> => {
    let p = byId.get(id);
    if (!p) {
      p = runOne(byCheck.get(id)!, chain);
      byId.set(id, p);
    }
    return p;
  };

  const outcomes = await Promise.all(checks.map((c) => get(c.id, [])));
  const summary: Summary = { ok: 0, warn: 0, fail: 0, skip: 0, crash: 0 };
  for (const o of outcomes) summary[o.status]++;
  return { checks: outcomes, summary, ms: Math.round(now() - start) };
}

function isResult(r: unknown): r is CheckResult {
  return typeof r === "object" && r !== null && typeof (r as CheckResult).status === "string" &&
    ["ok", "warn", "fail", "skip", "crash"].includes((r as CheckResult).status);
}

function outcome(check: Check, r: CheckResult, ms: number): CheckOutcome {
  return {
    id: check.id,
    group: check.group,
    title: check.title,
    status: r.status,
    detail: r.detail,
    ...(r.hint !== undefined ? { hint: r.hint } : {}),
    ...(r.info?.length ? { info: r.info } : {}),
    ms: Math.round(ms),
  };
}

/** 0 when nothing failed or crashed. */
export function exitCode(report: Report): number {
  return report.summary.fail + report.summary.crash > 0 ? 1 : 0;
}
