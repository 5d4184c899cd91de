import assert from "node:assert/strict";
import { needsDispatch, type TaskEvent, type TaskState, transition } from "./tasks.ts";

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
