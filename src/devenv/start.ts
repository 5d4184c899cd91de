/**
 * `devenv start`: brings the whole stack up, idempotently, by running the component table
 * (`components.ts`) as a dependency graph: each component starts as soon as what it needs is
 * ready, independent ones in parallel. A healthy daemon is left alone, a dead or unhealthy one
 * is (re)started, and every start waits on the component's real readiness probe. Everything is
 * started detached (its own session), with a pid file and a log in `.dev-env/`, so closing the
 * terminal does not stop the stack.
 */
import { dirname } from "node:path";
import { CliError } from "../cli/errors.ts";
import { colorEnabled } from "../cli/io.ts";
import { isRecordAlive, readPidFile, stopPidFile, waitFor } from "../process/mod.ts";
import {
  type Component,
  devenvComponents,
  needName,
  type StartOptions,
  StartRun,
} from "./components.ts";
import {
  type DevenvContext,
  knownRobots,
  PROBE_INTERVAL_MS,
  readState,
  robotLayouts,
  writeFileAtomic,
  writeState,
} from "./context.ts";
import { runGraph, SkippedError } from "./graph.ts";
import type { ProbeResult } from "./probes.ts";
import { Progress, renderTable } from "./render.ts";
import { collectStatus } from "./status.ts";

export type { StartOptions };

/** How long a running daemon may take to pass its probe before it is replaced. */
const GRACE_MS = 10_000;

/** The common "leave healthy alone, restart the rest" logic, for one daemon row. */
async function ensureDaemon(c: Component, run: StartRun): Promise<string> {
  const pidFile = c.pidFile!;
  const rec = readPidFile(pidFile);
  let why = "";
  if (rec && isRecordAlive(rec)) {
    if (c.awaitRunning) return `running (pid ${rec.pid}), ${await c.awaitRunning(run)}`;
    // Give a component that is still coming up a moment to pass its probe before replacing it.
    let last: ProbeResult = { ok: false, detail: "" };
    try {
      await waitFor(async () => (last = await c.probe!(run)).ok, {
        timeoutMs: GRACE_MS,
        intervalMs: PROBE_INTERVAL_MS,
        signal: run.ctx.io.signal,
        what: `${c.name} to be healthy`,
      });
      return `already running (pid ${rec.pid})`;
    } catch {
      if (run.ctx.io.signal.aborted) throw run.ctx.io.signal.reason;
      why = `unhealthy (${last.detail}), `;
      await stopPidFile(pidFile, 10_000);
    }
  } else if (rec) {
    why = `pid ${rec.pid} was gone, `;
  }
  const d = await c.spawn!(run);
  return `${why}${why ? "restarted" : "started"} (pid ${d.pid})`;
}

async function ensure(c: Component, run: StartRun): Promise<string> {
  if (c.kind === "step") return await c.run!(run);
  const go = () => ensureDaemon(c, run);
  const text = c.exclusive ? await c.exclusive(run, go) : await go();
  const extra = c.summary ? await c.summary(run) : "";
  return extra ? `${text}, ${extra}` : text;
}

export async function devenvStart(ctx: DevenvContext, opts: StartOptions): Promise<number> {
  const { io, layout, files } = ctx;
  const color = colorEnabled(io);
  const progress = new Progress(io.stdout, color, color);
  const say = (s: string) => io.stdout.write(s + "\n");
  say(
    `Starting the k8s4r dev stack in ${layout.root} (robots: ${opts.robots.join(", ")})`,
  );
  await Deno.mkdir(layout.devEnvDir, { recursive: true, mode: 0o700 });
  await Deno.chmod(layout.devEnvDir, 0o700);
  await Deno.mkdir(files.tokensDir, { recursive: true, mode: 0o700 });
  await Deno.chmod(files.tokensDir, 0o700);

  const prev = readState(ctx);
  const robots = robotLayouts(ctx, opts.robots);
  const createdSocketDirs = new Set(prev?.createdSocketDirs ?? []);
  for (const sock of [...robots.map((r) => r.agentSocket), files.brokerAgentSocket]) {
    const dir = dirname(sock);
    try {
      await Deno.stat(dir);
    } catch {
      await Deno.mkdir(dir, { recursive: true, mode: 0o755 });
      createdSocketDirs.add(dir);
    }
  }
  const allRobots = [...new Set([...(prev?.robots ?? []), ...opts.robots])];
  await writeState(ctx, {
    robots: allRobots,
    // Prometheus stays part of the stack (status, logs, stop) while it runs.
    monitoring: opts.monitoring === true ||
      (prev?.monitoring === true && isRecordAlive(readPidFile(files.prometheusPid))),
    broker: prev?.broker,
    createdSocketDirs: [...createdSocketDirs],
    env: ctx.layoutEnv,
  });

  const run = new StartRun(ctx, robots, opts);
  const table = devenvComponents(run);
  const byName = new Map(table.map((c) => [c.name, c]));
  let ok = false;
  try {
    await runGraph(
      table.map((c) => ({ name: c.name, needs: c.needs.map(needName), c })),
      (n) => progress.step(n.name, () => ensure(n.c, run)).then(() => {}),
      {
        // A conditional need is skipped when its `unless` holds (e.g. a usable broker cert).
        async needsNow(n) {
          const needs = byName.get(n.name)!.needs;
          const keep = await Promise.all(
            needs.map(async (x) => typeof x === "string" || !(await x.unless(run))),
          );
          return needs.filter((_, i) => keep[i]).map(needName);
        },
      },
    );
    ok = true;
  } catch (err) {
    const e = err instanceof SkippedError ? new CliError(err.message) : err;
    if (e instanceof CliError && !e.hint && !io.signal.aborted) {
      throw new CliError(
        e.message,
        e.exitCode,
        "what started keeps running: see `k8s4r devenv status` and `k8s4r devenv logs`; " +
          "fix the cause and run start again, or `k8s4r devenv stop`",
      );
    }
    throw e;
  } finally {
    await writeFileAtomic(
      files.timingsFile,
      JSON.stringify(
        {
          startedAt: new Date(Date.now() - progress.elapsedMs()).toISOString(),
          ok,
          totalMs: Math.round(progress.elapsedMs()),
          spire: run.timing,
          steps: progress.steps.map((s) => ({
            ...s,
            atMs: Math.round(s.atMs),
            ms: Math.round(s.ms),
          })),
        },
        null,
        2,
      ) + "\n",
      0o644,
    ).catch(() => {});
  }
  const readyMs = progress.elapsedMs();
  // The final table reuses the binaries and the bundle just exported; health is asked anew.
  run.refresh();
  const rows = await collectStatus(run.withRobots(robotLayouts(ctx, knownRobots(ctx))));
  io.stdout.write("\n" + renderTable(rows, color));
  say(
    `\nStack ready in ${(readyMs / 1000).toFixed(1)}s. ` +
      "Logs: k8s4r devenv logs -f; stop: k8s4r devenv stop",
  );
  return 0;
}
