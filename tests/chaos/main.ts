/**
 * `deno task chaos [--seed S] [--faults N] [--minutes M] [--robots R] [--control duplicate-run]`
 *
 * Runs the fault campaign (campaign.ts) on a fresh stack in a temp dir on free ports, prints
 * every invariant with its figures, and exits 0 when all hold, 1 when one does not (with the
 * seed, the schedule, the timeline of what happened, and the command that replays it), 2 on a
 * usage error. `--control duplicate-run` is the positive control of the checker on real data:
 * after the campaign it appends a second run of a task by hand, and exits 0 only if the
 * at-most-once invariant catches exactly that.
 */
import { parseArgs } from "node:util";
import { E2eStack } from "../e2e/stack.ts";
import { formatTimeline, HEARTBEAT_SECONDS, runCampaign, saveReport } from "./campaign.ts";
import { checkAll, faultSummary, formatResults } from "./invariants.ts";
import { buildSchedule, checkParams, formatSchedule, replayCommand } from "./schedule.ts";

const USAGE =
  `Usage: deno task chaos [--seed S] [--faults N] [--minutes M] [--robots R] [--control duplicate-run]
  --seed S      PRNG seed, an integer in [0, 4294967295] (default: random, printed)
  --faults N    faults to inject (default 20)
  --minutes M   length of the fault phase (default 3); faults left when it is over are skipped
  --robots R    robots in the stack (default 3)
  --control duplicate-run   positive control: append a second run of a task by hand; exit 0
                only if the checker catches it`;

function num(name: string, v: string | undefined, dflt: number): number {
  if (v === undefined) return dflt;
  if (!/^\d+(\.\d+)?$/.test(v)) throw new Error(`--${name}: expected a number, got '${v}'`);
  return Number(v);
}

export async function main(argv: string[]): Promise<number> {
  let seed: number, faults: number, minutes: number, robots: number;
  let control: string | undefined;
  try {
    const { values: v } = parseArgs({
      args: argv,
      options: {
        seed: { type: "string" },
        faults: { type: "string" },
        minutes: { type: "string" },
        robots: { type: "string" },
        control: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
      strict: true,
      allowPositionals: false,
    });
    if (v.help) {
      console.log(USAGE);
      return 0;
    }
    seed = num("seed", v.seed, crypto.getRandomValues(new Uint32Array(1))[0]);
    faults = num("faults", v.faults, 20);
    minutes = num("minutes", v.minutes, 3);
    robots = num("robots", v.robots, 3);
    if (!Number.isInteger(robots) || robots < 1 || robots > 20) {
      throw new Error(`--robots: expected an integer in [1, 20], got '${v.robots}'`);
    }
    control = v.control;
    if (control !== undefined && control !== "duplicate-run") {
      throw new Error(`--control: expected 'duplicate-run', got '${control}'`);
    }
  } catch (err) {
    console.error(`chaos: ${(err as Error).message}\n${USAGE}`);
    return 2;
  }
  const ids = Array.from({ length: robots }, (_, i) => `robot-${String(i + 1).padStart(3, "0")}`);
  const params = { seed, faults, minutes, robots: ids };
  const bad = checkParams(params);
  if (bad) {
    console.error(`chaos: ${bad}`);
    return 2;
  }
  const schedule = buildSchedule(params);
  console.log(`chaos: ${formatSchedule(schedule)}`);
  console.log(`chaos: replay with: ${replayCommand(schedule)}`);

  const stack = await E2eStack.create({ heartbeatSeconds: HEARTBEAT_SECONDS, robots });
  const onSigint = () => {
    console.error("chaos: interrupted; stopping the stack");
    stack.emergencyStopSync();
    Deno.exit(130);
  };
  Deno.addSignalListener("SIGINT", onSigint);
  let code = 1;
  try {
    const { campaign, report } = await runCampaign(stack, schedule);
    const obs = report.observations;
    const ran = new Set(obs.runs.filter((l) => l.phase === "start").map((l) => l.token)).size;
    console.log(
      `\nchaos: seed ${seed}: ${report.faultsRun} of ${schedule.items.length} faults in ${
        (report.ms.faults / 1000).toFixed(0)
      }s (stack start ${(report.ms.start / 1000).toFixed(0)}s, quiesce ${
        (report.ms.quiesce / 1000).toFixed(0)
      }s); ${obs.tasks.length} tasks created, ${ran} ran\nchaos: faults that ran: ${
        faultSummary(obs)
      }`,
    );
    console.log(formatResults(report.results));
    if (control === "duplicate-run") {
      const token = await campaign.appendDuplicateRun();
      const again = checkAll(await campaign.collect());
      const amo = again.find((r) => r.id === "at-most-once")!;
      const caught = !amo.ok && amo.violations.some((v) => v.startsWith(`${token} ran 2 times`));
      console.log(`\nchaos: control: appended a second run of ${token} by hand`);
      console.log(formatResults([amo]));
      console.log(`chaos: control ${caught ? "PASSED: caught" : "FAILED: not caught"}`);
      code = caught ? 0 : 1;
    } else {
      code = report.ok ? 0 : 1;
    }
    if (!report.ok || code !== 0) {
      const file = await saveReport(report);
      stack.failures.push(`chaos seed ${seed}`);
      console.log(
        `\nchaos: FAILED (seed ${seed}): ${
          report.results.filter((r) => !r.ok).map((r) => r.id).join(", ")
        }\nschedule and what happened:\n${formatTimeline(obs)}\n` +
          `observations: ${file}\nreplay: ${replayCommand(schedule)}`,
      );
    } else {
      console.log(`\nchaos: PASSED (seed ${seed})`);
    }
  } catch (err) {
    stack.failures.push(`chaos seed ${seed} (crashed)`);
    console.error(`chaos: the campaign could not run (seed ${seed}): ${(err as Error).stack}`);
    code = 1;
  } finally {
    Deno.removeSignalListener("SIGINT", onSigint);
    try {
      await stack.teardown();
    } catch (err) {
      console.error(`chaos: teardown: ${(err as Error).message}`);
      code = 1;
    }
  }
  return code;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
