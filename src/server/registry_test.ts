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

Deno.test("listTasksPage: keyset pages, newest first, stable under inserts, filters", () => {
  const reg = Registry.openFile(":memory:");
  try {
    reg.touchRobot("r1", "2025-01-01T00:00:00.000Z");
    reg.touchRobot("r2", "2025-01-01T00:00:00.000Z");
    const mk = (id: string, robotId: string, sec: number, createdBy?: string) =>
      reg.createTask({
        id,
        robotId,
        command: ["true"],
        env: {},
        timeoutSeconds: 5,
        createdAt: new Date(Date.UTC(2025, 0, 1, 0, 0, sec)).toISOString(),
        expiresAt: "2025-01-02T00:00:00.000Z",
        createdBy,
      });
    // 250 tasks (more than the old 100-row cap), two robots, and ties on created_at.
    for (let i = 0; i < 250; i++) {
      mk(`t${String(i).padStart(3, "0")}`, i % 2 ? "r2" : "r1", Math.floor(i / 3));
    }
    const all: string[] = [];
    let after: { createdAt: string; id: string } | undefined;
    let pages = 0;
    while (true) {
      const page = reg.listTasksPage({ limit: 40, after });
      if (page.length === 0) break;
      pages++;
      all.push(...page.map((t) => t.id));
      const last = page[page.length - 1];
      after = { createdAt: last.createdAt, id: last.id };
      // Inserted while paging: newer than every cursor, so never in a later page.
      if (pages === 2) mk(`new-${pages}`, "r1", 999);
    }
    assert.equal(pages, 7);
    assert.equal(all.length, 250, "every task exactly once");
    assert.equal(new Set(all).size, 250);
    assert.ok(!all.some((id) => id.startsWith("new-")), "an insert shifted a page");
    assert.deepEqual(all.slice(0, 3), ["t249", "t248", "t247"]);
    assert.equal(all[all.length - 1], "t000");
    // Filters: one robot, one state.
    const r2 = reg.listTasksPage({ robotId: "r2", limit: 1000 });
    assert.equal(r2.length, 125);
    assert.ok(r2.every((t) => t.robotId === "r2"));
    reg.applyTaskEvent("t010", "dispatch", "2025-01-01T01:00:00.000Z");
    assert.deepEqual(reg.listTasksPage({ state: "dispatched", limit: 10 }).map((t) => t.id), [
      "t010",
    ]);
    mk("who", "r1", 1000, "spiffe://td/operator/alice");
    assert.equal(reg.getTask("who")!.createdBy, "spiffe://td/operator/alice");
    assert.equal(reg.getTask("t000")!.createdBy, null);
  } finally {
    reg.close();
  }
});

Deno.test("cancel columns: who asked and when, recorded once", () => {
  const reg = Registry.openFile(":memory:");
  try {
    reg.touchRobot("r1", "2025-01-01T00:00:00.000Z");
    reg.createTask({
      id: "t1",
      robotId: "r1",
      command: ["sleep", "9"],
      env: {},
      timeoutSeconds: 30,
      createdAt: "2025-01-01T00:00:00.000Z",
      expiresAt: "2025-01-01T01:00:00.000Z",
    });
    reg.applyTaskEvent("t1", "dispatch", "2025-01-01T00:00:01.000Z");
    const a = reg.applyTaskEvent("t1", "cancel", "2025-01-01T00:00:02.000Z", {
      cancelRequestedBy: "spiffe://td/operator/a",
    })!;
    assert.equal(a.task.state, "cancelling");
    reg.applyTaskEvent("t1", "cancel", "2025-01-01T00:00:03.000Z", {
      cancelRequestedBy: "spiffe://td/operator/b",
    });
    const r = reg.applyTaskEvent("t1", "cancelled", "2025-01-01T00:00:04.000Z", {
      error: "cancelled",
    })!;
    assert.equal(r.task.state, "cancelled");
    assert.equal(r.task.cancelRequestedAt, "2025-01-01T00:00:02.000Z");
    assert.equal(r.task.cancelRequestedBy, "spiffe://td/operator/a");
    assert.equal(r.task.finishedAt, "2025-01-01T00:00:04.000Z");
    assert.deepEqual(reg.countTasksByState(), { cancelled: 1 });
  } finally {
    reg.close();
  }
});
