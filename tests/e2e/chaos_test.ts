/**
 * End to end, part 3: the bounded fault campaign (`deno task chaos`, tests/chaos/) as part of
 * `deno task e2e`: 3 robots, heartbeats every second, a steady stream of tasks, and 20 seeded
 * faults (kill -9 and SIGSTOP/SIGCONT of agents, the server, Mosquitto and spire-agents, some
 * mid-task and while results are queued) within a 3-minute fault phase. Seed:
 * `K8S4R_CHAOS_SEED`, default 2026; the failure message gives the seed, the failed invariants,
 * what happened, and the command that replays the schedule.
 *
 * The checker's positive controls run on this campaign's own data: a task id appended twice by
 * hand to a run file, and a result removed from the registry's view, must each be caught.
 */
import assert from "node:assert/strict";
import {
  type Campaign,
  type CampaignReport,
  formatTimeline,
  HEARTBEAT_SECONDS,
  runCampaign,
  saveReport,
} from "../chaos/campaign.ts";
import {
  checkAll,
  faultSummary,
  formatResults,
  type InvariantResult,
  type Observations,
} from "../chaos/invariants.ts";
import { buildSchedule, formatSchedule, replayCommand } from "../chaos/schedule.ts";
import { E2eStack, metric } from "./stack.ts";

const SEED = Number(Deno.env.get("K8S4R_CHAOS_SEED") ?? 2026);
const ROBOT_COUNT = 3;
const stack = await E2eStack.create({ heartbeatSeconds: HEARTBEAT_SECONDS, robots: ROBOT_COUNT });
const schedule = buildSchedule({
  seed: SEED,
  faults: 20,
  minutes: 3,
  robots: stack.robotIds,
});

let campaign: Campaign | undefined;
let report: CampaignReport | undefined;
let obs: Observations | undefined;
let results: InvariantResult[] = [];

function test(name: string, fn: () => Promise<void>) {
  Deno.test({
    name: `e2e chaos: ${name}`,
    sanitizeOps: false,
    sanitizeResources: false,
    fn: async () => {
      try {
        await fn();
      } catch (err) {
        stack.failures.push(name);
        throw err;
      }
    },
  });
}

test(`a 20-fault campaign runs against a real stack (seed ${SEED})`, async () => {
  console.log(formatSchedule(schedule));
  const out = await runCampaign(stack, schedule);
  campaign = out.campaign;
  report = out.report;
  obs = out.report.observations;
  results = out.report.results;
  const ran = new Set(obs.runs.filter((l) => l.phase === "start").map((l) => l.token)).size;
  metric("chaos.seed", SEED);
  metric("chaos.faults_run", out.report.faultsRun);
  metric("chaos.fault_phase_ms", out.report.ms.faults);
  metric("chaos.tasks_created", obs.tasks.length);
  metric("chaos.tasks_ran", ran);
  metric("chaos.api_polls", obs.polls.count);
  console.log(`faults that ran: ${faultSummary(obs)}`);
  console.log(formatResults(results));
  // The campaign did its job (faults fired, tasks ran); whether the invariants hold is next.
  assert.ok(out.report.faultsRun >= 1, "no fault ran");
  assert.ok(ran >= 1, "no task ran");
  assert.ok(obs.polls.count >= 100, `only ${obs.polls.count} API polls`);
});

test(`the invariants hold (seed ${SEED})`, async () => {
  assert.ok(obs && report, "the campaign did not run");
  const failed = results.filter((r) => !r.ok);
  const file = failed.length ? await saveReport(report) : "";
  assert.deepEqual(
    failed.map((r) => r.id),
    [],
    `seed ${SEED}: ${failed.length} invariant(s) failed:\n${formatResults(failed, 10)}\n` +
      `what happened:\n${formatTimeline(obs)}\nobservations: ${file}\n` +
      `replay: ${replayCommand(schedule)}`,
  );
});

test("controls: a task id appended twice by hand, and a removed result, are caught", async () => {
  assert.ok(campaign && obs, "the campaign did not run");
  // A second `start` record in a real run file, as a second run would write it.
  const token = await campaign.appendDuplicateRun();
  const again = checkAll(await campaign.collect());
  const amo = again.find((r) => r.id === "at-most-once")!;
  assert.equal(amo.ok, false, `a duplicate run of ${token} was not caught`);
  assert.ok(amo.violations.some((v) => v.startsWith(`${token} ran 2 times`)), amo.violations[0]);
  // A task that finished on its robot, its registry view turned back to `running`.
  const ends = new Set(obs.runs.filter((l) => l.phase === "end").map((l) => l.token));
  const victim = obs.tasks.find((t) => t.final?.state === "done" && ends.has(t.token));
  assert.ok(victim, "no task was done");
  const doctored: Observations = {
    ...obs,
    tasks: obs.tasks.map((t) =>
      t === victim ? { ...t, final: { ...t.final!, state: "running", exitCode: null } } : t
    ),
  };
  const res = checkAll(doctored).find((r) => r.id === "results")!;
  assert.equal(res.ok, false, "a lost result was not caught");
  assert.ok(
    res.violations.some((v) => v.startsWith(`${victim.token} `) && /no final result/.test(v)),
    res.violations.join("\n"),
  );
});

Deno.test({
  name: "e2e chaos: teardown: stop and clean leave no process and no listening port",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await campaign?.abort();
    await stack.teardown();
  },
});
