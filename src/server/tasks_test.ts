import assert from "node:assert/strict";
import {
  FINAL_STATES,
  isFinal,
  needsCancel,
  needsDispatch,
  reportEvent,
  TASK_STATES,
  type TaskEvent,
  type TaskState,
  transition,
} from "./tasks.ts";

// [from, event, expected to | "ignored"]
const TABLE: [TaskState, TaskEvent, TaskState | "ignored"][] = [
  ["pending", "dispatch", "dispatched"],
  ["dispatched", "dispatch", "dispatched"], // re-sent when the robot comes back
  ["dispatched", "accepted", "accepted"],
  ["pending", "accepted", "accepted"], // the PUBACK was lost but the robot got it
  ["accepted", "running", "running"],
  ["running", "done", "done"],
  ["running", "failed", "failed"],
  ["dispatched", "refused", "refused"],
  ["pending", "expire", "expired"],
  ["dispatched", "expire", "expired"],
  ["accepted", "expire", "ignored"], // delivered: TTL no longer applies
  ["running", "accepted", "ignored"], // out of order: never go back
  ["done", "running", "ignored"],
  ["done", "failed", "ignored"], // a result is final
  ["done", "done", "done"], // duplicate delivery (QoS 1)
  ["refused", "accepted", "ignored"],
  ["failed", "dispatch", "ignored"],
  ["accepted", "lost", "failed"],
  ["running", "lost", "failed"],
  ["pending", "lost", "ignored"],
  ["expired", "done", "done"], // it arrived late and ran: the report wins
  ["expired", "dispatch", "ignored"],
  ["accepted", "refused", "ignored"],
  // Cancel: a pending task nobody is publishing is withdrawn, never sent.
  ["pending", "withdraw", "cancelled"],
  ["dispatched", "withdraw", "ignored"], // it may have reached the robot: cancel, not withdraw
  ["running", "withdraw", "ignored"],
  ["pending", "cancel", "cancelling"], // being published when the cancel came
  ["dispatched", "cancel", "cancelling"],
  ["accepted", "cancel", "cancelling"],
  ["running", "cancel", "cancelling"],
  ["cancelling", "cancel", "cancelling"], // a second cancel changes nothing
  ["cancelling", "dispatch", "cancelling"], // the late PUBACK of that publish
  ["cancelling", "accepted", "cancelling"],
  ["cancelling", "running", "cancelling"],
  ["cancelling", "cancelled", "cancelled"], // the robot killed it
  ["cancelling", "done", "done"], // it finished first
  ["cancelling", "failed", "failed"],
  ["cancelling", "refused", "refused"],
  ["cancelling", "lost", "failed"],
  ["cancelling", "expire", "cancelled"], // never taken up: robots refuse it past expiresAt
  ["running", "cancelled", "cancelled"], // the robot's report is what happened
  ["dispatched", "cancelled", "cancelled"],
  ["expired", "cancelled", "cancelled"],
  ["cancelled", "cancelled", "cancelled"], // duplicate delivery
  ["cancelled", "running", "ignored"], // final: a late report does not revive it
  ["cancelled", "done", "ignored"],
  ["cancelled", "dispatch", "ignored"], // a withdrawn task is never sent
  ["cancelled", "cancel", "ignored"],
  ["done", "cancel", "ignored"],
  ["failed", "cancel", "ignored"],
  ["refused", "cancel", "ignored"],
  ["expired", "cancel", "ignored"],
];

Deno.test("task state machine: table of transitions", () => {
  for (const [from, event, want] of TABLE) {
    const t = transition(from, event);
    if (want === "ignored") {
      assert.ok(t.ignored, `${from} --${event}--> should be ignored`);
      assert.equal(t.to, from);
      assert.equal(t.changed, false);
    } else {
      assert.ok(!t.ignored, `${from} --${event}--> should be accepted`);
      assert.equal(t.to, want, `${from} --${event}-->`);
      assert.equal(t.changed, from !== want);
    }
  }
});

Deno.test("transitions are idempotent: applying an event twice changes nothing more", () => {
  const events: TaskEvent[] = ["dispatch", "accepted", "running", "done", "failed", "refused"];
  for (const e of events) {
    const once = transition("pending", e);
    const twice = transition(once.to, e);
    assert.equal(twice.to, once.to, e);
    assert.equal(twice.changed, false, e);
  }
  assert.ok(needsDispatch("pending") && needsDispatch("dispatched") && !needsDispatch("accepted"));
});

Deno.test("final states: only the robot's own report of that state is accepted", () => {
  const events: TaskEvent[] = [
    "dispatch",
    "accepted",
    "running",
    "done",
    "failed",
    "refused",
    "cancelled",
    "expire",
    "lost",
    "cancel",
    "withdraw",
  ];
  for (const s of FINAL_STATES) {
    assert.ok(isFinal(s));
    if (s === "expired") continue; // "not delivered in time": a late report still wins
    for (const e of events) {
      const t = transition(s, e);
      assert.ok(t.ignored || (!t.changed && e === s), `${s} --${e}--> ${t.to}`);
    }
  }
  for (const s of TASK_STATES) {
    assert.equal(needsCancel(s), s === "cancelling", s);
    if (needsDispatch(s) || needsCancel(s)) assert.ok(!isFinal(s), s);
  }
  assert.ok(!isFinal("cancelling"), "a cancel is not done until the robot reports");
});

Deno.test("reportEvent: untrusted refusals are no event; expired only for a task not taken up", () => {
  const fresh = { acceptedAt: null, startedAt: null };
  const took = { acceptedAt: "2026-01-01T00:00:00.000Z", startedAt: null };
  for (const reason of ["bad-signature", "wrong-robot", "replay"] as const) {
    assert.equal(reportEvent({ state: "refused", reason }, fresh), undefined, reason);
    assert.equal(reportEvent({ state: "refused", reason }, took), undefined, reason);
  }
  assert.equal(reportEvent({ state: "refused", reason: "expired" }, fresh), "expire");
  assert.equal(reportEvent({ state: "refused", reason: "expired" }, took), undefined);
  // Controls: a refusal without a reason and every other report are their own event.
  assert.equal(reportEvent({ state: "refused" }, took), "refused");
  for (const s of ["accepted", "running", "done", "failed", "cancelled"] as const) {
    assert.equal(reportEvent({ state: s }, took), s);
  }
  // What the expired refusal then does: a queued task expires, a cancel of one completes.
  assert.equal(transition("dispatched", "expire").to, "expired");
  assert.equal(transition("cancelling", "expire").to, "cancelled");
});
