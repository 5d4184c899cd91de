import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { join } from "node:path";
import { DB_FILE, Registry, SCHEMA_VERSION } from "./registry.ts";

const device = {
  hostname: "h",
  os: "linux",
  arch: "x86_64",
  cpus: 2,
  memoryBytes: 1024,
  load: [0, 0, 0] as [number, number, number],
  uptimeSeconds: 1,
};

Deno.test("registry survives close and reopen (robots and tasks)", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-registry-" });
  try {
    let reg = await Registry.open(join(dir, "data"));
    assert.equal(reg.schemaVersion(), SCHEMA_VERSION);
    reg.recordRegister("robot-001", "2025-01-01T00:00:00.000Z", {
      spiffeId: "spiffe://td/robot/robot-001",
      agentVersion: "1.0",
      svidExpiresAt: "2025-01-01T01:00:00.000Z",
      device,
      heartbeatIntervalSeconds: 5,
    });
    assert.equal(reg.setOnline("robot-001", true, null), true);
    reg.recordHeartbeat("robot-001", "2025-01-01T00:00:05.000Z", {
      seq: 1,
      svidExpiresAt: "2025-01-01T01:30:00.000Z",
      load: [1, 2, 3],
    });
    reg.createTask({
      id: "t1",
      robotId: "robot-001",
      command: ["echo", "hi"],
      env: { A: "b" },
      cwd: "/",
      timeoutSeconds: 30,
      createdAt: "2025-01-01T00:00:06.000Z",
      expiresAt: "2025-01-01T01:00:06.000Z",
    });
    reg.close();

    reg = await Registry.open(join(dir, "data"));
    const r = reg.getRobot("robot-001")!;
    assert.equal(r.online, true);
    assert.equal(r.firstSeen, "2025-01-01T00:00:00.000Z");
    assert.equal(r.lastSeen, "2025-01-01T00:00:05.000Z");
    assert.equal(r.svidExpiresAt, "2025-01-01T01:30:00.000Z");
    assert.equal(r.heartbeatIntervalSeconds, 5);
    assert.deepEqual(r.device?.load, [1, 2, 3]);
    const t = reg.getTask("t1")!;
    assert.equal(t.state, "pending");
    assert.deepEqual(t.command, ["echo", "hi"]);
    assert.deepEqual(t.env, { A: "b" });
    assert.deepEqual(reg.tasksInStates(["pending"], "robot-001").map((x) => x.id), ["t1"]);
    reg.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("applyTaskEvent: results stored only on accepted transitions", () => {
  const reg = Registry.openFile(":memory:");
  try {
    reg.touchRobot("r1", "2025-01-01T00:00:00.000Z");
    reg.createTask({
      id: "t1",
      robotId: "r1",
      command: ["true"],
      env: {},
      timeoutSeconds: 5,
      createdAt: "2025-01-01T00:00:00.000Z",
      expiresAt: "2025-01-01T00:01:00.000Z",
    });
    const d = reg.applyTaskEvent("t1", "dispatch", "2025-01-01T00:00:01.000Z")!;
    assert.equal(d.task.state, "dispatched");
    assert.equal(d.task.dispatchCount, 1);
    const done = reg.applyTaskEvent("t1", "done", "2025-01-01T00:00:02.000Z", {
      exitCode: 0,
      stdout: "ok",
    })!;
    assert.equal(done.task.state, "done");
    assert.equal(done.task.finishedAt, "2025-01-01T00:00:02.000Z");
    // A stale "failed" after "done" must not overwrite the result.
    const stale = reg.applyTaskEvent("t1", "failed", "2025-01-01T00:00:03.000Z", {
      exitCode: 9,
      error: "late",
    })!;
    assert.ok(stale.ignored);
    const t = reg.getTask("t1")!;
    assert.equal(t.exitCode, 0);
    assert.equal(t.stdout, "ok");
    assert.equal(t.error, null);
    assert.equal(reg.applyTaskEvent("nope", "done", "2025-01-01T00:00:03.000Z"), undefined);
    assert.deepEqual(reg.countTasksByState(), { done: 1 });
  } finally {
    reg.close();
  }
});

Deno.test("a database from a newer k8s4r is refused, not migrated down", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-registry-" });
  try {
    const db = new DatabaseSync(join(dir, DB_FILE));
    db.exec(`PRAGMA user_version = ${SCHEMA_VERSION + 1}`);
    db.close();
    await assert.rejects(
      () => Registry.open(dir),
      new RegExp(
        `registry schema version ${
          SCHEMA_VERSION + 1
        } is newer than this k8s4r supports \\(${SCHEMA_VERSION}\\)`,
      ),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("registry counts heartbeats and the gaps in their seq, per agent boot", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-registry-" });
  try {
    const reg = await Registry.open(join(dir, "data"));
    reg.recordRegister("robot-001", "2025-01-01T00:00:00.000Z", {
      spiffeId: "spiffe://td/robot/robot-001",
      agentVersion: "1.0",
      svidExpiresAt: "2025-01-01T01:00:00.000Z",
      device,
    });
    const hb = (seq: number, bootId: string) =>
      reg.recordHeartbeat("robot-001", "2025-01-01T00:00:05.000Z", {
        seq,
        bootId,
        svidExpiresAt: "2025-01-01T01:30:00.000Z",
      });
    hb(1, "a");
    hb(2, "a");
    hb(2, "a"); // a QoS 1 duplicate: ignored
    hb(5, "a"); // 3 and 4 lost
    hb(1, "b"); // the agent restarted: not a loss
    hb(2, "b");
    const r = reg.getRobot("robot-001")!;
    assert.equal(r.heartbeatsReceived, 5);
    assert.equal(r.heartbeatsMissing, 2);
    assert.equal(r.lastHeartbeatSeq, 2);
    reg.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("registry commits are durable: WAL with synchronous=FULL (fsync on every commit)", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-registry-" });
  try {
    const reg = await Registry.open(dir);
    try {
      // 2 = FULL. NORMAL (1) in WAL mode syncs only at checkpoints: a commit acknowledged to the
      // broker could be lost on power failure.
      assert.deepEqual(reg.durability(), { journalMode: "wal", synchronous: 2 });
    } finally {
      reg.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("registry batch: one commit, each step in a savepoint, stops at the first failure", () => {
  const reg = Registry.openFile(":memory:");
  try {
    const at = "2025-01-01T00:00:00.000Z";
    const r = reg.batch([
      () => reg.touchRobot("robot-001", at),
      () => {
        reg.touchRobot("robot-002", at);
        throw new Error("boom");
      },
      () => reg.touchRobot("robot-003", at),
    ]);
    assert.equal(r.applied, 1);
    assert.match(r.error!.message, /boom/);
    assert.deepEqual(reg.listRobots().map((x) => x.id), ["robot-001"]);
    assert.deepEqual(reg.batch([]), { applied: 0 });
    // Usable afterwards: no transaction left open.
    assert.equal(reg.batch([() => reg.touchRobot("robot-004", at)]).applied, 1);
    assert.deepEqual(reg.listRobots().map((x) => x.id), ["robot-001", "robot-004"]);
  } finally {
    reg.close();
  }
});
