/**
 * The test runner behind `deno task test`: every suite, test files in parallel, each file in its
 * own `deno test` process.
 *
 * - unit: every `*_test.ts` under src/, bench/ and tests/chaos/, in ONE process (they share
 *   nothing and start no daemons);
 * - integration: each `tests/*_test.ts` in its own process;
 * - e2e: each `tests/e2e/*_test.ts` in its own process (each builds its own stack in a temp dir
 *   on free ports, so they share nothing either).
 *
 * Why separate processes: a file that crashes its runtime (Deno 2.9.6 has segfaulted on this
 * machine) or hangs takes only itself down, and files that mostly wait (on SPIRE, on timeouts)
 * overlap. The longest files start first (their durations from the previous run are kept in
 * `${XDG_CACHE_HOME:-~/.cache}/k8s4r/test-durations.json`), so the pool packs well.
 *
 * Each file's output goes to a log under the log dir; failures print the log's tail. A process
 * that ends without `deno test`'s summary line counts as one failure, with its exit code. The
 * last line is `N passed, M failed`.
 *
 *   deno task test [--jobs N] [--suite unit|integration|e2e]... [--log-dir DIR] [FILE...]
 *
 * Type checking is `deno task check`'s job; the files run with --no-check (it is cached anyway).
 */
import { parseArgs } from "node:util";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..");
type Suite = "unit" | "integration" | "e2e";
const SUITES: readonly Suite[] = ["unit", "integration", "e2e"];

interface Job {
  name: string;
  suite: Suite;
  files: string[];
}

interface Outcome {
  job: Job;
  passed: number;
  failed: number;
  ms: number;
  code: number;
  log: string;
  /** Set when the process gave no summary line (crash, hang, killed). */
  crashed?: string;
}

function* walk(dir: string): Generator<string> {
  let entries: Deno.DirEntry[];
  try {
    entries = [...Deno.readDirSync(dir)];
  } catch {
    return;
  }
  for (const e of entries.sort((a, b) => a.name.localeCompare(b.name))) {
    if (e.name === "node_modules" || e.name.startsWith(".")) continue;
    const p = join(dir, e.name);
    if (e.isDirectory) yield* walk(p);
    else if (e.isFile && e.name.endsWith("_test.ts")) yield p;
  }
}

export function discover(root = REPO): Job[] {
  const rel = (p: string) => relative(root, p);
  const unit = [
    ...walk(join(root, "src")),
    ...walk(join(root, "bench")),
    ...walk(join(root, "scripts")),
    ...walk(join(root, "tests", "chaos")),
  ].map(rel);
  const integration = [...Deno.readDirSync(join(root, "tests"))]
    .filter((e) => e.isFile && e.name.endsWith("_test.ts"))
    .map((e) => `tests/${e.name}`)
    .sort();
  const e2e = [...walk(join(root, "tests", "e2e"))].map(rel);
  return [
    { name: "unit (src/, bench/, scripts/, tests/chaos/)", suite: "unit", files: unit },
    ...integration.map((f): Job => ({ name: f, suite: "integration", files: [f] })),
    ...e2e.map((f): Job => ({ name: f, suite: "e2e", files: [f] })),
  ];
}

