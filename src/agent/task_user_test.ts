import assert from "node:assert/strict";
import { realRunner, RecordingRunner } from "../process/mod.ts";
import {
  capabilities,
  ensureTaskUser,
  lookupUser,
  removeTaskUser,
  resolveTaskUser,
  switchUserMissing,
} from "./task_user.ts";

const ALL = (1n << 41n) - 1n;
const caps = (effective: bigint, ambient = 0n) => ({ effective, ambient });
const bit = (n: number) => 1n << BigInt(n);

Deno.test("switchUserMissing: root needs SETUID, SETGID, KILL; others need them ambient", () => {
  assert.deepEqual(switchUserMissing(0, caps(ALL)), []);
  assert.deepEqual(switchUserMissing(0, caps(ALL & ~bit(7))), ["CAP_SETUID"]);
  assert.deepEqual(switchUserMissing(1000, caps(0n)), [
    "CAP_KILL",
    "CAP_SETUID (ambient)",
    "CAP_SETGID (ambient)",
  ]);
  const amb = bit(6) | bit(7);
  assert.deepEqual(switchUserMissing(1000, caps(bit(5) | amb, amb)), []);
  // Effective but not ambient: lost at the exec of prlimit/setpriv.
  assert.deepEqual(switchUserMissing(1000, caps(bit(5) | amb, 0n)), [
    "CAP_SETUID (ambient)",
    "CAP_SETGID (ambient)",
  ]);
  const c = capabilities("Name:\tx\nCapEff:\t00000000000000e0\nCapAmb:\t00000000000000c0\n");
  assert.equal(c.effective, 0xe0n);
  assert.equal(c.ambient, 0xc0n);
});

const passwd = (line: string) => (cmd: string, args: string[]) =>
  cmd === "getent" && args[0] === "passwd"
    ? (line ? { stdout: line + "\n" } : { code: 2 })
    : cmd === "getent" && args[0] === "group"
    ? { code: 2 }
    : {};

Deno.test("resolveTaskUser: refuses a missing user, root, the agent's own uid, no capabilities", async () => {
  const root = { uid: 0, caps: caps(ALL) };
  await assert.rejects(
    resolveTaskUser(new RecordingRunner(passwd("")), "k8s4r-task", undefined, root),
    /tasks.user "k8s4r-task": no such user/,
  );
  await assert.rejects(
    resolveTaskUser(
      new RecordingRunner(passwd("toor:x:0:0::/root:/bin/sh")),
      "toor",
      undefined,
      root,
    ),
    /is root: tasks must run unprivileged/,
  );
  await assert.rejects(
    resolveTaskUser(
      new RecordingRunner(passwd("me:x:1000:1000::/home/me:/bin/sh")),
      "me",
      undefined,
      { uid: 1000, caps: caps(ALL, ALL) },
    ),
    /is the agent's own uid 1000: the robot's registration entry selects that uid/,
  );
  await assert.rejects(
    resolveTaskUser(
      new RecordingRunner(passwd("k8s4r-task:x:998:998::/nonexistent:/usr/sbin/nologin")),
      "k8s4r-task",
      undefined,
      { uid: 1000, caps: caps(0n) },
    ),
    /tasks.user is set, but the agent \(uid 1000\) cannot start tasks as k8s4r-task: it lacks CAP_KILL/,
  );
  await assert.rejects(
    resolveTaskUser(
      new RecordingRunner(passwd("k8s4r-task:x:998:998::/nonexistent:/usr/sbin/nologin")),
      "k8s4r-task",
      "nogroup-k8s4r",
      root,
    ),
    /tasks.group "nogroup-k8s4r": no such group/,
  );
  const ok = await resolveTaskUser(
    new RecordingRunner(passwd("k8s4r-task:x:998:997::/nonexistent:/usr/sbin/nologin")),
    "k8s4r-task",
    undefined,
    root,
  );
  assert.deepEqual(ok, {
    name: "k8s4r-task",
    uid: 998,
    gid: 997,
    home: "/nonexistent",
    dropBoundingSet: true,
  });
});

Deno.test("ensureTaskUser: useradd --system once, then idempotent; removeTaskUser undoes it (root)", async () => {
  assert.equal(Deno.uid(), 0, "this test creates a system user: run it as root (CI does)");
  const name = `k8s4r-t${crypto.randomUUID().slice(0, 6)}`;
  try {
    const made = await ensureTaskUser(realRunner, name);
    assert.equal(made.created, true);
    assert.ok(made.uid > 0 && made.uid < 1000, `system uid, got ${made.uid}`);
    const again = await ensureTaskUser(realRunner, name);
    assert.deepEqual({ ...again, created: true }, made);
    assert.equal(again.created, false);
    const real = await resolveTaskUser(realRunner, name);
    assert.equal(real.uid, made.uid);
    assert.equal(real.home, "/nonexistent");
  } finally {
    await removeTaskUser(realRunner, name);
  }
  assert.equal(await lookupUser(realRunner, name), undefined);
  // The argv devenv will run, exactly.
  let lookups = 0;
  const rec: RecordingRunner = new RecordingRunner((cmd, args) => {
    if (cmd !== "getent") return {};
    return lookups++ === 0
      ? { code: 2 }
      : { stdout: `${args[1]}:x:990:990::/nonexistent:/usr/sbin/nologin` };
  });
  await ensureTaskUser(rec, "k8s4r-task");
  assert.deepEqual(rec.calls.map((c) => [c.cmd, ...c.args]), [
    ["getent", "passwd", "k8s4r-task"],
    [
      "useradd",
      "--system",
      "--no-create-home",
      "--home-dir",
      "/nonexistent",
      "--shell",
      "/usr/sbin/nologin",
      "--user-group",
      "k8s4r-task",
    ],
    ["getent", "passwd", "k8s4r-task"],
  ]);
});
