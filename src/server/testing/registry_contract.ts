/**
 * The registry and fleet test suite, once for every backend: each case takes a
 * `RegistryFixture` (a way to make a new, empty store) and runs against it.
 *
 * - src/server/registry_test.ts and fleet_test.ts run it on SQLite;
 * - tests/registry_postgres_test.ts runs it on a real PostgreSQL 15 it starts itself.
 *
 * A case asserts what the server relies on, not how a backend does it: both backends must
 * pass every case unchanged.
 */
import assert from "node:assert/strict";
import { decodeDown, type DownMessage, encode } from "../../mqtt/messages.ts";
import {
  ConflictError,
  type DownSigner,
  FleetService,
  NotFoundError,
  type Publisher,
} from "../fleet.ts";
import {
  type Dialect,
  type Registry,
  RESEND_CLAIMED,
  resendRequestedSinceClaim,
  SCHEMA_VERSION,
} from "../registry.ts";
import { MAX_HEARTBEAT_GAP } from "../heartbeat_bounds.ts";
import { TestHttps, UNSIGNED } from "../testing.ts";
import { checkDown, TaskSigner } from "../../mqtt/signed.ts";
import { parseJws } from "../../spiffe/jws.ts";
import { fleetServerSpiffeId } from "../../fleet/ids.ts";
import { Buffer } from "node:buffer";
import { X509Certificate } from "node:crypto";
import { renderRobotsTable, robotStateText } from "../command.ts";

export interface RegistryStore {
  /** Opens the store; again after close(): the same data. */
  open(): Promise<Registry>;
  /** Marks the store as written by a k8s4r whose schema is version `v`. */
  forgeSchemaVersion(v: number): Promise<void>;
  /** Runs statements on the store as its administrator, beside the registry (sabotage). */
  exec(sql: string): Promise<void>;
  /** Deletes the store. */
  dispose(): Promise<void>;
}

export interface RegistryFixture {
  name: Dialect;
  /** A new, empty store (not opened yet). */
  create(): Promise<RegistryStore>;
}

export interface ContractCase {
  name: string;
  fn: (f: RegistryFixture) => Promise<void>;
}

/** A new store, opened; closed and deleted afterwards whatever happens. */
async function withRegistry(
  f: RegistryFixture,
  fn: (reg: Registry, store: RegistryStore) => Promise<void>,
): Promise<void> {
  const store = await f.create();
  try {
    const reg = await store.open();
    try {
      await fn(reg, store);
    } finally {
      await reg.close();
    }
  } finally {
    await store.dispose();
  }
}

const device = {
  hostname: "h",
  os: "linux",
  arch: "x86_64",
  cpus: 2,
  memoryBytes: 1024,
  load: [0, 0, 0] as [number, number, number],
  uptimeSeconds: 1,
};

const injected = () => new Error("disk I/O error (injected)");

// ------------------------------------------------------------------------------- registry