/** The counts of `deno test`'s summary line ("ok | 12 passed (3 steps) | 0 failed (2s)"). */
export function parseSummary(text: string): { passed: number; failed: number } | undefined {
  // deno prints ANSI colours unless NO_COLOR is set; strip them anyway.
  // deno-lint-ignore no-control-regex
  const plain = text.replace(/\x1b\[[0-9;]*m/g, "");
  const lines = plain.split("\n").filter((l) => /^(ok|FAILED) \| \d+ passed/.test(l));
  const last = lines.at(-1);
  if (!last) return undefined;
  const passed = Number(/\| (\d+) passed/.exec(last)![1]);
  const failed = Number(/\| (\d+) failed/.exec(last)?.[1] ?? "0");
  return { passed, failed };
}

function cacheFile(): string {
  const base = Deno.env.get("XDG_CACHE_HOME") ?? join(Deno.env.get("HOME") ?? "/tmp", ".cache");
  return join(base, "k8s4r", "test-durations.json");
}

function readDurations(): Record<string, number> {
  try {
    return JSON.parse(Deno.readTextFileSync(cacheFile()));
  } catch {
    return {};
  }
}

async function runJob(job: Job, logDir: string, timeoutMs: number): Promise<Outcome> {
  const log = join(logDir, job.name.replace(/[^A-Za-z0-9._-]+/g, "_") + ".log");
  const file = await Deno.open(log, { write: true, create: true, truncate: true });
  const t0 = performance.now();
  const child = new Deno.Command("deno", {
    args: ["test", "-A", "--no-check", ...job.files],
    cwd: REPO,
    env: { NO_COLOR: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const sink = file.writable.getWriter();
  const pump = async (s: ReadableStream<Uint8Array>) => {
    for await (const chunk of s) await sink.write(chunk);
  };
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      child.kill("SIGKILL");
    } catch { /* gone */ }
  }, timeoutMs);
  const [status] = await Promise.all([child.status, pump(child.stdout), pump(child.stderr)]);
  clearTimeout(timer);
  await sink.close();
  const ms = performance.now() - t0;
  const text = await Deno.readTextFile(log);
  const summary = parseSummary(text);
  const code = status.signal ? 128 + (status.signal === "SIGKILL" ? 9 : 0) : status.code;
  if (!summary) {
    const why = timedOut
      ? `killed after ${Math.round(timeoutMs / 1000)} s without finishing`
      : status.signal
      ? `the deno process died of ${status.signal}`
      : `the deno process exited ${status.code} without a summary line`;
    return { job, passed: 0, failed: 1, ms, code, log, crashed: why };
  }
  return { job, ...summary, ms, code, log };
}

function tail(text: string, n: number): string {
  return text.split("\n").slice(-n).join("\n");
}

export async function main(argv: string[]): Promise<number> {
  let v;
  try {
    v = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        jobs: { type: "string" },
        suite: { type: "string", multiple: true },
        "log-dir": { type: "string" },
        "timeout-minutes": { type: "string" },
        help: { type: "boolean" },
      },
    });
  } catch (err) {
    console.error(`run_tests: ${(err as Error).message}`);
    return 2;
  }
  if (v.values.help) {
    console.log(
      "Usage: deno task test [--jobs N] [--suite unit|integration|e2e]... [--log-dir DIR] [FILE...]",
    );
    return 0;
  }
  const jobsFlag = v.values.jobs ?? Deno.env.get("K8S4R_TEST_JOBS") ?? "4";
  const jobs = Number(jobsFlag);
  if (!Number.isInteger(jobs) || jobs < 1) {
    console.error(`run_tests: --jobs: expected a positive integer, got '${jobsFlag}'`);
    return 2;
  }
  const suites = (v.values.suite ?? []) as string[];
  for (const s of suites) {
    if (!(SUITES as readonly string[]).includes(s)) {
      console.error(`run_tests: --suite: expected one of ${SUITES.join(", ")}, got '${s}'`);
      return 2;
    }
  }
  const timeoutMs = Number(v.values["timeout-minutes"] ?? "20") * 60_000;
  let all = discover();
  if (v.positionals.length > 0) {
    const wanted = new Set(v.positionals.map((p) => relative(REPO, resolve(p))));
    all = all.flatMap((j) => {
      const files = j.files.filter((f) => wanted.has(f));
      return files.length
        ? [{ ...j, files, name: j.suite === "unit" ? files.join(" ") : j.name }]
        : [];
    });
  }
  if (suites.length > 0) all = all.filter((j) => suites.includes(j.suite));
  if (all.length === 0) {
    console.error("run_tests: no test files matched");
    return 2;
  }
  const logDir = v.values["log-dir"] ??
    await Deno.makeTempDir({ prefix: "k8s4r-test-logs-" });
  await Deno.mkdir(logDir, { recursive: true });
  const durations = readDurations();
  // Longest first; files never timed go first too (they may be long).
  const queue = [...all].sort((a, b) =>
    (durations[b.name] ?? Infinity) - (durations[a.name] ?? Infinity)
  );
  const t0 = performance.now();
  console.log(
    `running ${all.length} test processes, ${jobs} at a time; logs in ${logDir}`,
  );
  const outcomes: Outcome[] = [];
  const worker = async () => {
    while (queue.length > 0) {
      const job = queue.shift()!;
      const o = await runJob(job, logDir, timeoutMs);
      outcomes.push(o);
      const verdict = o.crashed ? "CRASH" : o.failed > 0 ? "FAIL" : "ok";
      console.log(
        `${verdict.padEnd(5)} ${job.name.padEnd(40)} ${String(o.passed).padStart(4)} passed ${
          String(o.failed).padStart(3)
        } failed  ${(o.ms / 1000).toFixed(1).padStart(6)} s${o.crashed ? `  (${o.crashed})` : ""}`,
      );
    }
  };
  await Promise.all(Array.from({ length: Math.min(jobs, all.length) }, worker));
  const wall = performance.now() - t0;
  for (const o of outcomes) durations[o.job.name] = Math.round(o.ms);
  try {
    await Deno.mkdir(dirname(cacheFile()), { recursive: true });
    await Deno.writeTextFile(cacheFile(), JSON.stringify(durations, null, 2) + "\n");
  } catch { /* a cache only */ }
  const bad = outcomes.filter((o) => o.failed > 0 || o.crashed);
  for (const o of bad) {
    console.log(`\n---- ${o.job.name}: ${o.crashed ?? `${o.failed} failed`} (log: ${o.log})`);
    const text = await Deno.readTextFile(o.log);
    // deno test prints the failures' details between " ERRORS " and " FAILURES ".
    const i = text.indexOf(" ERRORS ");
    console.log(i >= 0 ? text.slice(i, i + 20_000) : tail(text, 60));
  }
  const passed = outcomes.reduce((n, o) => n + o.passed, 0);
  const failed = outcomes.reduce((n, o) => n + o.failed, 0);
  const sum = outcomes.reduce((n, o) => n + o.ms, 0);
  console.log(
    `\n${outcomes.length} processes in ${(wall / 1000).toFixed(0)} s wall (${
      (sum / 1000).toFixed(0)
    } s if run one after another)`,
  );
  console.log(`${passed} passed, ${failed} failed`);
  return failed > 0 ? 1 : 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
