import assert from "node:assert/strict";
import {
  buildSchedule,
  checkParams,
  FAULT_CLASSES,
  formatSchedule,
  LIMITS,
  meanGapMs,
  mulberry32,
  replayCommand,
  type ScheduleParams,
  taskStream,
} from "./schedule.ts";

const ROBOTS = ["robot-001", "robot-002", "robot-003"];
const params = (seed: number, faults = 20, minutes = 3): ScheduleParams => ({
  seed,
  faults,
  minutes,
  robots: ROBOTS,
});

Deno.test("mulberry32: same seed, same stream; floats in [0, 1)", () => {
  const a = mulberry32(42), b = mulberry32(42), c = mulberry32(43);
  const xa = Array.from({ length: 1000 }, a);
  const xb = Array.from({ length: 1000 }, b);
  const xc = Array.from({ length: 1000 }, c);
  assert.deepEqual(xa, xb);
  assert.notDeepEqual(xa, xc);
  assert.ok(xa.every((x) => x >= 0 && x < 1));
  // Not degenerate: the mean of 1000 draws is near 0.5 and there are no repeats.
  const mean = xa.reduce((s, x) => s + x, 0) / xa.length;
  assert.ok(Math.abs(mean - 0.5) < 0.05, `mean ${mean}`);
  assert.equal(new Set(xa).size, xa.length);
});

Deno.test("buildSchedule: same seed, same schedule; another seed, another one", () => {
  const s1 = buildSchedule(params(1234));
  const s2 = buildSchedule(params(1234));
  assert.deepEqual(s1, s2);
  assert.equal(formatSchedule(s1), formatSchedule(s2));
  assert.notDeepEqual(buildSchedule(params(1235)).items, s1.items);
  // Params are part of the identity of a schedule.
  assert.notDeepEqual(buildSchedule(params(1234, 21)).items.slice(0, 20), s1.items);
});

Deno.test("buildSchedule: every fault class at least once when there is room", () => {
  for (const seed of [0, 1, 7, 99, 123456, LIMITS.seedMax]) {
    const s = buildSchedule(params(seed, FAULT_CLASSES.length));
    const seen = new Set(s.items.map((f) => `${f.component}/${f.action}`));
    for (const c of FAULT_CLASSES) {
      assert.ok(
        seen.has(`${c.component}/${c.action}`),
        `seed ${seed}: no ${c.component}/${c.action}`,
      );
    }
  }
  // Fewer faults than classes: no duplicates forced, count respected.
  assert.equal(buildSchedule(params(5, 3)).items.length, 3);
  assert.deepEqual(buildSchedule(params(5, 0)).items, []);
});

Deno.test("buildSchedule: faults are well-formed and within their bounds", () => {
  for (let seed = 0; seed < 200; seed++) {
    const s = buildSchedule(params(seed, 25, 4));
    assert.equal(s.items.length, 25);
    s.items.forEach((f, i) => {
      assert.equal(f.n, i + 1);
      assert.ok(f.gapMs >= LIMITS.gapMinMs, `gap ${f.gapMs}`);
      const needsRobot = f.component === "agent" || f.component === "spire-agent";
      assert.equal(f.robot !== undefined, needsRobot, JSON.stringify(f));
      if (f.robot) assert.ok(ROBOTS.includes(f.robot));
      if (f.action === "pause") {
        assert.equal(f.restore, "sigcont");
        assert.ok(f.pauseMs! >= LIMITS.pauseMs[0] && f.pauseMs! <= LIMITS.pauseMs[1]);
      } else {
        assert.equal(f.pauseMs, undefined);
      }
      if (f.action === "queued-results") {
        assert.equal(f.component, "agent");
        assert.equal(f.moment, "queued-results");
      }
      // Nothing restarts a killed agent or server but devenv start.
      if (f.action === "kill" && (f.component === "agent" || f.component === "server")) {
        assert.equal(f.restore, "devenv-start");
      }
      if (f.component === "spire-agent" && f.action === "kill") {
        assert.equal(f.restore, "supervisor");
      }
      if (f.restore === "devenv-start") {
        const [lo, hi] = LIMITS.restoreDelayMs;
        assert.ok(f.restoreDelayMs! >= lo && f.restoreDelayMs! <= hi);
      }
    });
  }
});

Deno.test("buildSchedule: the gaps fit the minutes", () => {
  const s = buildSchedule(params(77, 20, 3));
  const gaps = s.items.reduce((t, f) => t + f.gapMs, 0);
  // Gaps average meanGapMs; with the expected cost of each fault that is the fault phase.
  assert.ok(Math.abs(gaps / 20 - meanGapMs(s)) < meanGapMs(s) * 0.5, `gaps ${gaps}`);
  assert.equal(meanGapMs({ faults: 20, minutes: 3 }), 3000);
  assert.equal(meanGapMs({ faults: 1000, minutes: 1 }), LIMITS.gapMinMs);
});

Deno.test("checkParams: one-line errors naming the flag", () => {
  assert.equal(checkParams(params(1)), undefined);
  assert.match(checkParams(params(-1))!, /^--seed: expected an integer/);
  assert.match(checkParams(params(1.5))!, /^--seed:/);
  assert.match(checkParams(params(2 ** 32))!, /^--seed:/);
  assert.match(checkParams(params(1, -2))!, /^--faults:/);
  assert.match(checkParams(params(1, 20, 0))!, /^--minutes:/);
  assert.match(checkParams({ ...params(1), robots: [] })!, /^--robots:/);
  assert.throws(() => buildSchedule(params(-1)), /--seed/);
});

Deno.test("replayCommand names every parameter of the schedule", () => {
  assert.equal(
    replayCommand(params(9, 20, 3)),
    "deno task chaos --seed 9 --faults 20 --minutes 3 --robots 3",
  );
});

Deno.test("taskStream: seeded, independent of the fault stream, within bounds", () => {
  const take = (seed: number) => {
    const g = taskStream(seed, ROBOTS);
    return Array.from({ length: 200 }, () => g.next().value!);
  };
  assert.deepEqual(take(3), take(3));
  assert.notDeepEqual(take(3), take(4));
  const draws = take(3);
  for (const d of draws) {
    assert.ok(ROBOTS.includes(d.robot));
    assert.ok(d.sleepMs >= 100 && d.sleepMs <= 2500);
    assert.ok(d.nextInMs >= 200 && d.nextInMs <= 900);
  }
  for (const r of ROBOTS) assert.ok(draws.some((d) => d.robot === r), `${r} never drawn`);
});

Deno.test("buildSchedule: a seed keeps meaning the same faults (golden)", () => {
  // If this changes, every seed quoted in a report or a doc replays something else.
  const s = buildSchedule({ seed: 1, faults: 4, minutes: 1, robots: ["robot-001", "robot-002"] });
  assert.equal(
    formatSchedule(s),
    [
      "seed 1, 4 faults over 1 min, robots robot-001,robot-002",
      "#01 +11.8s SIGSTOP server for 6.0s mid-task; SIGCONT",
      "#02 +8.4s kill -9 agent robot-001 mid-task; devenv start 1.3s later",
      "#03 +5.8s kill -9 mosquitto mid-task; broker-identity restarts it",
      "#04 +3.5s kill -9 mosquitto, then kill -9 agent robot-001 once a result of it is queued; devenv start 2.3s later",
    ].join("\n"),
  );
});
