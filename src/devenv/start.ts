/**
 * `devenv start`: brings the whole stack up, idempotently, by running the component table
 * (`components.ts`) as a dependency graph: each component starts as soon as what it needs is
 * ready, independent ones in parallel. A healthy daemon is left alone, a dead or unhealthy one
 * is (re)started, and every start waits on the component's real readiness probe. Everything is
 * started detached (its own session), with a pid file and a log in `.dev-env/`, so closing the
 * terminal does not stop the stack.
 */
import { dirname, join } from "node:path";
import { caFiles } from "../ca/mod.ts";
import { CliError, UsageError } from "../cli/errors.ts";
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
  type DevenvState,
  knownRobots,
  PROBE_INTERVAL_MS,
  readState,
  robotLayouts,
  type StackMode,
  writeState,
} from "./context.ts";
import { writeFileAtomic } from "../fs/atomic.ts";
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
      await stopPidFile(pidFile, 10_000, c.stopSignal);
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

/**
 * The mode of a stack without a state file, from its SPIRE data (an older devenv, or a
 * restored backup): a SQLite datastore is a one-server stack, under the root CA when that is
 * there; PostgreSQL's cluster is an HA stack. Undefined when there is no SPIRE data yet.
 */
function modeFromData(ctx: DevenvContext): StackMode | undefined {
  const exists = (p: string) => {
    try {
      Deno.statSync(p);
      return true;
    } catch {
      return false;
    }
  };
  const rootCa = exists(caFiles(ctx.layout.caDir).upstreamCert);
  if (exists(join(ctx.layout.ha.postgresDataDir, "PG_VERSION"))) return { ha: true, rootCa };
  if (exists(join(ctx.layout.spireServerDataDir, "datastore.sqlite3"))) {
    return { ha: false, rootCa };
  }
  return undefined;
}

/**
 * The stack's mode: the saved one, plus what the flags ask for. `--ha` implies `--root-ca`
 * (two servers with one stable bundle). A stack with SPIRE data keeps its datastore and CA:
 * asking for another mode is a usage error that says how to start over.
 */
export function resolveMode(
  ctx: DevenvContext,
  prev: DevenvState | undefined,
  opts: Pick<StartOptions, "ha" | "rootCa">,
): StackMode {
  const saved = prev?.mode ?? modeFromData(ctx);
  const want: StackMode = {
    ha: opts.ha === true || saved?.ha === true,
    rootCa: opts.rootCa === true || opts.ha === true || saved?.rootCa === true,
  };
  if (saved && (want.ha !== saved.ha || want.rootCa !== saved.rootCa)) {
    const flag = want.ha !== saved.ha ? "--ha" : "--root-ca";
    throw new UsageError(
      `devenv start ${flag}: this stack in ${ctx.layout.root} runs without it (its SPIRE ` +
        `datastore and CA exist)`,
      "start over with `k8s4r devenv clean` (deletes all dev state), then start again",
    );
  }
  return want;
}

export async function devenvStart(ctx: DevenvContext, opts: StartOptions): Promise<number> {
  const { io, layout, files } = ctx;
  const color = colorEnabled(io);
  const progress = new Progress(io.stdout, color, color);
  const say = (s: string) => io.stdout.write(s + "\n");
  const prev = readState(ctx);
  // The SPIRE server's bind address and the broker's listeners are fixed while they run.
  // (On the HA stack: haproxy's frontend; its SPIRE servers stay on loopback.)
  const running = [files.spireServerPid, files.haproxyPid, files.mosquittoPid].some((p) =>
    isRecordAlive(readPidFile(p))
  );
  if (running && prev && (prev.advertise ?? "") !== (opts.advertise ?? "")) {
    throw new CliError(
      `the stack runs ${
        prev.advertise ? `with --advertise ${prev.advertise}` : "on loopback only"
      }; a different --advertise needs a restart of SPIRE and the broker`,
      1,
      `k8s4r devenv stop && k8s4r devenv start${
        opts.advertise ? ` --advertise ${opts.advertise}` : ""
      }`,
    );
  }
  if (running && prev && !prev.attestation && opts.x509pop) {
    throw new CliError(
      "the SPIRE server runs without the x509pop attestor",
      1,
      "k8s4r devenv stop && k8s4r devenv start --attestation x509pop",
    );
  }
  await Deno.mkdir(layout.devEnvDir, { recursive: true, mode: 0o700 });
  await Deno.chmod(layout.devEnvDir, 0o700);
  await Deno.mkdir(files.tokensDir, { recursive: true, mode: 0o700 });
  await Deno.chmod(files.tokensDir, 0o700);

  const mode = resolveMode(ctx, prev, opts);
  opts = { ...opts, mode };
  say(
    `Starting the k8s4r dev stack in ${layout.root} (robots: ${opts.robots.join(", ") || "none"}${
      mode.ha ? "; HA: PostgreSQL, 2 SPIRE servers behind haproxy" : ""
    }${mode.rootCa ? "; SPIRE's CA under the root CA" : ""}${
      opts.advertise ? `; serving robots on other hosts at ${opts.advertise}` : ""
    }${opts.x509pop ? "; x509pop attestation with a dev factory CA" : ""})`,
  );
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
    mode,
    advertise: opts.advertise,
    attestation: opts.x509pop ? "x509pop" : undefined,
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
