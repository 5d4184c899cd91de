/**
 * The SQLite registry's files: only their owner can read them, whatever the data dir's mode and
 * the umask; a data dir that others may write to (they could swap the files) is refused.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { DB_FILE, openSqliteRegistry } from "./registry_sqlite.ts";

const mode = (p: string) => Deno.statSync(p).mode! & 0o777;

Deno.test("registry.sqlite and its -wal/-shm are 0600 in an existing 0755 data dir", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-sqlite-perm-" });
  try {
    await Deno.chmod(dir, 0o755); // an existing --data-dir, readable by everyone
    const reg = await openSqliteRegistry(dir);
    try {
      await reg.touchRobot("robot-001", "2025-01-01T00:00:00.000Z");
      for (const f of [DB_FILE, `${DB_FILE}-wal`, `${DB_FILE}-shm`]) {
        assert.equal(mode(join(dir, f)).toString(8), "600", f);
      }
    } finally {
      await reg.close();
    }
    // Control: the data dir itself is left as the operator made it (others may list it).
    assert.equal(mode(dir).toString(8), "755");
    // Files made readable by an older k8s4r (or by hand) are closed again on the next open.
    for (const f of [DB_FILE, `${DB_FILE}-wal`, `${DB_FILE}-shm`]) {
      try {
        await Deno.chmod(join(dir, f), 0o644);
      } catch { /* -wal/-shm may be gone after a clean close */ }
    }
    const again = await openSqliteRegistry(dir);
    try {
      assert.equal((await again.getRobot("robot-001"))?.id, "robot-001");
      for (const f of [DB_FILE, `${DB_FILE}-wal`, `${DB_FILE}-shm`]) {
        assert.equal(mode(join(dir, f)).toString(8), "600", `${f} after reopening`);
      }
    } finally {
      await again.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a data dir that group or others may write to is refused; the same dir 0700 opens", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-sqlite-perm-" });
  try {
    for (const m of [0o777, 0o775, 0o1777]) {
      await Deno.chmod(dir, m);
      await assert.rejects(
        () => openSqliteRegistry(dir),
        (err: Error) => {
          assert.match(
            err.message,
            new RegExp(
              `^${dir}: the registry's data dir is writable by group or others \\(mode ${
                (m & 0o7777).toString(8)
              }\\); run chmod go-w ${dir}$`,
            ),
          );
          return true;
        },
      );
      assert.throws(() => Deno.statSync(join(dir, DB_FILE)), Deno.errors.NotFound);
    }
    // Control: the same directory, closed, opens.
    await Deno.chmod(dir, 0o700);
    const reg = await openSqliteRegistry(dir);
    await reg.close();
    assert.equal(mode(join(dir, DB_FILE)).toString(8), "600");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
