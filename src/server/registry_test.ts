/**
 * The registry on SQLite: the backend-independent suite (testing/registry_contract.ts, also run
 * on PostgreSQL by tests/registry_postgres_test.ts) and what only SQLite has.
 */
import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { join } from "node:path";
import { SCHEMA_VERSION } from "./registry.ts";
import { DB_FILE, openSqliteRegistry } from "./registry_sqlite.ts";
import { registryCases } from "./testing/registry_contract.ts";
import { sqliteFixture } from "./testing/sqlite_fixture.ts";

for (const c of registryCases) {
  Deno.test(`registry [sqlite]: ${c.name}`, () => c.fn(sqliteFixture));
}

Deno.test("registry [sqlite]: commits are durable: WAL with synchronous=FULL (fsync on every commit)", async () => {
  const store = await sqliteFixture.create();
  try {
    const reg = await store.open();
    try {
      // 2 = FULL. NORMAL (1) in WAL mode syncs only at checkpoints: a commit acknowledged to the
      // broker could be lost on power failure.
      assert.deepEqual(await reg.durability(), { journal_mode: "wal", synchronous: "2" });
      assert.equal(reg.dialect, "sqlite");
      assert.match(reg.location, /registry\.sqlite$/);
    } finally {
      await reg.close();
    }
  } finally {
    await store.dispose();
  }
});

Deno.test("registry [sqlite]: a database of an older k8s4r is migrated in place", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-registry-" });
  try {
    // Version 1 as the first k8s4r wrote it, with a robot in it.
    const { MIGRATIONS } = await import("./schema.ts");
    const db = new DatabaseSync(join(dir, DB_FILE));
    db.exec(MIGRATIONS[0].sqlite);
    db.exec(
      "INSERT INTO robots (id, first_seen, last_seen, online) VALUES ('robot-001', 'a', 'b', 1)",
    );
    db.exec(
      `INSERT INTO tasks (id, robot_id, command, env, timeout_seconds, state, created_at,
         expires_at, updated_at)
       VALUES ('t1', 'robot-001', '["true"]', '{}', 5, 'pending', '2025-01-01T00:00:00.000Z',
         '2025-01-01T01:00:00.000Z', '2025-01-01T00:00:00.000Z')`,
    );
    db.exec("PRAGMA user_version = 1");
    db.close();
    const reg = await openSqliteRegistry(dir);
    try {
      assert.equal(await reg.schemaVersion(), SCHEMA_VERSION);
      const r = (await reg.getRobot("robot-001"))!;
      assert.equal(r.online, true);
      assert.equal(r.heartbeatsReceived, 0);
      assert.equal(r.statusOrder, null);
      // Migration 4 (operators): a task of before has no creator and no cancel request.
      const t = (await reg.getTask("t1"))!;
      assert.deepEqual([t.createdBy, t.cancelRequestedAt, t.cancelRequestedBy], [null, null, null]);
      assert.deepEqual(
        (await reg.listTasksPage({ robotId: "robot-001", limit: 10 })).map((x) => x.id),
        ["t1"],
      );
    } finally {
      await reg.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
