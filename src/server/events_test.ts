import assert from "node:assert/strict";
import { FleetEvents } from "./events.ts";

Deno.test("events: one robot flooding events cannot flush the others' out of the timeline", () => {
  let now = Date.parse("2025-01-01T00:00:00Z");
  const ev = new FleetEvents({ capacity: 500, now: () => new Date(now) });
  ev.push({ kind: "offline", robotId: "robot-002", text: "robot-002 is offline" });
  let seen = 0;
  ev.subscribe(() => seen++);
  // robot-001 reports a new SVID expiry with every heartbeat, 1000 times in 10 s.
  for (let i = 0; i < 1000; i++) {
    now += 10;
    ev.svidReported(
      "robot-001",
      new Date(Date.parse("2025-01-02T00:00:00Z") + i * 1000).toISOString(),
    );
  }
  const recent = ev.recent(500);
  assert.ok(
    recent.some((e) => e.robotId === "robot-002" && e.kind === "offline"),
    "robot-002's offline event is still there",
  );
  // robot-001's first events are kept (the control: it is not silenced), the rest counted.
  const rot = recent.filter((e) => e.kind === "rotation" && e.robotId === "robot-001");
  assert.ok(rot.length >= 10 && rot.length <= 30, `${rot.length} rotations kept`);
  const notice = recent.filter((e) => e.kind === "suppressed");
  assert.equal(notice.length, 1, JSON.stringify(notice));
  assert.match(notice[0].text, /robot-001 sends events too fast/);
  assert.ok(seen <= 40, `${seen} events sent to subscribers`);
  // A minute later: the count of what was held back, and robot-001 is heard again.
  now += 60_000;
  ev.push({ kind: "online", robotId: "robot-001", text: "robot-001 is online" });
  const after = ev.recent(3);
  assert.equal(after[1].kind, "suppressed");
  assert.match(after[1].text, /robot-001: \d+ more events were not recorded/);
  assert.equal(after[2].kind, "online");
});

Deno.test("events: a robot's ordinary events are all recorded (rotations every 30 s, flaps)", () => {
  let now = Date.parse("2025-01-01T00:00:00Z");
  const ev = new FleetEvents({ capacity: 500, now: () => new Date(now) });
  for (let i = 0; i < 200; i++) {
    now += 30_000;
    ev.svidReported("robot-001", new Date(now + 60_000).toISOString());
    ev.push({ kind: i % 2 ? "online" : "offline", robotId: "robot-001", text: "flap" });
  }
  assert.equal(ev.recent(500).filter((e) => e.kind === "suppressed").length, 0);
  assert.equal(ev.recent(500).filter((e) => e.kind === "rotation").length, 199);
});
