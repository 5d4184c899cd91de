/**
 * `devenv stop` and `devenv clean`. Stop acts only on pids from devenv's own pid files, checked to
 * still be the process devenv started (`stopPidFile`), in the stop order of the component table
 * (each row's `stopRank`; equal ranks, e.g. the agents, stop together). The SPIRE
 * agents are children of the k8s4r agents and of broker-identity (non-detached, with a parent
 * death signal); stop records each component's descendants before stopping it and verifies that
 * they are gone afterwards, ending any survivor whose start time it recorded.
 */
import { join } from "node:path";
import { errorMessage } from "../cli/errors.ts";
import {
  isRecordAlive,
  processStartTime,
  readPidFile,
  stopPid,
  stopPidFile,
  waitFor,
} from "../process/mod.ts";
import { dockerRemoveArgv } from "./broker_argv.ts";
import { savedBrokerCommand } from "./broker.ts";
import { devenvComponents, stackView } from "./components.ts";
import { type DevenvContext, knownRobots, readState, robotLayouts } from "./context.ts";

export interface ProcInfo {
  pid: number;
  startTime: number;
}

/** Parent pid of a process, from /proc/PID/stat. */
function parentPid(pid: number): number | undefined {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
  } catch {
    return undefined;
  }
}

/** Every live descendant of `pid`, with start times (so a reused pid is never touched). */
export function descendants(pid: number): ProcInfo[] {
  const children = new Map<number, number[]>();
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    const p = Number(e.name);
    const pp = parentPid(p);
    if (pp === undefined) continue;
    if (!children.has(pp)) children.set(pp, []);
    children.get(pp)!.push(p);
  }
  const out: ProcInfo[] = [];
  const queue = [...(children.get(pid) ?? [])];
  while (queue.length) {
    const p = queue.shift()!;
    const st = processStartTime(p);
    if (st === undefined) continue;
    out.push({ pid: p, startTime: st });
    queue.push(...(children.get(p) ?? []));
  }
  return out;
}

export interface StopTarget {
  name: string;
  pidFile: string;
  stopRank: number;
  /** The first signal (default SIGTERM). */
  signal?: Deno.Signal;
}

/** Every daemon of the table, in stop order (lowest rank first; the table's order within). */
export function stopOrder(ctx: DevenvContext): StopTarget[] {
  return devenvComponents(stackView(ctx))
    .flatMap((c) =>
      c.kind === "daemon" && c.pidFile
        ? [{ name: c.name, pidFile: c.pidFile, stopRank: c.stopRank ?? 0, signal: c.stopSignal }]
        : []
    )
    .map((t, i) => ({ t, i }))
    .sort((a, b) => a.t.stopRank - b.t.stopRank || a.i - b.i)
    .map(({ t }) => t);
}

/** Stops one component and verifies its children died with it. Returns a one-line report. */
export async function stopComponent(
  t: Pick<StopTarget, "name" | "pidFile" | "signal">,
  graceMs = 10_000,
): Promise<string> {
  const rec = readPidFile(t.pidFile);
  const kids = rec && isRecordAlive(rec) ? descendants(rec.pid) : [];
  const how = await stopPidFile(t.pidFile, graceMs, t.signal);
  const alive = (k: ProcInfo) => processStartTime(k.pid) === k.startTime;
  let orphans = 0;
  if (kids.length) {
    await waitFor(() => !kids.some(alive), { timeoutMs: graceMs, intervalMs: 50 }).catch(() => {});
    for (const k of kids.filter(alive)) {
      orphans++;
      await stopPid(k.pid, k.startTime, 3000);
    }
  }
  const what = how === "not-running" ? "not running" : `${how} (pid ${rec!.pid})`;
  const kidText = kids.length
    ? `, ${kids.length} child process(es) ${
      orphans ? `gone after ${orphans} had to be stopped` : "gone with it"
    }`
    : "";
  return `${t.name}: ${what}${kidText}`;
}

export async function devenvStop(ctx: DevenvContext): Promise<number> {
  const { io } = ctx;
  let failures = 0;
  // Reporting must never keep stop from stopping: a closed stdout (`| head`) is ignored.
  const report = (w: { write(s: string): void }, line: string) => {
    try {
      w.write(line + "\n");
    } catch { /* nobody is reading */ }
  };
  const order = stopOrder(ctx);
  const ranks = [...new Set(order.map((t) => t.stopRank))];
  for (const rank of ranks) {
    const group = order.filter((t) => t.stopRank === rank);
    const results = await Promise.allSettled(group.map((t) => stopComponent(t)));
    results.forEach((r, i) => {
      if (r.status === "fulfilled") return report(io.stdout, r.value);
      failures++;
      report(io.stderr, `${group[i].name}: ${errorMessage(r.reason)}`);
    });
  }
  // Docker mode: the container goes with its `docker run` client (--rm); make sure of it.
  const cmd = savedBrokerCommand(ctx);
  if (cmd?.mode === "docker" && cmd.container) {
    await io.runner.output(cmd.cmd, ["stop", cmd.container], { check: false, timeoutMs: 30_000 })
      .catch(() => {});
  }
  return failures ? 1 : 0;
}

async function removeIfExists(path: string, recursive = false): Promise<boolean> {
  try {
    await Deno.remove(path, { recursive });
    return true;
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return false;
    throw err;
  }
}

/** `stop`, then delete `.dev-env/`, `.spire-data/`, the sockets devenv made, the exported CA. */
export async function devenvClean(ctx: DevenvContext): Promise<number> {
  const { io, layout, files } = ctx;
  const code = await devenvStop(ctx);
  if (code !== 0) {
    io.stderr.write("clean: stop reported failures; state is kept so you can retry\n");
    return code;
  }
  const state = readState(ctx);
  const cmd = savedBrokerCommand(ctx);
  if (cmd?.mode === "docker" && cmd.container) {
    await io.runner.output(cmd.cmd, dockerRemoveArgv(cmd.container), {
      check: false,
      timeoutMs: 30_000,
    })
      .catch(() => {});
    io.stdout.write(`removed container ${cmd.container}\n`);
  }
  // Sockets: only the ones of this stack, and their directories only if devenv created them.
  const sockets = [
    ...robotLayouts(ctx, knownRobots(ctx)).map((r) => r.agentSocket),
    files.brokerAgentSocket,
  ];
  for (const s of sockets) {
    if (await removeIfExists(s)) io.stdout.write(`removed ${s}\n`);
  }
  const created = [...(state?.createdSocketDirs ?? [])].sort((a, b) => b.length - a.length);
  for (const d of created) {
    try {
      await Deno.remove(d); // only when empty: never another stack's sockets
      io.stdout.write(`removed ${d}/\n`);
    } catch { /* not empty or gone */ }
  }
  for (const p of [layout.caBundleFile]) {
    if (await removeIfExists(p)) io.stdout.write(`removed ${p}\n`);
  }
  for (const d of [layout.spireDataDir, layout.devEnvDir]) {
    if (await removeIfExists(d, true)) io.stdout.write(`removed ${d}/\n`);
  }
  // The generated certs directory, if that file was all it held.
  await Deno.remove(join(layout.caBundleFile, "..")).catch(() => {});
  return 0;
}
