/**
 * The robot's time rules across restarts, as the agent applies them: `checkTime` with the
 * runner's `timeRules()` (clock, window, what the id store can vouch for), then the runner's
 * claim. Clock jumps (forward, then corrected) and a window raised in the config.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { checkTime } from "../mqtt/signed.ts";
import { PROTOCOL_VERSION, type TaskMessage } from "../mqtt/messages.ts";
import { type TaskReport, TaskRunner, type TaskRunnerOptions } from "./task_runner.ts";

const HOUR = 3_600_000;
const iso = (ms: number) => new Date(ms).toISOString();

function message(id: string, createdAt: number, ttlMs?: number): TaskMessage {
  const m: TaskMessage = {
    v: PROTOCOL_VERSION,
    type: "task",
    robotId: "robot-001",
    ts: iso(createdAt),
    id,
    command: ["true"],
    env: {},
    timeoutSeconds: 30,
    createdAt: iso(createdAt),
  };
  if (ttlMs !== undefined) m.expiresAt = iso(createdAt + ttlMs);
  return m;
}

async function withState(fn: (dir: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-time-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function runner(dir: string, clock: () => number, more: Partial<TaskRunnerOptions> = {}) {
  return new TaskRunner({
    allow: ["*"],
    stateDir: join(dir, "state"),
    defaultCwd: dir,
    killGraceMs: 200,
    clock,
    ...more,
  });
}

/** What the agent does with a verified message: the time rules, then the runner. */
async function deliver(r: TaskRunner, m: TaskMessage): Promise<string> {
  await r.ids.load(); // the agent loads the store before it subscribes
  const refused = checkTime(m, r.timeRules());
  if (refused) return `${refused.reason}: ${refused.error}`;
  const reports: TaskReport[] = [];
  const how = await r.handle(
    { id: m.id, command: m.command, env: m.env, timeoutSeconds: 30, createdAt: m.createdAt },
    (x) => reports.push(x),
  );
  return how === "run" ? reports.map((x) => x.state).join(",") : how;
}

Deno.test("clock 3 h ahead, then corrected: a fresh task is not expired; expiry and replays still hold", async () => {
  await withState(async (dir) => {
    const real = Date.now();
    let now = real + 3 * HOUR; // the robot's clock is wrong
    const ahead = runner(dir, () => now);
    // A task created (by the server's correct clock) an hour ago, run while the clock was ahead.
    assert.equal(await deliver(ahead, message("before-fix", real - HOUR)), "accepted,running,done");
    const cancelled = await ahead.cancel("cancelled-early", "cancelled", () => {}, iso(real));
    assert.equal(cancelled, "cancelled-before-arrival");
    await ahead.ids.close();

    now = real; // NTP corrects the clock; the agent restarts
    const fixed = runner(dir, () => now);
    await fixed.ids.load();
    const fresh = await deliver(fixed, message("fresh", real, HOUR));
    assert.equal(fresh, "accepted,running,done", "a task created now with a 1 h TTL runs");
    // Controls: a task past its expiresAt is refused, and says when it arrived (after it).
    const late = await deliver(fixed, message("late", real - 2 * HOUR, HOUR));
    const m = /^expired: expired: arrived at (\S+), after its expiresAt (\S+)$/.exec(late);
    assert.ok(m, late);
    assert.ok(Date.parse(m[1]) > Date.parse(m[2]), late);
    // ...and ids claimed while the clock was ahead are still remembered.
    assert.equal(await deliver(fixed, message("before-fix", real - HOUR)), "replay");
    assert.equal(await deliver(fixed, message("cancelled-early", real)), "replay");
    await fixed.ids.close();
  });
});

Deno.test("tasks.maxAgeSeconds raised: an id claimed under the old window is still refused", async () => {
  await withState(async (dir) => {
    const real = Date.now();
    let now = real;
    const oneHour = { window: { maxAgeSeconds: 3600, clockSkewSeconds: 300 } };
    const sevenDays = { window: { maxAgeSeconds: 7 * 24 * 3600, clockSkewSeconds: 300 } };
    const first = runner(dir, () => now, oneHour);
    const a = message("A", real - HOUR / 2);
    const b = message("B", real - HOUR / 2);
    assert.equal(await deliver(first, a), "accepted,running,done");
    assert.equal(await deliver(first, b), "accepted,running,done");
    await first.ids.close();

    // Past A's 1 h window. Under 1 h its copy is too old; the window is then raised to 7 days.
    now = real + HOUR;
    const raised = runner(dir, () => now, sevenDays);
    assert.equal(await deliver(raised, a), "replay", "A is remembered for the window in force now");
    await raised.ids.close();

    // B's record is dropped by an agent still on the 1 h window (compaction at start)...
    now = real + 2 * HOUR;
    const old = runner(dir, () => now, oneHour);
    await old.ids.load();
    assert.equal(await old.ids.lookup("B"), undefined, "dropped under the 1 h window");
    await old.ids.close();
    // ...then the window is raised: the store cannot vouch for B any more, so it is refused.
    const later = runner(dir, () => now, sevenDays);
    const again = await deliver(later, b);
    assert.match(again, /^replay: .* up to which this robot has forgotten the ids it saw/, again);
    // Even when the time rules are not applied first, the store does not claim it.
    assert.equal(await later.handle({ ...b, timeoutSeconds: 30 }, () => {}), "replay");
    // Control: a task created now runs under the raised window.
    assert.equal(await deliver(later, message("C", now)), "accepted,running,done");
    await later.ids.close();
  });
});

Deno.test("clock a year ahead at a restart (every id dropped), then corrected: fresh tasks run, old copies do not", async () => {
  await withState(async (dir) => {
    const real = Date.now();
    let now = real;
    const first = runner(dir, () => now);
    assert.equal(await deliver(first, message("ran", real - HOUR)), "accepted,running,done");
    await first.ids.close();
    now = real + 365 * 24 * HOUR; // a bad RTC at boot: the load drops every id
    const ahead = runner(dir, () => now);
    await ahead.ids.load();
    assert.equal(await ahead.ids.lookup("ran"), undefined, "dropped while the clock was ahead");
    await ahead.ids.close();
    now = real;
    const fixed = runner(dir, () => now);
    assert.equal(await deliver(fixed, message("fresh", real, HOUR)), "accepted,running,done");
    // The dropped id's copy is inside the window by the corrected clock, yet refused.
    assert.match(await deliver(fixed, message("ran", real - HOUR)), /^replay: .*forgotten/);
    await fixed.ids.close();
  });
});
