/**
 * Runs checks concurrently. Every check starts at once; one that depends on another awaits that
 * check's promise (so independent checks never wait for each other), and is skipped when the
 * dependency failed, was skipped or crashed. Each check has its own timeout, a thrown error
 * becomes `crash`, and results come back in the declared order whatever order they finish in.
 *
 * Every failure has a hint. A timeout gets the check's timeout hint; when the check names its
 * peer (the process that should have answered), the runner looks up that process in /proc and
 * says whether it is stopped (`kill -CONT PID`), a zombie, waiting on I/O, or running but mute.
 * A crash, or a failure a check left without a hint, gets a generic one.
 */
import { errorMessage } from "../cli/errors.ts";
import {
  CALL_GRACE_MS,
  type Check,
  type CheckResult,
  type DoctorContext,
  type Status,
} from "./check.ts";

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
const TIMED_OUT = Symbol("timed out");
/** Finding a peer reads /proc only; it gets this long, on top of the check's budget. */
const PEER_LOOKUP_MS = 1000;

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
    const timeout = new Promise<typeof TIMED_OUT>((resolve) => {
      timer = setTimeout(() => {
        ac.abort(new Error(`timed out after ${Math.round(timeoutMs)} ms`));
        resolve(TIMED_OUT);
      }, timeoutMs);
    });
    let result: CheckResult;
    let ms: number;
    try {
      const work = Promise.resolve().then(() =>
        check.run({ ...ctx, signal: ac.signal, timeoutMs: timeoutMs + CALL_GRACE_MS })
      );
      work.catch(() => {}); // a late rejection after a timeout is not unhandled
      const r = await Promise.race([work, timeout]);
      ms = now() - t0;
      result = r === TIMED_OUT ? await timedOut(check, ctx, timeoutMs) : r;
    } catch (err) {
      ms = now() - t0;
      result = { status: "crash", detail: errorMessage(err) };
    } finally {
      clearTimeout(timer);
    }
    if (!isResult(result)) result = { status: "crash", detail: "check returned no result" };
    return outcome(check, result, ms);
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

/** The result of a check that timed out: its timeout hint, and what its peer is doing. */
async function timedOut(check: Check, ctx: DoctorContext, timeoutMs: number): Promise<CheckResult> {
  const detail = `timed out after ${Math.round(timeoutMs)} ms`;
  let hint: string;
  try {
    hint = check.timeout.hint(ctx);
  } catch (err) {
    hint = `k8s4r doctor --only ${check.group} --verbose   # (no timeout hint: ${
      errorMessage(err)
    })`;
  }
  const peer = await within(PEER_LOOKUP_MS, () => peerState(check, ctx)).catch(() => undefined);
  if (!peer) return { status: "fail", detail, hint };
  const { pid, comm, state, where } = peer;
  const who = `${comm} (pid ${pid}) ${where}`;
  const stat = `state ${state} in /proc/${pid}/stat`;
  switch (state) {
    case "T":
      return {
        status: "fail",
        detail: `${detail}: ${who} is stopped (${stat})`,
        hint:
          `${comm} (pid ${pid}) is stopped (SIGSTOP or Ctrl-Z): kill -CONT ${pid}, then rerun k8s4r doctor`,
      };
    case "t":
      return {
        status: "fail",
        detail: `${detail}: ${who} is held by a debugger (${stat})`,
        hint:
          `${comm} (pid ${pid}) is stopped by a tracer: detach it (gdb, strace) from pid ${pid}`,
      };
    case "Z":
    case "X":
      return { status: "fail", detail: `${detail}: ${who} has exited (${stat})`, hint };
    case "D":
      return { status: "fail", detail: `${detail}: ${who} is waiting on I/O (${stat})`, hint };
    default:
      return {
        status: "fail",
        detail: `${detail}: ${who} is running (state ${state}) but did not answer`,
        hint,
      };
  }
}

async function peerState(
  check: Check,
  ctx: DoctorContext,
): Promise<{ pid: number; comm: string; state: string; where: string } | undefined> {
  const peer = check.timeout.peer?.(ctx);
  if (!peer) return undefined;
  let pid: number | undefined;
  let where: string;
  if ("unixSocket" in peer) {
    pid = await ctx.proc.unixSocketOwner(peer.unixSocket);
    where = `serving ${peer.unixSocket}`;
  } else {
    pid = (await ctx.net.listeningOwner(peer.tcpPort))?.pid;
    where = `listening on port ${peer.tcpPort}`;
  }
  if (pid === undefined) return undefined;
  const st = await ctx.proc.stat(pid);
  if (!st) return undefined;
  return { pid, comm: st.comm || peer.name, state: st.state, where };
}

/** `fn()`, or undefined when it takes longer than `ms`. */
async function within<T>(ms: number, fn: () => Promise<T>): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      fn(),
      new Promise<undefined>((r) => (timer = setTimeout(() => r(undefined), ms))),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Failures and crashes always carry a hint. */
function hintFor(check: Check, r: CheckResult): string | undefined {
  if (r.hint?.trim() || (r.status !== "fail" && r.status !== "crash")) return r.hint;
  return r.status === "crash"
    ? `k8s4r doctor --only ${check.group} --verbose   # ${check.id} crashed: a bug in the doctor; please report this detail`
    : `k8s4r doctor --only ${check.group} --verbose   # ${check.id} gave no hint: see the detail and the info lines`;
}

function outcome(check: Check, r: CheckResult, ms: number): CheckOutcome {
  const hint = hintFor(check, r);
  return {
    id: check.id,
    group: check.group,
    title: check.title,
    status: r.status,
    detail: r.detail,
    ...(hint !== undefined ? { hint } : {}),
    ...(r.info?.length ? { info: r.info } : {}),
    ms: Math.round(ms),
  };
}

/** 0 when nothing failed or crashed. */
export function exitCode(report: Report): number {
  return report.summary.fail + report.summary.crash > 0 ? 1 : 0;
}
