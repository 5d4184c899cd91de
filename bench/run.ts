/**
 * `deno task bench`: runs the benchmarks in order, writes `bench/results.json` and regenerates
 * the table in `docs/BENCHMARKS.md`. Benchmarks measure; they never fail on speed. The exit code
 * is 1 only when a benchmark could not run at all.
 *
 *   deno task bench [--only NAME]... [--quick] [--robots N]
 *
 * Names: signing, startup, fleet, footprint, rotation, doctor, storage, replicas.
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { realRunner } from "../src/process/mod.ts";
import { benchDoctor } from "./doctor.ts";
import { benchFleet } from "./fleet.ts";
import { benchFootprint } from "./footprint.ts";
import { type BenchOptions, REPO } from "./lib.ts";
import {
  type BenchResult,
  type Machine,
  mergeResults,
  readResults,
  type Results,
  writeReport,
} from "./report.ts";
import { benchRotation } from "./rotation.ts";
import { benchReplicas } from "./replicas.ts";
import { benchSigning } from "./signing.ts";
import { benchStartup } from "./startup.ts";
import { benchStorage } from "./storage.ts";

type Bench = (opts: BenchOptions, result: BenchResult) => Promise<void>;

export const BENCHMARKS: Record<string, Bench> = {
  signing: benchSigning,
  startup: benchStartup,
  doctor: benchDoctor,
  footprint: benchFootprint,
  rotation: benchRotation,
  fleet: benchFleet,
  storage: benchStorage,
  replicas: benchReplicas,
};

async function machine(): Promise<Machine> {
  const cpuinfo = await Deno.readTextFile("/proc/cpuinfo").catch(() => "");
  const meminfo = await Deno.readTextFile("/proc/meminfo").catch(() => "");
  const ver = async (cmd: string, args: string[], re: RegExp) => {
    const r = await realRunner.output(cmd, args, { check: false, timeoutMs: 5000 }).catch(() =>
      undefined
    );
    return r ? re.exec(r.stdout + r.stderr)?.[1] : undefined;
  };
  return {
    cpus: navigator.hardwareConcurrency,
    cpuModel: /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1].trim() ?? "unknown CPU",
    kernel: Deno.osRelease(),
    memTotalMb: Math.round(Number(/^MemTotal:\s+(\d+)/m.exec(meminfo)?.[1] ?? 0) / 1024),
    deno: Deno.version.deno,
    mosquitto: await ver("mosquitto", ["-h"], /mosquitto version (\S+)/),
    spire: "1.13.3",
  };
}

export async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      options: {
        only: { type: "string", multiple: true },
        quick: { type: "boolean", default: false },
        robots: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
      strict: true,
    });
  } catch (err) {
    console.error(`bench: ${(err as Error).message}`);
    return 2;
  }
  const v = parsed.values;
  if (v.help) {
    console.log(
      `Usage: deno task bench [--only NAME]... [--quick] [--robots N]\nNames: ${
        Object.keys(BENCHMARKS).join(", ")
      }`,
    );
    return 0;
  }
  const only = v.only ?? [];
  for (const o of only) {
    if (!(o in BENCHMARKS)) {
      console.error(
        `bench: unknown benchmark '${o}' (expected ${Object.keys(BENCHMARKS).join(", ")})`,
      );
      return 2;
    }
  }
  const robots = v.robots !== undefined ? Number(v.robots) : v.quick ? 200 : 1000;
  if (!Number.isInteger(robots) || robots < 1 || robots > 10_000) {
    console.error(`bench: --robots expects an integer in [1, 10000], got '${v.robots}'`);
    return 2;
  }
  const t0 = performance.now();
  const log = (m: string) =>
    console.error(`[${((performance.now() - t0) / 1000).toFixed(1).padStart(6)}s] ${m}`);
  const opts: BenchOptions = { quick: v.quick ?? false, robots, log };
  const names = only.length
    ? Object.keys(BENCHMARKS).filter((n) => only.includes(n))
    : Object.keys(BENCHMARKS);
  const fresh: Results = {
    generatedAt: new Date().toISOString(),
    machine: await machine(),
    options: { quick: opts.quick, robots },
    benchmarks: {},
  };
  const ac = new AbortController();
  const onSig = () => ac.abort();
  Deno.addSignalListener("SIGINT", onSig);
  let failed = 0;
  try {
    for (const name of names) {
      if (ac.signal.aborted) break;
      const result: BenchResult = {
        name,
        ok: false,
        startedAt: new Date().toISOString(),
        durationMs: 0,
        figures: [],
        notes: [],
      };
      fresh.benchmarks[name] = result;
      const b0 = performance.now();
      log(`== ${name}`);
      try {
        await BENCHMARKS[name](opts, result);
        result.ok = true;
      } catch (err) {
        failed++;
        result.error = (err as Error).message.split("\n")[0];
        log(`${name} failed: ${result.error}`);
      }
      result.durationMs = performance.now() - b0;
      log(`== ${name} done in ${(result.durationMs / 1000).toFixed(1)} s`);
    }
  } finally {
    Deno.removeSignalListener("SIGINT", onSig);
  }
  const resultsPath = join(REPO, "bench", "results.json");
  const merged = mergeResults(only.length ? await readResults(resultsPath) : undefined, fresh);
  const docPath = join(REPO, "docs", "BENCHMARKS.md");
  await writeReport(resultsPath, docPath, merged);
  // Keep `deno fmt --check` green: the formatter aligns the generated table.
  await realRunner.output("deno", ["fmt", docPath], { check: false, timeoutMs: 60_000 }).catch(
    () => {},
  );
  log(
    `wrote bench/results.json and docs/BENCHMARKS.md (${
      ((performance.now() - t0) / 1000).toFixed(0)
    } s total)`,
  );
  for (const name of names) {
    const b = fresh.benchmarks[name];
    for (const f of b?.figures ?? []) {
      const met = f.met === undefined ? "" : f.met ? "  [target met]" : "  [target MISSED]";
      console.log(
        `${name.padEnd(9)} ${f.label}: median ${+f.median.toPrecision(
          3,
        )} ${f.unit} (n=${f.samples}, ${+f.min.toPrecision(3)}–${+f.max.toPrecision(3)})${met}`,
      );
    }
  }
  return failed ? 1 : 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