export const registryCases: ContractCase[] = [
  {
    // Migration 6 on a store an earlier k8s4r (schema 5) wrote, with a dispatched task in it,
    // and a migration 6 that fails half-way (the column exists already: a hand edit, a crash of
    // a non-transactional migrator): nothing of it is kept, the store stays at 5, the next open
    // after the cause is removed migrates it.
    name: "migration 6 on a schema-5 store: tasks kept and resent; a failed migration keeps 5",
    fn: async (f) => {
      const store = await f.create();
      try {
        // A schema-5 store: this k8s4r's tables (as its own user) without migration 6.
        await (await store.open()).close();
        await store.exec(
          f.name === "postgres"
            ? `ALTER TABLE tasks DROP COLUMN resend_requested_at;
               DELETE FROM k8s4r_schema_migrations WHERE version > 5;`
            : `ALTER TABLE tasks DROP COLUMN resend_requested_at; PRAGMA user_version = 5;`,
        );
        const online = f.name === "postgres" ? "TRUE" : "1";
        await store.exec(
          `INSERT INTO robots (id, first_seen, last_seen, online)
             VALUES ('robot-001', '2025-01-01T00:00:00.000Z', '2025-01-01T00:00:00.000Z', ${online});
           INSERT INTO tasks (id, robot_id, command, env, timeout_seconds, state, dispatch_count,
               created_at, expires_at, updated_at)
             VALUES ('t-old', 'robot-001', '["true"]', '{}', 5, 'dispatched', 1,
               '2025-01-01T00:00:00.000Z', '2025-01-01T01:00:00.000Z', '2025-01-01T00:00:00.000Z');
           ALTER TABLE tasks ADD COLUMN resend_requested_at TEXT;`,
        );
        // Migration 6 fails (its column is there already): the open is refused, naming it.
        await assert.rejects(() => store.open(), /migration 6/);
        await store.exec("ALTER TABLE tasks DROP COLUMN resend_requested_at");
        // Control: the same store, the cause removed: it opens, at 6, with its task.
        const reg = await store.open();
        try {
          assert.equal(await reg.schemaVersion(), SCHEMA_VERSION);
          const t = (await reg.getTask("t-old"))!;
          assert.equal(t.state, "dispatched");
          assert.equal(t.resendRequestedAt, null);
          // The robot's new connection gets the old task again (marks and claims work on it).
          const pub = new HeldPublisher();
          const fleet = new FleetService(reg, pub, {
            now: () => new Date(T0 + 60_000),
            signer: UNSIGNED,
          });
          await fleet.dispatchFor("robot-001", { resend: true });
          await fleet.settled();
          assert.deepEqual(tasksSent(pub).map((s) => s.msg.type === "task" && s.msg.id), [
            "t-old",
          ]);
          const after = (await reg.getTask("t-old"))!;
          assert.equal(after.dispatchCount, 2);
          assert.equal(after.resendRequestedAt, null);
        } finally {
          await reg.close();
        }
      } finally {
        await store.dispose();
      }
    },
  },
  {
    name: "survives close and reopen (robots and tasks)",
    fn: async (f) => {
      const store = await f.create();
      try {
        let reg = await store.open();
        try {
          assert.equal(await reg.schemaVersion(), SCHEMA_VERSION);
          await reg.recordRegister("robot-001", "2025-01-01T00:00:00.000Z", {
            spiffeId: "spiffe://td/robot/robot-001",
            agentVersion: "1.0",
            svidExpiresAt: "2025-01-01T01:00:00.000Z",
            device,
            heartbeatIntervalSeconds: 5,
          });
          assert.equal(await reg.setOnline("robot-001", true, null), true);
          await reg.recordHeartbeat("robot-001", "2025-01-01T00:00:05.000Z", {
            seq: 1,
            svidExpiresAt: "2025-01-01T01:30:00.000Z",
            load: [1, 2, 3],
          });
          await reg.createTask({
            id: "t1",
            robotId: "robot-001",
            command: ["echo", "hi"],
            env: { A: "b" },
            cwd: "/",
            timeoutSeconds: 30,
            createdAt: "2025-01-01T00:00:06.000Z",
            expiresAt: "2025-01-01T01:00:06.000Z",
          });
        } finally {
          await reg.close();
        }
        reg = await store.open();
        try {
          const r = (await reg.getRobot("robot-001"))!;
          assert.equal(r.online, true);
          assert.equal(r.firstSeen, "2025-01-01T00:00:00.000Z");
          assert.equal(r.lastSeen, "2025-01-01T00:00:05.000Z");
          assert.equal(r.svidExpiresAt, "2025-01-01T01:30:00.000Z");
          assert.equal(r.heartbeatIntervalSeconds, 5);
          assert.deepEqual(r.device?.load, [1, 2, 3]);
          const t = (await reg.getTask("t1"))!;
          assert.equal(t.state, "pending");
          assert.deepEqual(t.command, ["echo", "hi"]);
          assert.deepEqual(t.env, { A: "b" });
          assert.equal(t.cwd, "/");
          assert.equal(t.createdAt, "2025-01-01T00:00:06.000Z");
          assert.equal(t.expiresAt, "2025-01-01T01:00:06.000Z");
          assert.deepEqual(
            (await reg.tasksInStates(["pending"], "robot-001")).map((x) => x.id),
            ["t1"],
          );
        } finally {
          await reg.close();
        }
      } finally {
        await store.dispose();
      }
    },
  },
  {
    name: "applyTaskEvent: results stored only on accepted transitions",
    fn: (f) =>
      withRegistry(f, async (reg) => {
        await reg.touchRobot("r1", "2025-01-01T00:00:00.000Z");
        await reg.createTask({
          id: "t1",
          robotId: "r1",
          command: ["true"],
          env: {},
          timeoutSeconds: 5,
          createdAt: "2025-01-01T00:00:00.000Z",
          expiresAt: "2025-01-01T00:01:00.000Z",
        });
        const d = (await reg.applyTaskEvent("t1", "dispatch", "2025-01-01T00:00:01.000Z"))!;
        assert.equal(d.task.state, "dispatched");
        assert.equal(d.task.dispatchCount, 1);
        assert.equal(d.task.dispatchedAt, "2025-01-01T00:00:01.000Z");
        const done = (await reg.applyTaskEvent("t1", "done", "2025-01-01T00:00:02.000Z", {
          exitCode: 0,
          stdout: "ok",
        }))!;
        assert.equal(done.task.state, "done");
        assert.equal(done.task.finishedAt, "2025-01-01T00:00:02.000Z");
        // A stale "failed" after "done" must not overwrite the result.
        const stale = (await reg.applyTaskEvent("t1", "failed", "2025-01-01T00:00:03.000Z", {
          exitCode: 9,
          error: "late",
        }))!;
        assert.ok(stale.ignored);
        const t = (await reg.getTask("t1"))!;
        assert.equal(t.exitCode, 0);
        assert.equal(t.stdout, "ok");
        assert.equal(t.error, null);
        assert.equal(
          await reg.applyTaskEvent("nope", "done", "2025-01-01T00:00:03.000Z"),
          undefined,
        );
        assert.deepEqual(await reg.countTasksByState(), { done: 1 });
      }),
  },
  {
    name: "a store written by a newer k8s4r is refused, not migrated down",
    fn: async (f) => {
      const store = await f.create();
      try {
        // Positive control: the same store opens at the current version.
        const reg = await store.open();
        assert.equal(await reg.schemaVersion(), SCHEMA_VERSION);
        await reg.close();
        await store.forgeSchemaVersion(SCHEMA_VERSION + 1);
        await assert.rejects(
          () => store.open(),
          new RegExp(
            `registry schema version ${
              SCHEMA_VERSION + 1
            } is newer than this k8s4r supports \\(${SCHEMA_VERSION}\\); upgrade k8s4r`,
          ),
        );
      } finally {
        await store.dispose();
      }
    },
  },
  {
    name: "several opens of a new store at once all migrate it, once",
    fn: async (f) => {
      const store = await f.create();
      try {
        const opened = await Promise.allSettled(Array.from({ length: 4 }, () => store.open()));
        const regs = opened.flatMap((o) => o.status === "fulfilled" ? [o.value] : []);
        try {
          const failed = opened.flatMap((o) => o.status === "rejected" ? [String(o.reason)] : []);
          assert.deepEqual(failed, []);
          for (const reg of regs) assert.equal(await reg.schemaVersion(), SCHEMA_VERSION);
          // They share one store.
          await regs[0].touchRobot("robot-001", "2025-01-01T00:00:00.000Z");
          assert.equal((await regs[3].getRobot("robot-001"))?.id, "robot-001");
        } finally {
          for (const reg of regs) await reg.close();
        }
      } finally {
        await store.dispose();
      }
    },
  },
  {
    name: "counts heartbeats and the gaps in their seq, per agent boot",
    fn: (f) =>
      withRegistry(f, async (reg) => {
        await reg.recordRegister("robot-001", "2025-01-01T00:00:00.000Z", {
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
        await hb(1, "a");
        await hb(2, "a");
        await hb(2, "a"); // a QoS 1 duplicate: ignored
        await hb(5, "a"); // 3 and 4 lost
        await hb(1, "b"); // the agent restarted: not a loss
        await hb(2, "b");
        const r = (await reg.getRobot("robot-001"))!;
        assert.equal(r.heartbeatsReceived, 5);
        assert.equal(r.heartbeatsMissing, 2);
        assert.equal(r.lastHeartbeatSeq, 2);
        // Robots choose seq and connection: the largest values the protocol accepts are stored.
        const big = Number.MAX_SAFE_INTEGER;
        await hb(big, "c");
        await reg.transaction((tx) =>
          tx.setStatusOrder("robot-001", "c", { connection: big, rank: 1 })
        );
        const r2 = (await reg.getRobot("robot-001"))!;
        assert.equal(r2.lastHeartbeatSeq, big);
        assert.deepEqual(r2.statusOrder, { connection: big, rank: 1 });
      }),
  },
  {
    name: "heartbeats in any order (replicas): each seq counts once, a late one fills its gap",
    fn: (f) =>
      withRegistry(f, async (reg) => {
        const hb = (seq: number, bootId = "a") =>
          reg.recordHeartbeat("robot-001", "2025-01-01T00:00:05.000Z", {
            seq,
            bootId,
            svidExpiresAt: "2025-01-01T01:30:00.000Z",
          });
        const robot = async () => (await reg.getRobot("robot-001"))!;
        // What a shared subscription does to one robot's heartbeats: 1..9, shuffled across
        // three replicas, with duplicates (redelivery after a failed write).
        for (const seq of [1, 4, 7, 2, 5, 8, 8, 3, 6, 9, 4]) await hb(seq);
        let r = await robot();
        assert.equal(r.heartbeatsReceived, 9);
        assert.equal(r.heartbeatsMissing, 0);
        assert.equal(r.lastHeartbeatSeq, 9);
        // A gap is missing while it is open, and no longer once its heartbeat arrives.
        await hb(12);
        r = await robot();
        assert.equal(r.heartbeatsMissing, 2);
        await hb(11);
        await hb(11);
        r = await robot();
        assert.equal(r.heartbeatsMissing, 1);
        assert.equal(r.heartbeatsReceived, 11);
        // Far behind the window: cannot be told from a duplicate, ignored (10 stays missing).
        await hb(12 + 2000);
        await hb(10);
        r = await robot();
        assert.equal(r.heartbeatsReceived, 12);
        assert.equal(r.heartbeatsMissing, 1 + 2000 - 1);
        // A new boot closes the old one's gaps for good; the new boot starts with none.
        await hb(1, "b");
        r = await robot();
        assert.equal(r.heartbeatsMissing, 2000);
        assert.equal(r.lastHeartbeatSeq, 1);
      }),
  },
  {
    name: "setOnline: true only when the value flips; the offline reason follows the last call",
    fn: (f) =>
      withRegistry(f, async (reg) => {
        assert.equal(await reg.setOnline("robot-404", true, null), false, "no such robot");
        assert.equal(await reg.getRobot("robot-404"), undefined);
        await reg.touchRobot("robot-001", "2025-01-01T00:00:00.000Z");
        const r = async () => (await reg.getRobot("robot-001"))!;
        assert.equal((await r()).online, false, "a new robot is offline");
        assert.equal(await reg.setOnline("robot-001", false, "first"), false);
        assert.equal((await r()).offlineReason, "first");
        assert.equal(await reg.setOnline("robot-001", true, "ignored"), true);
        assert.deepEqual([(await r()).online, (await r()).offlineReason], [true, null]);
        assert.equal(await reg.setOnline("robot-001", true, null), false);
        assert.equal(await reg.setOnline("robot-001", false, "connection lost"), true);
        assert.equal(await reg.setOnline("robot-001", false, "missed 3 heartbeats"), false);
        assert.deepEqual(
          [(await r()).online, (await r()).offlineReason],
          [false, "missed 3 heartbeats"],
        );
        assert.deepEqual((await reg.onlineRobots()).map((x) => x.id), []);
        await reg.setOnline("robot-001", true, null);
        assert.deepEqual((await reg.onlineRobots()).map((x) => x.id), ["robot-001"]);
      }),
  },
  {
    name: "batch: one commit, each step in a savepoint, stops at the first failure",
    fn: (f) =>
      withRegistry(f, async (reg) => {
        const at = "2025-01-01T00:00:00.000Z";
        const r = await reg.batch([
          (tx) => tx.touchRobot("robot-001", at),
          async (tx) => {
            await tx.touchRobot("robot-002", at);
            throw new Error("boom");
          },
          (tx) => tx.touchRobot("robot-003", at),
        ]);
        assert.equal(r.applied, 1);
        assert.match(r.error!.message, /boom/);
        assert.deepEqual((await reg.listRobots()).map((x) => x.id), ["robot-001"]);
        assert.deepEqual(await reg.batch([]), { applied: 0 });
        // Usable afterwards: no transaction left open.
        assert.equal((await reg.batch([(tx) => tx.touchRobot("robot-004", at)])).applied, 1);
        assert.deepEqual((await reg.listRobots()).map((x) => x.id), ["robot-001", "robot-004"]);
        // A failing statement (not a throw of ours) rolls back its step the same way.
        const sqlError = await reg.batch([
          (tx) => tx.touchRobot("robot-005", at),
          (tx) =>
            tx.createTask({
              id: "dup",
              robotId: "robot-005",
              command: ["true"],
              env: {},
              timeoutSeconds: 1,
              createdAt: at,
              expiresAt: at,
            }).then(() => {}),
          (tx) =>
            tx.createTask({
              id: "dup", // primary key violation
              robotId: "robot-005",
              command: ["true"],
              env: {},
              timeoutSeconds: 1,
              createdAt: at,
              expiresAt: at,
            }).then(() => {}),
          (tx) => tx.touchRobot("robot-006", at),
        ]);
        assert.equal(sqlError.applied, 2);
        assert.match(sqlError.error!.message, /unique|duplicate/i);
        assert.deepEqual(
          (await reg.listRobots()).map((x) => x.id),
          ["robot-001", "robot-004", "robot-005"],
        );
        assert.equal((await reg.getTask("dup"))?.state, "pending");
      }),
  },
  {
    name: "a transaction is all or nothing, and no read sees it before its commit",
    fn: (f) =>
      withRegistry(f, async (reg) => {
        const at = "2025-01-01T00:00:00.000Z";
        let readDuring: Promise<unknown> | undefined;
        await assert.rejects(
          () =>
            reg.transaction(async (tx) => {
              await tx.touchRobot("robot-001", at);
              // Another caller of this process reads while the transaction is open.
              readDuring = reg.getRobot("robot-001");
              await tx.setOnline("robot-001", true, null);
              throw new Error("abort");
            }),
          /abort/,
        );
        assert.equal(await readDuring, undefined, "the read saw an uncommitted write");
        assert.equal(await reg.getRobot("robot-001"), undefined);
        // Positive control: the same transaction without the throw is committed.
        await reg.transaction(async (tx) => {
          await tx.touchRobot("robot-001", at);
          await tx.setOnline("robot-001", true, null);
        });
        assert.equal((await reg.getRobot("robot-001"))?.online, true);
      }),
  },
  {
    name: "values come back as written: times, ids in byte order, JSON, text",
    fn: (f) =>
      withRegistry(f, async (reg) => {
        // Byte order ('-' < '0' < 'a'), whatever the database's locale would say.
        for (const id of ["robot10", "robot-2", "robota", "robot1"]) {
          await reg.touchRobot(id, "2025-06-30T23:59:59.999Z");
        }
        assert.deepEqual(
          (await reg.listRobots()).map((r) => r.id),
          ["robot-2", "robot1", "robot10", "robota"],
        );
        assert.equal((await reg.getRobot("robot1"))!.lastSeen, "2025-06-30T23:59:59.999Z");
        const env = { ZED: "1", A: "2", "M_é": "ü\n\t\"'?" };
        const t = await reg.createTask({
          id: "t-1",
          robotId: "robot1",
          command: ["sh", "-c", "echo '?' $1 \"?\"", "ünïcødé ✓"],
          env,
          timeoutSeconds: 7,
          createdAt: "2025-01-01T00:00:00.001Z",
          expiresAt: "2025-01-01T00:00:10.000Z",
        });
        assert.deepEqual(t.command, ["sh", "-c", "echo '?' $1 \"?\"", "ünïcødé ✓"]);
        assert.deepEqual(Object.keys(t.env), ["ZED", "A", "M_é"], "env keeps its key order");
        assert.deepEqual(t.env, env);
        assert.equal(t.createdAt, "2025-01-01T00:00:00.001Z");
        assert.equal(t.timeoutSeconds, 7);
        const out = "line 1\nbinary \0 byte, emoji 🤖";
        await reg.applyTaskEvent("t-1", "done", "2025-01-01T00:00:01.000Z", {
          exitCode: -15,
          stdout: out,
          stderr: "",
        });
        const done = (await reg.getTask("t-1"))!;
        assert.equal(done.exitCode, -15);
        assert.equal(done.stderr, "");
        // NUL cut the text on SQLite and fails the write on PostgreSQL: it is stored as U+FFFD.
        assert.equal(done.stdout, out.replace("\0", "\uFFFD"));
        assert.deepEqual(await reg.countTasksByState(), { done: 1 });
        assert.deepEqual((await reg.listTasks("robot1", 1)).map((x) => x.id), ["t-1"]);
      }),
  },
  {
    name: "listTasksPage: keyset pages, newest first, stable under inserts, filters",
    fn: (f) =>
      withRegistry(f, async (reg) => {
        await reg.touchRobot("r1", "2025-01-01T00:00:00.000Z");
        await reg.touchRobot("r2", "2025-01-01T00:00:00.000Z");
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
          await mk(`t${String(i).padStart(3, "0")}`, i % 2 ? "r2" : "r1", Math.floor(i / 3));
        }
        const all: string[] = [];
        let after: { createdAt: string; id: string } | undefined;
        let pages = 0;
        while (true) {
          const page = await reg.listTasksPage({ limit: 40, after });
          if (page.length === 0) break;
          pages++;
          all.push(...page.map((t) => t.id));
          const last = page[page.length - 1];
          after = { createdAt: last.createdAt, id: last.id };
          // Inserted while paging: newer than every cursor, so never in a later page.
          if (pages === 2) await mk(`new-${pages}`, "r1", 999);
        }
        assert.equal(pages, 7);
        assert.equal(all.length, 250, "every task exactly once");
        assert.equal(new Set(all).size, 250);
        assert.ok(!all.some((id) => id.startsWith("new-")), "an insert shifted a page");
        assert.deepEqual(all.slice(0, 3), ["t249", "t248", "t247"]);
        assert.equal(all[all.length - 1], "t000");
        // Filters: one robot, one state.
        const r2 = await reg.listTasksPage({ robotId: "r2", limit: 1000 });
        assert.equal(r2.length, 125);
        assert.ok(r2.every((t) => t.robotId === "r2"));
        await reg.applyTaskEvent("t010", "dispatch", "2025-01-01T01:00:00.000Z");
        assert.deepEqual(
          (await reg.listTasksPage({ state: "dispatched", limit: 10 })).map((t) => t.id),
          ["t010"],
        );
        await mk("who", "r1", 1000, "spiffe://td/operator/alice");
        assert.equal((await reg.getTask("who"))!.createdBy, "spiffe://td/operator/alice");
        assert.equal((await reg.getTask("t000"))!.createdBy, null);
      }),
  },
  {
    name: "cancel columns: who asked and when, recorded once",
    fn: (f) =>
      withRegistry(f, async (reg) => {
        await reg.touchRobot("r1", "2025-01-01T00:00:00.000Z");
        await reg.createTask({
          id: "t1",
          robotId: "r1",
          command: ["sleep", "9"],
          env: {},
          timeoutSeconds: 30,
          createdAt: "2025-01-01T00:00:00.000Z",
          expiresAt: "2025-01-01T01:00:00.000Z",
        });
        await reg.applyTaskEvent("t1", "dispatch", "2025-01-01T00:00:01.000Z");
        const a = (await reg.applyTaskEvent("t1", "cancel", "2025-01-01T00:00:02.000Z", {
          cancelRequestedBy: "spiffe://td/operator/a",
        }))!;
        assert.equal(a.task.state, "cancelling");
        await reg.applyTaskEvent("t1", "cancel", "2025-01-01T00:00:03.000Z", {
          cancelRequestedBy: "spiffe://td/operator/b",
        });
        const r = (await reg.applyTaskEvent("t1", "cancelled", "2025-01-01T00:00:04.000Z", {
          error: "cancelled",
        }))!;
        assert.equal(r.task.state, "cancelled");
        assert.equal(r.task.cancelRequestedAt, "2025-01-01T00:00:02.000Z");
        assert.equal(r.task.cancelRequestedBy, "spiffe://td/operator/a");
        assert.equal(r.task.finishedAt, "2025-01-01T00:00:04.000Z");
        assert.deepEqual(await reg.countTasksByState(), { cancelled: 1 });
      }),
  },
];

// ---------------------------------------------------------------------------------- fleet

class FakePublisher implements Publisher {
  sent: string[] = [];
  publish(topic: string): Promise<void> {
    this.sent.push(topic);
    return Promise.resolve();
  }
  connected() {
    return true;
  }
}

const T0 = Date.parse("2025-01-01T00:00:00Z");
const iso = (ms: number) => new Date(ms).toISOString();

const PROBE_TOPIC = "k8s4r/server/k8s4r-server/probe";

/** The server's own probe, echoed by the broker: it was published at `sentAt`. */
function probe(sentAt: number) {
  return { topic: PROBE_TOPIC, payload: new TextEncoder().encode(String(sentAt)) };
}

async function withFleet(
  f: RegistryFixture,
  fn: (s: {
    clock: { t: number };
    registry: Registry;
    pub: FakePublisher;
    fleet: FleetService;
    logs: string[];
  }, store: RegistryStore) => Promise<void>,
  opts: { probe?: boolean } = {},
): Promise<void> {
  await withRegistry(f, async (registry, store) => {
    const clock = { t: T0 };
    const pub = new FakePublisher();
    const logs: string[] = [];
    const fleet = new FleetService(registry, pub, {
      now: () => new Date(clock.t),
      heartbeatIntervalSeconds: 10,
      logger: { info: (m) => logs.push(m), warn: (m) => logs.push(m) },
      signer: UNSIGNED,
      ...(opts.probe ? { probeTopic: PROBE_TOPIC, probeStallMs: 2000 } : {}),
    });
    try {
      await fn({ clock, registry, pub, fleet, logs }, store);
    } finally {
      await fleet.settled();
    }
  });
}

function msg(robotId: string, kind: string, body: Record<string, unknown>, ts: number) {
  return {
    topic: `k8s4r/robots/${robotId}/up/${kind}`,
    payload: new TextEncoder().encode(JSON.stringify({ v: 1, robotId, ts: iso(ts), ...body })),
  };
}

function register(id: string, ts: number, bootId?: string, connection?: number) {
  return msg(id, "register", {
    type: "register",
    spiffeId: `spiffe://k8s4r.test/robot/${id}`,
    agentVersion: "test",
    heartbeatIntervalSeconds: 5,
    svidExpiresAt: iso(T0 + 3600_000),
    device: { ...device, cpus: 1, memoryBytes: 1 },
    ...(bootId !== undefined ? { bootId } : {}),
    ...(connection !== undefined ? { connection } : {}),
  }, ts);
}

function status(
  id: string,
  s: "online" | "offline",
  ts: number,
  bootId?: string,
  connection?: number,
  reason?: string,
) {
  return msg(id, "status", {
    type: "status",
    status: s,
    ...(reason ? { reason } : {}),
    ...(bootId !== undefined ? { bootId } : {}),
    ...(connection !== undefined ? { connection } : {}),
  }, ts);
}

function heartbeat(id: string, ts: number, seq: number, bootId?: string) {
  return msg(id, "heartbeat", {
    type: "heartbeat",
    seq,
    svidExpiresAt: iso(T0 + 3600_000),
    ...(bootId !== undefined ? { bootId } : {}),
  }, ts);
}

/** The statement that counts a heartbeat (RegistryTx.recordHeartbeat). */
const HEARTBEAT_UPDATE = /heartbeats_received = heartbeats_received \+ 1/;

// ---------------------------------------------------------------------------------- cancel

const ADMIN = "spiffe://k8s4r.test/operator/admin";

/** A publisher whose PUBACKs the test releases by hand (`ack()`), to hold a publish in flight. */
class HeldPublisher implements Publisher {
  sent: { topic: string; msg: DownMessage }[] = [];
  held: (() => void)[] = [];
  hold = false;
  online = true;
  #waiters: { n: number; resolve: () => void }[] = [];
  publish(topic: string, payload: Uint8Array): Promise<void> {
    const d = decodeDown(topic, payload);
    if (!d.ok) throw new Error(`server published an invalid message: ${d.error}`);
    this.sent.push({ topic, msg: d.message });
    for (const w of this.#waiters.filter((w) => w.n <= this.sent.length)) w.resolve();
    this.#waiters = this.#waiters.filter((w) => w.n > this.sent.length);
    if (!this.hold) return Promise.resolve();
    return new Promise((resolve) => this.held.push(resolve));
  }
  /** Resolves once `n` messages have been published (no timer: on the publish itself). */
  sentCount(n: number): Promise<void> {
    if (this.sent.length >= n) return Promise.resolve();
    return new Promise((resolve) => this.#waiters.push({ n, resolve }));
  }
  ack(): void {
    for (const r of this.held.splice(0)) r();
  }
  connected() {
    return this.online;
  }
}

/** Records what it signed; the payload stays plain JSON so the fake publisher can decode it. */
class RecordingSigner implements DownSigner {
  signed: DownMessage[] = [];
  fail = false;
  sign(msg: DownMessage): Uint8Array {
    if (this.fail) throw new Error("no SVID yet");
    this.signed.push(msg);
    return encode(msg);
  }
}

interface CancelFleet {
  clock: { t: number };
  registry: Registry;
  pub: HeldPublisher;
  signer: RecordingSigner;
  fleet: FleetService;
  online(id: string, on: boolean): Promise<void>;
  report(robotId: string, taskId: string, state: string, extra?: object): Promise<void>;
}

/**
 * Cancel through FleetService: a pending task nobody is publishing is withdrawn (cancelled at
 * once, never sent); anything that may have reached the robot becomes `cancelling`, gets a
 * signed cancel (now, or when the robot comes back) and ends with the robot's report; the
 * sweeper settles what the robot never took up. Every task and cancel goes through the signer.
 */
function withCancelFleet(
  f: RegistryFixture,
  fn: (s: CancelFleet) => Promise<void>,
): Promise<void> {
  return withRegistry(f, async (registry) => {
    const clock = { t: T0 };
    const pub = new HeldPublisher();
    const signer = new RecordingSigner();
    let n = 0;
    const fleet = new FleetService(registry, pub, {
      now: () => new Date(clock.t),
      newId: () => `t${++n}`,
      heartbeatIntervalSeconds: 10,
      resultGraceSeconds: 60,
      signer,
    });
    const online = async (id: string, on: boolean) => {
      await registry.touchRobot(id, iso(clock.t));
      await registry.setOnline(id, on, on ? null : "test");
    };
    const report = async (robotId: string, taskId: string, state: string, extra = {}) => {
      const body = {
        v: 1,
        type: "task-status",
        robotId,
        ts: iso(clock.t),
        taskId,
        state,
        ...extra,
      };
      const r = await fleet.handleMessage(
        `k8s4r/robots/${robotId}/up/task`,
        new TextEncoder().encode(JSON.stringify(body)),
      );
      assert.ok(r.ok, `report ${state}: ${JSON.stringify(r)}`);
    };
    try {
      await fn({ clock, registry, pub, signer, fleet, online, report });
    } finally {
      pub.hold = false;
      pub.ack();
      await fleet.settled();
    }
  });
}

const cancels = (pub: HeldPublisher) => pub.sent.filter((s) => s.msg.type === "cancel");
const tasksSent = (pub: HeldPublisher) => pub.sent.filter((s) => s.msg.type === "task");

const cancelCases: ContractCase[] = [
  {
    name: "cancel: a pending task of an offline robot is cancelled at once and never sent",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, online }) => {
        await online("robot-001", false);
        const t = await fleet.createTask("robot-001", {
          command: ["sleep", "600"],
          env: {},
          timeoutSeconds: 600,
        }, ADMIN);
        assert.equal(t.state, "pending");
        assert.equal(t.createdBy, ADMIN);
        const r = await fleet.cancelTask(t.id, ADMIN);
        assert.equal(r.outcome, "withdrawn");
        assert.equal(r.task.state, "cancelled");
        assert.equal(r.task.cancelRequestedBy, ADMIN);
        assert.ok(r.task.finishedAt);
        assert.match(r.task.error ?? "", /before it was sent/);
        // The robot comes back: the task is not sent.
        await online("robot-001", true);
        await fleet.dispatchFor("robot-001");
        await fleet.settled();
        assert.equal(tasksSent(pub).length, 0, "a withdrawn task was sent");
        assert.equal((await registry.getTask(t.id))!.state, "cancelled");
        // Cancelling it again is a conflict, not a second cancel.
        await assert.rejects(() => fleet.cancelTask(t.id, ADMIN), ConflictError);
        await assert.rejects(() => fleet.cancelTask("nope", ADMIN), NotFoundError);
      }),
  },
  {
    name:
      "cancel: a dispatched task becomes cancelling, the robot gets a signed cancel, its report ends it",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, signer, online, report }) => {
        await online("robot-001", true);
        const t = await fleet.createTask("robot-001", {
          command: ["sleep", "600"],
          env: {},
          timeoutSeconds: 600,
        }, ADMIN);
        await fleet.settled();
        assert.equal((await registry.getTask(t.id))!.state, "dispatched");
        await report("robot-001", t.id, "running");
        const r = await fleet.cancelTask(t.id, ADMIN);
        assert.equal(r.outcome, "cancelling");
        assert.equal(r.task.state, "cancelling");
        await fleet.settled();
        const c = cancels(pub);
        assert.equal(c.length, 1);
        assert.equal(c[0].topic, "k8s4r/robots/robot-001/down/cancel");
        assert.equal(c[0].msg.type === "cancel" && c[0].msg.taskId, t.id);
        assert.deepEqual(
          signer.signed.map((m) => m.type),
          ["task", "cancel"],
          "both went through the signer",
        );
        assert.equal(fleet.stats.cancelsSent, 1);
        // A second request re-sends the cancel; the state does not move.
        assert.equal((await fleet.cancelTask(t.id, ADMIN)).outcome, "already");
        await fleet.settled();
        assert.equal(cancels(pub).length, 2);
        // A progress report while cancelling keeps it cancelling; the robot's cancelled ends it.
        await report("robot-001", t.id, "running");
        assert.equal((await registry.getTask(t.id))!.state, "cancelling");
        await report("robot-001", t.id, "cancelled", { error: "killed: cancelled" });
        const done = (await registry.getTask(t.id))!;
        assert.equal(done.state, "cancelled");
        assert.ok(done.finishedAt);
        // Re-dispatch never resends a cancelling or cancelled task.
        await fleet.dispatchFor("robot-001");
        await fleet.settled();
        assert.equal(tasksSent(pub).length, 1);
      }),
  },
  {
    name: "cancel: a task being published (no PUBACK yet) is not withdrawn: it may reach the robot",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, online, report }) => {
        await online("robot-001", true);
        pub.hold = true;
        const t = await fleet.createTask("robot-001", {
          command: ["true"],
          env: {},
          timeoutSeconds: 5,
        }, ADMIN);
        assert.equal((await registry.getTask(t.id))!.state, "pending");
        await pub.sentCount(1); // the task is on its way; its PUBACK is held
        const r = await fleet.cancelTask(t.id, ADMIN);
        assert.equal(r.outcome, "cancelling", "a task in flight must be cancelled on the robot");
        // The task's PUBACK comes after the cancel was recorded (then the cancel's own).
        pub.hold = false;
        pub.ack();
        await fleet.settled();
        assert.equal(
          (await registry.getTask(t.id))!.state,
          "cancelling",
          "the late PUBACK does not undo it",
        );
        assert.equal((await registry.getTask(t.id))!.dispatchCount, 1);
        // The cancel went out when it was asked for, and again after the task's PUBACK: the
        // robot hears of it after the task, whichever server sent the first one.
        assert.deepEqual(
          pub.sent.map((s) => s.msg.type),
          ["task", "cancel", "cancel"],
        );
        // The robot ran it to completion before the cancel arrived: its report wins.
        await report("robot-001", t.id, "done", { exitCode: 0 });
        assert.equal((await registry.getTask(t.id))!.state, "done");
        await assert.rejects(() => fleet.cancelTask(t.id, ADMIN), /already done/);
      }),
  },
  {
    name:
      "cancel: withdraw and claim race in the database: a withdrawn task is never sent, a claimed one is cancelled",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, online, clock }) => {
        const mk = () =>
          fleet.createTask("robot-001", { command: ["true"], env: {}, timeoutSeconds: 5 }, ADMIN);
        // 1. The withdraw commits first: no claim can take the task afterwards.
        await online("robot-001", false);
        const t = await mk();
        assert.equal((await registry.getTask(t.id))!.dispatchOwner, null, "offline: unclaimed");
        await online("robot-001", true);
        assert.equal((await fleet.cancelTask(t.id, ADMIN)).outcome, "withdrawn");
        await fleet.dispatchFor("robot-001");
        await fleet.sweep();
        await fleet.settled();
        assert.equal(tasksSent(pub).length, 0, "a withdrawn task was published");
        // 2. Another server (a replica, same registry) holds a claim on a task: this one does
        // not publish it, and a cancel is not a withdraw (the task may be on its way).
        await online("robot-001", false);
        const u = await mk();
        await online("robot-001", true);
        const other = new FleetService(registry, pub, {
          now: () => new Date(clock.t),
          instance: "other-replica",
          signer: UNSIGNED,
        });
        pub.hold = true;
        await other.dispatchFor("robot-001");
        await pub.sentCount(1);
        assert.equal((await registry.getTask(u.id))!.dispatchOwner, "other-replica");
        await fleet.dispatchFor("robot-001");
        await fleet.sweep();
        assert.equal(tasksSent(pub).length, 1, "a task claimed by another server was sent again");
        const r = await fleet.cancelTask(u.id, ADMIN);
        assert.equal(r.outcome, "cancelling");
        pub.hold = false;
        pub.ack();
        await other.settled();
        await fleet.settled();
        const after = (await registry.getTask(u.id))!;
        assert.equal(after.state, "cancelling");
        assert.equal(after.dispatchOwner, null, "the claim is released after the PUBACK");
        assert.deepEqual(
          pub.sent.filter((s) => (s.msg.type === "task" ? s.msg.id : s.msg.taskId) === u.id)
            .map((s) => s.msg.type),
          ["task", "cancel", "cancel"],
          "the task once, the cancel after it",
        );
        // 3. Positive control: an unclaimed task of an online robot is sent by the sweeper.
        await online("robot-001", false);
        const v = await mk();
        await online("robot-001", true);
        await fleet.sweep();
        await fleet.settled();
        assert.deepEqual(tasksSent(pub).map((s) => s.msg.type === "task" && s.msg.id), [
          u.id,
          v.id,
        ]);
        assert.equal((await registry.getTask(v.id))!.state, "dispatched");
      }),
  },
  {
    name: "dispatch claims: a claim whose holder died expires, and the task is sent by another",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, online, clock }) => {
        await online("robot-001", true);
        // A replica claimed the task and died before its PUBACK (nothing released the claim).
        const dead = new FleetService(registry, {
          publish: () => new Promise(() => {}),
          connected: () => true,
        }, {
          now: () => new Date(clock.t),
          instance: "dead-replica",
          claimLeaseSeconds: 30,
          signer: UNSIGNED,
        });
        const t = await dead.createTask("robot-001", {
          command: ["true"],
          env: {},
          timeoutSeconds: 5,
        }, ADMIN);
        assert.equal((await registry.getTask(t.id))!.dispatchOwner, "dead-replica");
        await fleet.dispatchFor("robot-001");
        await fleet.sweep();
        await fleet.settled();
        assert.equal(tasksSent(pub).length, 0, "sent while another server held its claim");
        // A cancel meanwhile would not be a withdraw; past the lease the task is free again.
        clock.t += 31_000;
        await online("robot-001", true); // heard from meanwhile
        await fleet.sweep();
        await fleet.settled();
        assert.deepEqual(tasksSent(pub).map((s) => s.msg.type === "task" && s.msg.id), [t.id]);
        const done = (await registry.getTask(t.id))!;
        assert.equal(done.state, "dispatched");
        assert.equal(done.dispatchCount, 1);
        assert.equal(done.dispatchOwner, null);
      }),
  },
  {
    name:
      "dispatched tasks are sent again once per new connection (register or online first), never on a replay",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, pub }) => {
        const h = async (m: { topic: string; payload: Uint8Array }) => {
          const r = await fleet.handleMessage(m.topic, m.payload);
          assert.equal(r.ok, true, JSON.stringify(r));
          await fleet.settled();
        };
        const sent = () => tasksSent(pub).length;
        await h(register("robot-001", T0, "boot-a", 1));
        const t = await fleet.createTask("robot-001", {
          command: ["true"],
          env: {},
          timeoutSeconds: 5,
        }, ADMIN);
        await fleet.settled();
        assert.equal(sent(), 1, "the task is dispatched");
        // The same connection's register again (a redelivery, another replica's copy): a
        // replay, the robot was subscribed when the task went out.
        await h(register("robot-001", T0 + 1, "boot-a", 1));
        await h(status("robot-001", "online", T0 + 2, "boot-a", 1));
        assert.equal(sent(), 1, "sent again on a replay of the same connection");
        // Connection 2 (its session may be gone): sent again, once.
        await h(register("robot-001", T0 + 3, "boot-a", 2));
        assert.equal(sent(), 2);
        await h(status("robot-001", "online", T0 + 4, "boot-a", 2));
        await h(register("robot-001", T0 + 5, "boot-a", 2));
        assert.equal(sent(), 2, "one connection, one resend");
        // Connection 3's online applied before its register (two replicas): once as well.
        await h(status("robot-001", "online", T0 + 6, "boot-a", 3));
        await h(register("robot-001", T0 + 7, "boot-a", 3));
        assert.equal(sent(), 3);
        // A new boot (the agent restarted): sent again.
        await h(register("robot-001", T0 + 8, "boot-b", 1));
        assert.equal(sent(), 4);
        assert.ok(tasksSent(pub).every((s) => s.msg.type === "task" && s.msg.id === t.id));
      }),
  },
  {
    name: "cancel: the robot is offline: the cancel goes out when it comes back",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, online }) => {
        await online("robot-001", true);
        const t = await fleet.createTask(
          "robot-001",
          { command: ["sleep", "9"], env: {}, timeoutSeconds: 30 },
          ADMIN,
        );
        await fleet.settled();
        await online("robot-001", false);
        await fleet.cancelTask(t.id, ADMIN);
        await fleet.settled();
        assert.equal(cancels(pub).length, 0, "nothing is sent to an offline robot");
        await online("robot-001", true);
        await fleet.dispatchFor("robot-001");
        await fleet.settled();
        assert.equal(cancels(pub).length, 1);
        assert.equal(tasksSent(pub).length, 1, "the task is not re-sent");
        assert.equal((await registry.getTask(t.id))!.state, "cancelling");
      }),
  },
  {
    name: "cancel: the sweeper settles cancels the robot never answers",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, clock, online, report }) => {
        await online("robot-001", true);
        const never = await fleet.createTask("robot-001", {
          command: ["x"],
          env: {},
          timeoutSeconds: 10,
          ttlSeconds: 30,
        }, ADMIN);
        const ran = await fleet.createTask("robot-001", {
          command: ["y"],
          env: {},
          timeoutSeconds: 10,
        }, ADMIN);
        await fleet.settled();
        await report("robot-001", ran.id, "running");
        await fleet.cancelTask(never.id, ADMIN);
        await fleet.cancelTask(ran.id, ADMIN);
        await fleet.settled();
        clock.t += 31_000; // past never's expiresAt: a robot would refuse it now
        await online("robot-001", true);
        let s = await fleet.sweep();
        assert.deepEqual(s.expired, [never.id]);
        assert.equal((await registry.getTask(never.id))!.state, "cancelled");
        assert.equal(
          (await registry.getTask(ran.id))!.state,
          "cancelling",
          "it ran: only its report or loss ends it",
        );
        clock.t += 10_000 + 61_000; // past timeout + grace with no report
        await registry.touchRobot("robot-001", iso(clock.t));
        s = await fleet.sweep();
        assert.deepEqual(s.lost, [ran.id]);
        assert.equal((await registry.getTask(ran.id))!.state, "failed");
      }),
  },
  {
    // A robot keeps no broker session while away: it misses what was published to it before it
    // subscribed again, and the register of its new connection asks for everything again. A
    // publish still waiting for its PUBACK at that moment may be one the broker dropped: it goes
    // out again after that PUBACK, whichever server holds its claim.
    name:
      "dispatch: a new connection's register while a task's publish is in flight (this server's claim or another's) sends it again after the PUBACK",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, online, clock }) => {
        const sentOf = (id: string) =>
          tasksSent(pub).filter((s) => s.msg.type === "task" && s.msg.id === id).length;
        await online("robot-001", true);
        // 1. This server's claim.
        pub.hold = true;
        const t = await fleet.createTask("robot-001", {
          command: ["true"],
          env: {},
          timeoutSeconds: 60,
        }, ADMIN);
        await pub.sentCount(1); // on its way, PUBACK held
        // The robot's new connection registers meanwhile (its subscription came after the
        // publish): what that register asks for, awaited so that its transaction is done.
        await fleet.dispatchFor("robot-001", { resend: true });
        assert.ok(
          resendRequestedSinceClaim((await registry.getTask(t.id))!.resendRequestedAt),
          "marked while claimed",
        );
        assert.equal(sentOf(t.id), 1, "not sent twice at once");
        pub.hold = false;
        pub.ack();
        await fleet.settled();
        assert.equal(sentOf(t.id), 2);
        let after = (await registry.getTask(t.id))!;
        assert.equal(after.state, "dispatched");
        assert.equal(after.dispatchCount, 2);
        assert.equal(after.dispatchOwner, null, "the claim is released after the second PUBACK");
        assert.equal(after.resendRequestedAt, null, "the claim took the mark up");
        // 2. Another replica (same registry) holds the claim: it publishes again.
        await online("robot-001", false);
        const v = await fleet.createTask("robot-001", {
          command: ["true"],
          env: {},
          timeoutSeconds: 60,
        }, ADMIN);
        await online("robot-001", true);
        const other = new FleetService(registry, pub, {
          now: () => new Date(clock.t),
          instance: "other-replica",
          signer: UNSIGNED,
        });
        pub.hold = true;
        const before = pub.sent.length;
        await other.dispatchFor("robot-001");
        await pub.sentCount(before + 1);
        assert.equal((await registry.getTask(v.id))!.dispatchOwner, "other-replica");
        // Control: a register that opens no new connection (a redelivery) asks for nothing.
        await fleet.dispatchFor("robot-001");
        assert.equal((await registry.getTask(v.id))!.resendRequestedAt, RESEND_CLAIMED);
        await fleet.dispatchFor("robot-001", { resend: true });
        assert.ok(
          resendRequestedSinceClaim((await registry.getTask(v.id))!.resendRequestedAt),
          "marked under its claim",
        );
        assert.equal(sentOf(v.id), 1, "this server does not publish what another one holds");
        pub.hold = false;
        pub.ack();
        await other.settled();
        await fleet.settled();
        assert.equal(sentOf(v.id), 2, "the claim holder published it again after its PUBACK");
        after = (await registry.getTask(v.id))!;
        assert.equal(after.dispatchCount, 2);
        assert.equal(after.dispatchOwner, null);
        assert.equal(after.resendRequestedAt, null);
        // Control: a publish nobody asked again for goes out once.
        const u = await fleet.createTask("robot-001", {
          command: ["true"],
          env: {},
          timeoutSeconds: 60,
        }, ADMIN);
        await fleet.settled();
        assert.equal(sentOf(u.id), 1);
        // The second register re-sent the dispatched `t` too (free: claimed and sent at once).
        assert.equal(sentOf(t.id), 3);
      }),
  },
  {
    // The holder of a claim died (or its publish failed) after the robot's new connection asked
    // for the task again: nobody publishes it after a PUBACK, so the sweep does, once the claim
    // is free. A dispatched task nobody asked again for waits for its robot.
    name:
      "dispatch claims: a resend asked while a dead replica held the claim is sent by the sweep after the lease",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, online, clock }) => {
        const sentOf = (id: string) =>
          tasksSent(pub).filter((s) => s.msg.type === "task" && s.msg.id === id).length;
        await online("robot-001", true);
        const mk = () =>
          fleet.createTask("robot-001", { command: ["true"], env: {}, timeoutSeconds: 60 }, ADMIN);
        const t = await mk();
        await fleet.settled();
        assert.equal((await registry.getTask(t.id))!.state, "dispatched");
        // A replica claimed it to send it again and died before publishing.
        const at = iso(clock.t);
        const taken = await registry.transaction((tx) =>
          tx.claimTasks({
            owner: "dead-replica",
            now: at,
            leaseUntil: iso(clock.t + 30_000),
            taskId: t.id,
            limit: 1,
          })
        );
        assert.equal(taken.length, 1);
        await fleet.dispatchFor("robot-001", { resend: true });
        await fleet.settled();
        assert.equal(sentOf(t.id), 1, "sent while another server held its claim");
        assert.ok((await registry.getTask(t.id))!.resendRequestedAt);
        const x = await mk(); // dispatched after that register: nothing asked again for it
        await fleet.settled();
        await fleet.sweep();
        await fleet.settled();
        assert.equal(sentOf(t.id), 1, "the sweep took a claim that holds");
        clock.t += 31_000;
        await online("robot-001", true); // heard from meanwhile
        await fleet.sweep();
        await fleet.settled();
        assert.equal(sentOf(t.id), 2, "the sweep sends what was asked for once the claim is free");
        const done = (await registry.getTask(t.id))!;
        assert.equal(done.dispatchOwner, null);
        assert.equal(done.resendRequestedAt, null);
        assert.equal(sentOf(x.id), 1, "the sweep does not re-send a dispatched task unasked");
        await fleet.sweep();
        await fleet.settled();
        assert.equal(sentOf(t.id), 2, "sent again once");
      }),
  },
  {
    // Fault injection: the server that claimed a dispatched task for a robot's new connection
    // dies before its publish (or between the PUBACK and the transaction that records it), or
    // its publish fails. The robot's subscription is new: nothing else will ever send the task
    // to it, so the resend must survive the claim (the sweep sends it once the claim is free).
    name:
      "dispatch claims: a new connection's resend survives its claimer dying before the PUBACK is recorded, or a failed publish",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, online, clock }) => {
        const sentOf = (id: string) =>
          tasksSent(pub).filter((s) => s.msg.type === "task" && s.msg.id === id).length;
        await online("robot-001", true);
        const mk = () =>
          fleet.createTask("robot-001", { command: ["true"], env: {}, timeoutSeconds: 600 }, ADMIN);
        const t = await mk();
        await fleet.settled();
        assert.equal((await registry.getTask(t.id))!.state, "dispatched");
        // 1. A replica handles the robot's new connection (register): claims t to send it
        // again, and dies with its publish in flight (no PUBACK is ever recorded).
        let onWire!: () => void;
        const published = new Promise<void>((resolve) => onWire = resolve);
        const dead = new FleetService(registry, {
          publish: () => {
            onWire();
            return new Promise(() => {});
          },
          connected: () => true,
        }, {
          now: () => new Date(clock.t),
          instance: "dead-replica",
          claimLeaseSeconds: 30,
          signer: UNSIGNED,
        });
        void dead.dispatchFor("robot-001", { resend: true });
        await published; // claimed, on its way; its PUBACK never comes
        assert.equal((await registry.getTask(t.id))!.dispatchOwner, "dead-replica");
        await fleet.sweep();
        await fleet.settled();
        assert.equal(sentOf(t.id), 1, "sent while the dead replica's claim held");
        clock.t += 31_000;
        await online("robot-001", true); // heard from meanwhile
        await fleet.sweep();
        await fleet.settled();
        assert.equal(sentOf(t.id), 2, "the resend died with its claimer: the robot never gets t");
        let after = (await registry.getTask(t.id))!;
        assert.equal(after.dispatchOwner, null);
        assert.equal(after.resendRequestedAt, null, "the recorded PUBACK took the request up");
        await fleet.sweep();
        await fleet.settled();
        assert.equal(sentOf(t.id), 2, "sent again once, not on every sweep");
        // 2. The publish of the resend fails (the broker link broke under it): the claim is
        // released; the next sweep sends it.
        const failing = new FleetService(registry, {
          publish: () => Promise.reject(new Error("connection closed (injected)")),
          connected: () => true,
        }, { now: () => new Date(clock.t), instance: "failing-replica", signer: UNSIGNED });
        await failing.dispatchFor("robot-001", { resend: true });
        await failing.settled();
        assert.equal(failing.stats.publishErrors, 1);
        assert.equal((await registry.getTask(t.id))!.dispatchOwner, null, "released on failure");
        await fleet.sweep();
        await fleet.settled();
        assert.equal(sentOf(t.id), 3, "a failed resend is not tried again");
        after = (await registry.getTask(t.id))!;
        assert.equal(after.resendRequestedAt, null);
        assert.equal(after.dispatchCount, 3);
        // Control: a dispatched task nobody asked again for is not re-sent by the sweep.
        const u = await mk();
        await fleet.settled();
        await fleet.sweep();
        await fleet.settled();
        assert.equal(sentOf(u.id), 1);
      }),
  },
  {
    // Fault injection: an operator's cancel races the resend of a dispatched task to the
    // robot's new connection. The copy on its way may reach the robot after the cancel: the
    // cancel goes out again after its PUBACK, and nothing sends the task after that.
    name: "cancel racing a resend: the cancel follows the resent copy; the task is not sent again",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, online, clock }) => {
        await online("robot-001", true);
        const t = await fleet.createTask("robot-001", {
          command: ["sleep", "600"],
          env: {},
          timeoutSeconds: 600,
        }, ADMIN);
        await fleet.settled();
        pub.hold = true;
        const resend = fleet.dispatchFor("robot-001", { resend: true });
        await pub.sentCount(2); // the resent copy is on its way
        await resend;
        assert.equal((await fleet.cancelTask(t.id, ADMIN)).outcome, "cancelling");
        // Another new connection while both are in flight: it must not bring the task back.
        await fleet.dispatchFor("robot-001", { resend: true });
        pub.hold = false;
        pub.ack();
        await fleet.settled();
        const of = pub.sent.filter((s) =>
          (s.msg.type === "task" ? s.msg.id : s.msg.taskId) === t.id
        )
          .map((s) => s.msg.type);
        assert.deepEqual(of.slice(0, 2), ["task", "task"]);
        assert.equal(of.at(-1), "cancel", "the last word to the robot is the cancel");
        assert.equal(of.filter((x) => x === "task").length, 2, "the cancelled task was sent again");
        const after = (await registry.getTask(t.id))!;
        assert.equal(after.state, "cancelling");
        assert.equal(after.dispatchOwner, null);
        // The sweep (and a lapsed lease) never send it again either.
        clock.t += 31_000;
        await online("robot-001", true);
        await fleet.sweep();
        await fleet.settled();
        assert.equal(
          tasksSent(pub).filter((s) => s.msg.type === "task" && s.msg.id === t.id).length,
          2,
        );
      }),
  },
  {
    // Fault injection: the register of a new connection is handled while this server's broker
    // link is down (it dropped after the register came in). Nothing can be published now; the
    // robot's request must not be dropped: sent once the link is back (dispatchAllOnline).
    name:
      "dispatch: a new connection's register while the broker link is down: its resend goes out after the reconnect",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, online }) => {
        const sentOf = (id: string) =>
          tasksSent(pub).filter((s) => s.msg.type === "task" && s.msg.id === id).length;
        await online("robot-001", true);
        const t = await fleet.createTask("robot-001", {
          command: ["true"],
          env: {},
          timeoutSeconds: 600,
        }, ADMIN);
        await fleet.settled();
        assert.equal(sentOf(t.id), 1);
        // Control: with the link up, a new connection gets t again at once.
        await fleet.dispatchFor("robot-001", { resend: true });
        await fleet.settled();
        assert.equal(sentOf(t.id), 2);
        // The link is down while the next new connection's register is handled.
        pub.online = false;
        await fleet.dispatchFor("robot-001", { resend: true });
        await fleet.settled();
        assert.equal(sentOf(t.id), 2, "published with the link down");
        pub.online = true;
        await fleet.dispatchAllOnline();
        await fleet.settled();
        assert.equal(sentOf(t.id), 3, "the register's resend was dropped with the link down");
        assert.equal((await registry.getTask(t.id))!.resendRequestedAt, null);
        // Once: a second reconnect sends nothing more.
        await fleet.dispatchAllOnline();
        await fleet.settled();
        assert.equal(sentOf(t.id), 3);
      }),
  },
  {
    name: "cancel: a register while the cancel's publish is in flight sends it again after it",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, online }) => {
        await online("robot-001", true);
        const t = await fleet.createTask("robot-001", {
          command: ["sleep", "600"],
          env: {},
          timeoutSeconds: 600,
        }, ADMIN);
        await fleet.settled();
        pub.hold = true;
        await fleet.cancelTask(t.id, ADMIN);
        await pub.sentCount(2); // the cancel is on its way, PUBACK held
        // The robot's new connection registers meanwhile: what that register asks for
        // (awaited: its reads are done).
        await fleet.dispatchFor("robot-001", { resend: true });
        pub.hold = false;
        pub.ack();
        await fleet.settled();
        assert.equal(cancels(pub).length, 2);
        assert.equal((await registry.getTask(t.id))!.state, "cancelling");
      }),
  },
  {
    // Withdrawn: never sent by this process, but an earlier process's publish (its PUBACK lost
    // in a crash) may have reached the robot, so the robot is told once. A robot without a
    // broker session misses that cancel when it is away at that moment; its report on the
    // task is then the sign it runs a task that is cancelled: it is told again.
    name: "cancel: a robot reporting on a withdrawn task (accepted, running) gets the cancel again",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, online, report }) => {
        await online("robot-001", false);
        const t = await fleet.createTask("robot-001", {
          command: ["sleep", "600"],
          env: {},
          timeoutSeconds: 600,
        }, ADMIN);
        assert.equal((await fleet.cancelTask(t.id, ADMIN)).outcome, "withdrawn");
        await fleet.settled();
        assert.equal(cancels(pub).length, 1);
        await online("robot-001", true);
        await report("robot-001", t.id, "accepted");
        await fleet.settled();
        assert.equal(cancels(pub).length, 2, "the accepted report of a withdrawn task");
        await report("robot-001", t.id, "running");
        await fleet.settled();
        assert.equal(cancels(pub).length, 3, "the running report of a withdrawn task");
        const c = cancels(pub)[2];
        assert.equal(c.topic, "k8s4r/robots/robot-001/down/cancel");
        assert.equal(c.msg.type === "cancel" && c.msg.taskId, t.id);
        assert.equal((await registry.getTask(t.id))!.state, "cancelled");
        // Control: its final report needs no cancel; nor does a task that simply ended.
        await report("robot-001", t.id, "cancelled", { error: "killed: cancelled" });
        const u = await fleet.createTask("robot-001", {
          command: ["true"],
          env: {},
          timeoutSeconds: 60,
        }, ADMIN);
        await fleet.settled();
        await report("robot-001", u.id, "accepted");
        await report("robot-001", u.id, "done", { exitCode: 0 });
        await report("robot-001", u.id, "running"); // a late duplicate
        await fleet.settled();
        assert.equal(cancels(pub).length, 3);
      }),
  },
  {
    name: "signing: a task that cannot be signed is not sent, counted, and stays pending",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, signer, online }) => {
        await online("robot-001", true);
        signer.fail = true;
        const t = await fleet.createTask("robot-001", {
          command: ["true"],
          env: {},
          timeoutSeconds: 5,
        }, ADMIN);
        await fleet.settled();
        assert.equal(pub.sent.length, 0);
        assert.equal(fleet.stats.signErrors, 1);
        assert.equal((await registry.getTask(t.id))!.state, "pending");
        signer.fail = false;
        await fleet.dispatchFor("robot-001");
        await fleet.settled();
        assert.equal((await registry.getTask(t.id))!.state, "dispatched");
      }),
  },
  {
    name:
      "signing: every publish is signed afresh with the SVID current then (a re-dispatch after a rotation carries the new one)",
    fn: (f) =>
      withRegistry(f, async (registry) => {
        const web = new TestHttps("k8s4r.test");
        const raw: { topic: string; payload: Uint8Array }[] = [];
        const pub: Publisher = {
          publish: (topic, payload) => {
            raw.push({ topic, payload });
            return Promise.resolve();
          },
          connected: () => true,
        };
        const fleet = new FleetService(registry, pub, { signer: new TaskSigner(web.source) });
        try {
          await registry.touchRobot("robot-001", new Date().toISOString());
          await registry.setOnline("robot-001", true, null);
          const t = await fleet.createTask("robot-001", {
            command: ["true"],
            env: {},
            timeoutSeconds: 5,
          }, ADMIN);
          await fleet.settled();
          const first = web.source.getX509Svid().serialNumber;
          web.rotate(); // SPIRE renewed the server's SVID; the task was not acknowledged yet
          const second = web.source.getX509Svid().serialNumber;
          assert.notEqual(first, second);
          await fleet.dispatchFor("robot-001", { resend: true }); // the robot's new connection
          await fleet.cancelTask(t.id, ADMIN);
          await fleet.settled();
          const check = (p: { topic: string; payload: Uint8Array }) => {
            const v = checkDown(p.topic, p.payload, {
              robotId: "robot-001",
              bundles: web.source,
              signerId: fleetServerSpiffeId("k8s4r.test"),
            });
            assert.ok(v.ok, JSON.stringify(v));
            const jws = parseJws(JSON.parse(new TextDecoder().decode(p.payload)));
            return new X509Certificate(Buffer.from(jws.header.x5c[0], "base64")).serialNumber;
          };
          assert.deepEqual(raw.map((p) => p.topic), [
            "k8s4r/robots/robot-001/down/task",
            "k8s4r/robots/robot-001/down/task",
            "k8s4r/robots/robot-001/down/cancel",
          ]);
          assert.deepEqual(raw.map(check), [first, second, second]);
        } finally {
          await fleet.settled();
          web.close();
        }
      }),
  },
  {
    name:
      "refusal reasons: bad-signature, wrong-robot and replay never change a task, and are counted",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, online, report }) => {
        await online("robot-001", true);
        const mk = () =>
          fleet.createTask("robot-001", { command: ["true"], env: {}, timeoutSeconds: 30 }, ADMIN);
        const dispatched = await mk();
        const running = await mk();
        const done = await mk();
        await fleet.settled();
        await report("robot-001", running.id, "running");
        await report("robot-001", done.id, "done", { exitCode: 0 });
        const states = () =>
          Promise.all(
            [dispatched, running, done].map(async (t) => (await registry.getTask(t.id))!.state),
          );
        const before = await states();
        assert.deepEqual(before, ["dispatched", "running", "done"]);
        const unknown = fleet.stats.unknownTaskReports;
        for (const reason of ["bad-signature", "wrong-robot", "replay"]) {
          for (const id of [dispatched.id, running.id, done.id, "forged-id"]) {
            await report("robot-001", id, "refused", { reason, error: `${reason}: test` });
          }
        }
        assert.deepEqual(await states(), before, "an untrusted refusal moved a task");
        assert.equal(fleet.stats.unknownTaskReports, unknown, "a forged id was looked up");
        assert.equal(fleet.stats.refusals["bad-signature"], 4);
        assert.equal(fleet.stats.refusals["wrong-robot"], 4);
        assert.equal(fleet.stats.refusals.replay, 4);
        // expired: an answer about a task the robot did not take up; a late copy of a running one
        // is not.
        await report("robot-001", running.id, "refused", {
          reason: "expired",
          error: "expired: x",
        });
        assert.equal((await registry.getTask(running.id))!.state, "running");
        await report("robot-001", dispatched.id, "refused", {
          reason: "expired",
          error: "expired: arrived after its expiresAt",
        });
        const exp = (await registry.getTask(dispatched.id))!;
        assert.equal(exp.state, "expired");
        assert.match(exp.error ?? "", /arrived after its expiresAt/);
        assert.equal(fleet.stats.refusals.expired, 2);
        // Positive control: an ordinary refusal (no reason) is the robot's answer.
        const plain = await mk();
        await fleet.settled();
        await report("robot-001", plain.id, "refused", { error: "not in tasks.allow" });
        assert.equal((await registry.getTask(plain.id))!.state, "refused");
        assert.equal(fleet.stats.refusals.task, 1);
      }),
  },
  {
    name:
      "cancel with the robot's half: a cancel before the task arrived ends cancelled, the late copy's replay refusal changes nothing",
    fn: (f) =>
      withCancelFleet(f, async ({ fleet, registry, pub, online, report }) => {
        await online("robot-001", true);
        pub.hold = true;
        const t = await fleet.createTask("robot-001", {
          command: ["sleep", "600"],
          env: {},
          timeoutSeconds: 600,
        }, ADMIN);
        await pub.sentCount(1); // in flight: the cancel cannot withdraw it
        assert.equal((await fleet.cancelTask(t.id, ADMIN)).outcome, "cancelling");
        pub.hold = false;
        pub.ack();
        await fleet.settled();
        // The cancel reached the robot first: it claims the id and reports cancelled.
        await report("robot-001", t.id, "cancelled", {
          error: "cancelled by the fleet server (before the task arrived; it will not run)",
        });
        assert.equal((await registry.getTask(t.id))!.state, "cancelled");
        // The task's copy arrives after: refused as a replay, which is not about the task.
        await report("robot-001", t.id, "refused", { reason: "replay", error: "replay: seen" });
        const after = (await registry.getTask(t.id))!;
        assert.equal(after.state, "cancelled");
        assert.match(after.error ?? "", /before the task arrived/);
        // A cancel of a never-delivered task the robot then refuses as expired: cancelled.
        await online("robot-001", false);
        const late = await fleet.createTask("robot-001", {
          command: ["true"],
          env: {},
          timeoutSeconds: 5,
        }, ADMIN);
        await online("robot-001", true);
        await fleet.dispatchFor("robot-001");
        await fleet.settled();
        assert.equal((await fleet.cancelTask(late.id, ADMIN)).outcome, "cancelling");
        await report("robot-001", late.id, "refused", { reason: "expired", error: "expired: y" });
        assert.equal((await registry.getTask(late.id))!.state, "cancelled");
      }),
  },
];

