import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { isPermanentWriteError, writeErrorCode } from "./write_errors.ts";
import { PostgresError } from "./registry_postgres.ts";
import { addBounded, boundedGap, boundedIncrement, COUNTER_CEILING } from "./heartbeat_bounds.ts";

Deno.test("write errors: what the message holds is permanent; the database's state is not", () => {
  const pg = (code: string) => new PostgresError(`x (SQLSTATE ${code})`, code);
  for (const code of ["22003", "22P02", "22021", "23505", "23514", "42601", "42804"]) {
    assert.equal(isPermanentWriteError(pg(code)), true, code);
  }
  // Control: connection, read-only standby, deadlock, resources, shutdown, internal, and the
  // set-up codes of class 42 (an operator or a migration fixes them) stay temporary.
  for (
    const code of ["08006", "08001", "25006", "40P01", "40001", "53100", "57P01", "XX000"]
      .concat(["42501", "42P01", "42703", "42883", "42704"])
  ) {
    assert.equal(isPermanentWriteError(pg(code)), false, code);
  }
  assert.equal(isPermanentWriteError(new Error("disk I/O error (injected)")), false);
  assert.equal(isPermanentWriteError(undefined), false);
  assert.equal(writeErrorCode(pg("22003")), "SQLSTATE 22003");
});

Deno.test("write errors: SQLite's own errors, by primary code", () => {
  const db = new DatabaseSync(":memory:");
  try {
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER CHECK (n < 100))");
    db.prepare("INSERT INTO t VALUES (1, 1)").run();
    const caught = (sql: string) => {
      try {
        db.prepare(sql).run();
      } catch (err) {
        return err;
      }
      throw new Error(`${sql}: no error`);
    };
    const unique = caught("INSERT INTO t VALUES (1, 2)");
    assert.equal(isPermanentWriteError(unique), true);
    assert.match(writeErrorCode(unique)!, /^SQLite \d+$/);
    assert.equal(isPermanentWriteError(caught("UPDATE t SET n = 666")), true);
    // Control: not about the row (a missing table: the schema) is temporary.
    assert.equal(isPermanentWriteError(caught("INSERT INTO nope VALUES (1)")), false);
  } finally {
    db.close();
  }
});

Deno.test("heartbeat bounds: a gap and a counter never pass their ceilings", () => {
  assert.equal(boundedGap(2), 2);
  assert.equal(boundedGap(0), 0);
  assert.equal(boundedGap(-5), 0);
  assert.equal(boundedGap(Number.MAX_SAFE_INTEGER), 366 * 24 * 3600);
  assert.equal(addBounded(COUNTER_CEILING - 1, 10), COUNTER_CEILING);
  assert.equal(addBounded(5, 2), 7);
  const db = new DatabaseSync(":memory:");
  try {
    db.exec("CREATE TABLE r (n INTEGER)");
    db.prepare("INSERT INTO r VALUES (?)").run(COUNTER_CEILING - 3);
    for (const add of [2, 5, 1_000_000]) {
      const inc = boundedIncrement("n", add);
      db.prepare(`UPDATE r SET n = ${inc.sql}`).run(...inc.params);
    }
    assert.equal((db.prepare("SELECT n FROM r").get() as { n: number }).n, COUNTER_CEILING);
  } finally {
    db.close();
  }
});
