/**
 * Doctor: wall time of `k8s4r doctor` (a fresh CLI process, as a user runs it) on a healthy
 * stack, and after `devenv stop` with everything down. Exit codes are recorded.
 */
import { type BenchOptions, BenchStack, Cleanup } from "./lib.ts";
import { type BenchResult, figure } from "./report.ts";

export async function benchDoctor(opts: BenchOptions, result: BenchResult): Promise<void> {
  const runs = opts.quick ? 3 : 5;
  const cleanup = new Cleanup();
  try {
    const stack = await BenchStack.create("k8s4r-bd-");
    cleanup.add("stack", () => stack.destroy());
    const st = await stack.start(["--timeout", "120"]);
    if (st.code !== 0) {
      throw new Error(`devenv start exited ${st.code}: ${st.stderr.trim().split("\n").pop()}`);
    }
    const run = async () => {
      const ms: number[] = [];
      const codes: number[] = [];
      let json: unknown;
      for (let i = 0; i < runs; i++) {
        const r = await stack.cli(["doctor", "--json"], 60_000);
        ms.push(r.ms);
        codes.push(r.code);
        try {
          json = JSON.parse(r.stdout);
        } catch { /* keep the last parsable report */ }
      }
      return { ms, codes, json };
    };
    await stack.cli(["--version"]); // warm the module cache
    const healthy = await run();
    await stack.stop();
    const down = await run();
    result.figures.push(
      figure(
        "doctor.healthy",
        "`k8s4r doctor`, healthy stack (wall, incl. CLI start)",
        "ms",
        healthy.ms,
        {
          target: { op: "<=", value: 1000, on: "median" },
        },
      ),
      figure("doctor.down", "`k8s4r doctor`, everything down", "ms", down.ms),
    );
    const summary = (j: unknown) => {
      const checks =
        (j as { checks?: { id: string; status: string; ms?: number; durationMs?: number }[] })
          ?.checks;
      if (!Array.isArray(checks)) return "no JSON report";
      const by: Record<string, number> = {};
      for (const c of checks) by[c.status] = (by[c.status] ?? 0) + 1;
      return Object.entries(by).map(([k, v]) => `${v} ${k}`).join(", ");
    };
    result.notes.push(
      `Healthy: exit codes ${[...new Set(healthy.codes)].join(",")}, verdicts ${
        summary(healthy.json)
      }. ` +
        `Down: exit codes ${[...new Set(down.codes)].join(",")}, verdicts ${summary(down.json)}.`,
    );
    result.details = { healthy, down };
  } finally {
    await cleanup.run(opts.log);
  }
}