export const fleetCases: ContractCase[] = [
  {
    name: "status ordering: the will of the current connection applies, even with an older ts",
    fn: (f) =>
      withFleet(f, async ({ fleet, registry, clock }) => {
        const h = async (m: { topic: string; payload: Uint8Array }) => {
          const r = await fleet.handleMessage(m.topic, m.payload);
          assert.equal(r.ok, true, JSON.stringify(r));
        };
        const robot = async () => (await registry.getRobot("robot-001"))!;
        // The agent builds its will at CONNECT (ts T0), then registers and says online.
        const will1 = status("robot-001", "offline", T0, "boot-a", 1, "connection lost");
        await h(register("robot-001", T0 + 10, "boot-a", 1));
        await h(status("robot-001", "online", T0 + 20, "boot-a", 1));
        assert.equal((await robot()).online, true);
        // The register counts as the online of its connection: the online after it is no news.
        assert.equal(fleet.stats.statusReplays, 1);
        clock.t = T0 + 5000;
        await h(will1);
        assert.equal((await robot()).online, false, "the will of connection 1 supersedes");
        assert.equal((await robot()).offlineReason, "connection lost");
        assert.equal(fleet.robotView(await robot()).state, "offline");

        // A retained replay (every subscribe) changes nothing and is no sign of life.
        const seen = (await robot()).lastSeen;
        clock.t = T0 + 9000;
        await h(will1);
        assert.equal((await robot()).lastSeen, seen);
        assert.equal(fleet.stats.statusReplays, 2);

        // Connection 2: its register supersedes the will of connection 1 whatever the ts.
        await h(register("robot-001", T0 + 30, "boot-a", 2));
        assert.equal((await robot()).online, true);
        // The old will arriving after the new register (redelivered late) is stale.
        await h(will1);
        assert.equal((await robot()).online, true, "a will of connection 1 after register 2");
        assert.equal(fleet.stats.staleStatuses, 1);
        await h(status("robot-001", "online", T0 + 40, "boot-a", 2));
        assert.equal(fleet.stats.statusReplays, 3, "online of 2 after register of 2");
        // The will of connection 2 is applied.
        await h(status("robot-001", "offline", T0 + 25, "boot-a", 2, "connection lost"));
        assert.equal((await robot()).online, false);
        // A register of connection 1 redelivered now is not a sign that the robot is online.
        await h(register("robot-001", T0 + 10, "boot-a", 1));
        assert.equal((await robot()).online, false);
        assert.equal(fleet.stats.staleRegisters, 1);

        // The agent restarts: a new boot. Wills of the old boot are stale from now on.
        await h(register("robot-001", T0 + 50, "boot-b", 1));
        assert.equal((await robot()).online, true);
        assert.equal((await robot()).bootId, "boot-b");
        await h(status("robot-001", "offline", T0 + 60, "boot-a", 7, "connection lost"));
        assert.equal((await robot()).online, true, "a will of another boot");
        assert.equal(fleet.stats.staleStatuses, 2);
        // A heartbeat of the old boot does not revive a robot its current boot's will downed.
        await h(status("robot-001", "offline", T0 + 45, "boot-b", 1, "connection lost"));
        assert.equal((await robot()).online, false);
        await h(heartbeat("robot-001", T0 + 70, 9, "boot-a"));
        assert.equal((await robot()).online, false);
        await h(heartbeat("robot-001", T0 + 70, 1, "boot-b"));
        assert.equal((await robot()).online, true);
        const view = fleet.robotView(await robot());
        assert.equal(view.bootId, "boot-b");
        assert.equal(view.connection, 1);
      }),
  },
  {
    name: "status ordering: messages without bootId/connection fall back to ts",
    fn: (f) =>
      withFleet(f, async ({ fleet, registry }) => {
        const h = (m: { topic: string; payload: Uint8Array }) =>
          fleet.handleMessage(m.topic, m.payload);
        await h(register("robot-001", T0));
        const off = status("robot-001", "offline", T0 + 1000);
        await h(off);
        assert.equal((await registry.getRobot("robot-001"))!.online, false);
        await h(status("robot-001", "online", T0 + 500));
        assert.equal((await registry.getRobot("robot-001"))!.online, false, "older ts ignored");
        assert.equal(fleet.stats.staleStatuses, 1);
        await h(off);
        assert.equal(fleet.stats.statusReplays, 1);
        await h(status("robot-001", "online", T0 + 2000));
        assert.equal((await registry.getRobot("robot-001"))!.online, true);
        // A status of a robot never registered creates it; its boot becomes the current one.
        await h(status("robot-002", "online", T0, "boot-x", 3));
        assert.equal((await registry.getRobot("robot-002"))!.bootId, "boot-x");
        assert.deepEqual((await registry.getRobot("robot-002"))!.statusOrder, {
          connection: 3,
          rank: 0,
        });
      }),
  },
  {
    name: "broker link down: nobody goes offline, state unknown since T; full grace after",
    fn: (f) =>
      withFleet(f, async ({ fleet, registry, clock }) => {
        for (const id of ["robot-001", "robot-002"]) {
          const r = register(id, T0, `boot-${id}`, 1);
          await fleet.handleMessage(r.topic, r.payload);
        }
        // Both announce 5 s heartbeats: offline after 15 s of silence when the link is up.
        const id = (await fleet.registry.createTask({
          id: "t1",
          robotId: "robot-001",
          command: ["sleep", "1"],
          env: {},
          timeoutSeconds: 1,
          createdAt: iso(T0),
          expiresAt: iso(T0 + 3600_000),
        })).id;
        await registry.applyTaskEvent(id, "running", iso(T0));
        clock.t = T0 + 1000;
        fleet.linkDown();
        assert.deepEqual(fleet.linkState(), {
          connected: false,
          since: iso(T0 + 1000),
          delivering: false,
          confirmedAt: iso(T0 + 1000),
        });
        clock.t = T0 + 600_000; // ten minutes without a word from anyone
        const swept = await fleet.sweep();
        assert.deepEqual(swept.offline, []);
        assert.deepEqual(swept.lost, [], "a running task is not lost while nothing is heard");
        const v = fleet.robotView((await registry.getRobot("robot-001"))!);
        assert.equal(v.state, "unknown");
        assert.equal(v.unknownSince, iso(T0 + 1000));
        assert.equal(v.online, true, "the last known value");
        assert.match(
          robotStateText(v, T0 + 601_000),
          /^unknown since 2025-01-01T00:00:01Z \(10m ago\), last online$/,
        );
        assert.match(renderRobotsTable([v], T0 + 601_000), /robot-001\s+unknown since/);

        // Back: robot-001's queued heartbeat arrives 5 s later, robot-002 stays silent.
        fleet.linkUp();
        const up = clock.t;
        assert.equal(fleet.robotView((await registry.getRobot("robot-001"))!).state, "online");
        clock.t = up + 5000;
        const hb = heartbeat("robot-001", T0 + 2000, 1, "boot-robot-001");
        await fleet.handleMessage(hb.topic, hb.payload);
        clock.t = up + 15_000; // exactly the grace (3 x 5 s) after the reconnect: not yet
        assert.deepEqual((await fleet.sweep()).offline, []);
        clock.t = up + 15_001;
        assert.deepEqual((await fleet.sweep()).offline, ["robot-002"]);
        assert.equal((await registry.getRobot("robot-002"))!.offlineReason, "missed 3 heartbeats");
        // The heartbeat that arrived after the reconnect counts from its arrival.
        assert.equal((await registry.getRobot("robot-001"))!.online, true);
        // Lost-task detection restarts with its own grace (60 s) from the reconnect.
        assert.deepEqual((await fleet.sweep()).lost, []);
        clock.t += 45_000;
        assert.deepEqual((await fleet.sweep()).lost, ["t1"]);
      }),
  },
  {
    name: "a frozen broker (no probe echo) marks nobody offline: unknown, then re-derived",
    fn: (f) =>
      withFleet(f, async ({ fleet, registry, clock }) => {
        for (const id of ["robot-001", "robot-002"]) {
          const r = register(id, T0, `boot-${id}`, 1);
          await fleet.handleMessage(r.topic, r.payload);
        }
        await fleet.handleBatch([probe(T0)]);
        assert.equal(fleet.linkState().delivering, true);
        // The broker freezes at T0 + 1 s: the connection stays up, nothing is delivered.
        clock.t = T0 + 1000;
        await fleet.handleBatch([probe(T0 + 1000)]);
        // An echo claiming a time ahead of our clock is ignored.
        await fleet.handleBatch([probe(T0 + 50_000)]);
        clock.t = T0 + 60_000;
        assert.deepEqual((await fleet.sweep()).offline, [], "silence through a frozen broker");
        const v = fleet.robotView((await registry.getRobot("robot-001"))!);
        assert.equal(v.state, "unknown");
        assert.equal(v.unknownSince, iso(T0 + 1000));
        assert.equal(fleet.linkState().delivering, false);
        // It resumes: what was queued arrives in order (robot-001's heartbeat), then an echo.
        const hb = heartbeat("robot-001", T0 + 2000, 1, "boot-robot-001");
        await fleet.handleBatch([hb, probe(T0 + 59_500)]);
        assert.equal(fleet.robotView((await registry.getRobot("robot-001"))!).state, "online");
        assert.deepEqual((await fleet.sweep()).offline, ["robot-002"], "silent since T0");
        assert.equal((await registry.getRobot("robot-001"))!.online, true);
      }, { probe: true }),
  },
  {
    name: "a frozen server: the first sweep after SIGCONT runs before the queued heartbeats",
    fn: (f) =>
      withFleet(f, async ({ fleet, registry, clock }) => {
        const r = register("robot-001", T0, "boot-1", 1);
        await fleet.handleMessage(r.topic, r.payload);
        await fleet.handleBatch([probe(T0)]);
        // SIGSTOP at T0 + 1 s, SIGCONT at T0 + 30 s: the sweep timer fires before any read.
        clock.t = T0 + 30_000;
        assert.deepEqual((await fleet.sweep()).offline, []);
        // Then the heartbeats robot-001 sent meanwhile, and an echo of a probe sent after it.
        const hb = heartbeat("robot-001", T0 + 29_000, 5, "boot-1");
        await fleet.handleBatch([hb, probe(T0 + 30_001)]);
        clock.t = T0 + 31_000;
        assert.deepEqual((await fleet.sweep()).offline, []);
        assert.equal((await registry.getRobot("robot-001"))!.online, true);
      }, { probe: true }),
  },
  {
    name: "a batch stops at the message whose write fails: nothing after it is acknowledged",
    fn: (f) =>
      withFleet(f, async ({ fleet, registry, pub }) => {
        const r1 = register("robot-001", T0, "b", 1);
        await fleet.handleMessage(r1.topic, r1.payload);
        await registry.createTask({
          id: "t1",
          robotId: "robot-001",
          command: ["true"],
          env: {},
          timeoutSeconds: 5,
          createdAt: iso(T0),
          expiresAt: iso(T0 + 3600_000),
        });
        await fleet.settled();
        let calls = 0;
        const failOn = new Set([2, 4]);
        // The heartbeat's write runs, then fails: its savepoint must roll it back.
        registry.setStatementHook((sql) => {
          if (HEARTBEAT_UPDATE.test(sql) && failOn.has(++calls)) throw injected();
        });
        const items = [
          heartbeat("robot-001", T0 + 1, 1), // applied
          { topic: "k8s4r/robots/robot-001/up/heartbeat", payload: new TextEncoder().encode("{") },
          heartbeat("robot-001", T0 + 2, 2), // fails
          register("robot-001", T0 + 3, "b", 2), // not applied: after the failure
        ];
        const before = pub.sent.length;
        const r = await fleet.handleBatch(items);
        assert.equal(r.acked, 2);
        assert.deepEqual(r.results, [{ ok: true }, { ok: false, reason: "bad-json" }]);
        assert.match(r.error!, /disk I\/O error/);
        assert.equal(fleet.stats.applyErrors, 1);
        assert.equal(fleet.stats.received.heartbeat, 1);
        assert.equal(fleet.stats.received.register, 1, "the register after the failure");
        assert.equal(fleet.stats.dropped["bad-json"], 1);
        const robot = async () => (await registry.getRobot("robot-001"))!;
        assert.equal((await robot()).heartbeatsReceived, 1);
        assert.equal((await robot()).statusOrder?.connection, 1);
        await fleet.settled();
        assert.equal(pub.sent.length, before, "no dispatch for a register not applied");
        // Redelivered: applied once.
        const again = await fleet.handleBatch(items.slice(2));
        assert.equal(again.acked, 2);
        assert.equal((await robot()).heartbeatsReceived, 2);
        assert.equal((await robot()).statusOrder?.connection, 2);
        // The single-message form reports the error and writes nothing.
        const one = heartbeat("robot-001", T0 + 4, 3);
        const res = await fleet.handleMessage(one.topic, one.payload);
        assert.equal(res.ok, false);
        assert.match(res.error!, /injected/);
        assert.equal((await robot()).heartbeatsReceived, 2);
        registry.setStatementHook(undefined);
        // The task the register of connection 2 owed the robot was sent after its commit.
        await fleet.settled();
        assert.ok(pub.sent.length > before, "the applied register dispatched the pending task");
      }),
  },
  {
    name: "a robot cannot wedge ingest with heartbeat gaps: each gap and the counter are bounded",
    fn: (f) =>
      withFleet(f, async ({ fleet, registry }, store) => {
        // Control: an ordinary gap counts as missing.
        const ok = await fleet.handleBatch([
          heartbeat("robot-ok", T0, 1, "ok"),
          heartbeat("robot-ok", T0 + 1, 4, "ok"),
        ]);
        assert.equal(ok.acked, 2);
        assert.equal((await registry.getRobot("robot-ok"))!.heartbeatsMissing, 2);
        // The poison: seq 0 then the largest seq, on a new boot each time. 1025 such pairs
        // add more than 2^63 (PostgreSQL's BIGINT: 22003, refused forever; SQLite: a float).
        const big = Number.MAX_SAFE_INTEGER;
        const poison: { topic: string; payload: Uint8Array }[] = [];
        for (let i = 0; i < 1025; i++) {
          poison.push(heartbeat("robot-evil", T0 + 2, 0, `b${i}`));
          poison.push(heartbeat("robot-evil", T0 + 2, big, `b${i}`));
        }
        let seq = 4;
        for (let i = 0; i < poison.length; i += 500) {
          // Another robot's heartbeat behind the poison, in the same batch.
          const items = [...poison.slice(i, i + 500), heartbeat("robot-ok", T0 + 3, ++seq, "ok")];
          const r = await fleet.handleBatch(items);
          assert.equal(r.error, undefined, String(r.error));
          assert.equal(r.acked, items.length);
        }
        const evil = (await registry.getRobot("robot-evil"))!;
        assert.ok(Number.isSafeInteger(evil.heartbeatsMissing), String(evil.heartbeatsMissing));
        assert.ok(
          evil.heartbeatsMissing <= MAX_HEARTBEAT_GAP * poison.length,
          "no heartbeat counts more than MAX_HEARTBEAT_GAP missing",
        );
        assert.ok(evil.heartbeatsMissing > 0, "the gaps still count, bounded");
        assert.equal(evil.heartbeatsReceived, poison.length);
        const good = (await registry.getRobot("robot-ok"))!;
        assert.equal(good.lastHeartbeatSeq, seq);
        assert.equal(good.heartbeatsMissing, 2, "the other robot's accounting is untouched");
        assert.equal(fleet.stats.applyErrors, 0);
        // The counter itself stops at the ceiling (a value an older k8s4r let grow).
        await store.exec(
          `UPDATE robots SET heartbeats_missing = ${big - 1} WHERE id = 'robot-ok'`,
        );
        const top = await fleet.handleBatch([heartbeat("robot-ok", T0 + 4, seq + 10, "ok")]);
        assert.equal(top.acked, 1, String(top.error));
        assert.equal((await registry.getRobot("robot-ok"))!.heartbeatsMissing, big);
      }),
  },
  {
    name:
      "a message the database refuses for what it holds is dropped and counted, the rest applied",
    fn: (f) =>
      withFleet(f, async ({ fleet, registry, logs }, store) => {
        // A real refusal by the database (not a throw of ours): a constraint on one seq.
        await store.exec(
          f.name === "postgres"
            ? "ALTER TABLE robots ADD CONSTRAINT poison CHECK (last_heartbeat_seq IS DISTINCT FROM 666)"
            : `CREATE TRIGGER poison BEFORE UPDATE OF last_heartbeat_seq ON robots
               WHEN NEW.last_heartbeat_seq = 666 BEGIN SELECT RAISE(ABORT, 'poison'); END`,
        );
        const items = [
          heartbeat("robot-001", T0, 1, "a"),
          heartbeat("robot-002", T0, 666, "a"), // refused by the database
          heartbeat("robot-003", T0, 1, "a"),
          heartbeat("robot-002", T0 + 1, 667, "a"),
        ];
        const r = await fleet.handleBatch(items);
        assert.equal(r.error, undefined, String(r.error));
        assert.equal(r.acked, 4, "the refused message and the ones after it are settled");
        assert.deepEqual(r.results, [
          { ok: true },
          { ok: false, reason: "registry-refused" },
          { ok: true },
          { ok: true },
        ]);
        assert.equal(fleet.stats.registryRefused, 1);
        assert.equal(fleet.stats.applyErrors, 0);
        assert.equal(fleet.stats.received.heartbeat, 3);
        assert.equal((await registry.getRobot("robot-003"))!.heartbeatsReceived, 1);
        const two = (await registry.getRobot("robot-002"))!;
        assert.deepEqual([two.heartbeatsReceived, two.lastHeartbeatSeq], [1, 667]);
        assert.ok(
          logs.some((l) =>
            /dropped heartbeat from robot-002: the registry refused it .*\((SQLSTATE 23514|SQLite)/
              .test(l)
          ),
          logs.join("\n"),
        );
        // Control: an error that is not about the message (the disk, the connection) is not
        // dropped: not acknowledged, delivered again (see the case above).
        registry.setStatementHook((sql) => {
          if (HEARTBEAT_UPDATE.test(sql)) throw injected();
        });
        const again = await fleet.handleBatch([heartbeat("robot-003", T0 + 2, 2, "a")]);
        assert.equal(again.acked, 0);
        assert.equal(fleet.stats.applyErrors, 1);
        assert.equal(fleet.stats.registryRefused, 1);
        registry.setStatementHook(undefined);
      }),
  },
  ...cancelCases,
];
