import assert from "node:assert/strict";
import {
  downTopic,
  isRobotId,
  parseTopic,
  robotSubscription,
  SERVER_SUBSCRIPTION,
  sharedGroup,
  sharedServerSubscription,
  upTopic,
} from "./topics.ts";

Deno.test("robot ids: DNS-label-like, 1..63 chars", () => {
  for (const ok of ["robot-001", "a", "0", "r".repeat(63), "a-b-c"]) assert.ok(isRobotId(ok), ok);
  for (
    const bad of ["", "-robot", "Robot", "robot_1", "r".repeat(64), "a/b", "a+", "a#", "ro bot", 7]
  ) assert.ok(!isRobotId(bad), String(bad));
});

Deno.test("topics are built only from valid robot ids", () => {
  assert.equal(upTopic("robot-001", "heartbeat"), "k8s4r/robots/robot-001/up/heartbeat");
  assert.equal(downTopic("robot-001", "task"), "k8s4r/robots/robot-001/down/task");
  assert.equal(robotSubscription("robot-001"), "k8s4r/robots/robot-001/down/#");
  assert.throws(() => upTopic("+", "status"), /invalid robot id "\+"/);
  assert.throws(() => downTopic("a/b", "task"), /invalid robot id/);
  assert.equal(SERVER_SUBSCRIPTION, "k8s4r/robots/+/up/#");
});

Deno.test("the shared-subscription group is a secret name derived from the server's password", () => {
  const a = sharedServerSubscription("s3cret-a");
  assert.match(a, /^\$share\/k8s4r-[0-9a-f]{24}\/k8s4r\/robots\/\+\/up\/#$/);
  // The same password gives the same group (every replica), another password another one.
  assert.equal(sharedServerSubscription("s3cret-a"), a);
  assert.notEqual(sharedServerSubscription("s3cret-b"), a);
  assert.doesNotMatch(a, /s3cret/);
  assert.notEqual(sharedGroup("s3cret-a"), "k8s4r");
  assert.throws(() => sharedGroup(""), /needs a password/);
});

Deno.test("parseTopic accepts the protocol's topics and explains the rest", () => {
  assert.deepEqual(parseTopic("k8s4r/robots/robot-001/up/task"), {
    ok: true,
    robotId: "robot-001",
    direction: "up",
    kind: "task",
  });
  assert.deepEqual(parseTopic("k8s4r/robots/r2/down/cancel"), {
    ok: true,
    robotId: "r2",
    direction: "down",
    kind: "cancel",
  });
  const cases: [string, RegExp][] = [
    ["k8s4r/robots/robot-001/up", /expected k8s4r\/robots\/<id>\/\(up\|down\)\/<kind>/],
    ["other/robots/robot-001/up/task", /expected k8s4r\/robots/],
    ["k8s4r/robots/Robot/up/task", /invalid robot id "Robot"/],
    ["k8s4r/robots/robot-001/sideways/task", /expected direction up or down, got "sideways"/],
    ["k8s4r/robots/robot-001/up/cancel", /unknown up kind "cancel"/],
    ["k8s4r/robots/robot-001/down/heartbeat", /unknown down kind "heartbeat"/],
    ["k8s4r/robots/robot-001/up/task/extra", /expected k8s4r\/robots/],
  ];
  for (const [topic, re] of cases) {
    const r = parseTopic(topic);
    assert.equal(r.ok, false, topic);
    if (!r.ok) assert.match(r.error, re, topic);
  }
});
