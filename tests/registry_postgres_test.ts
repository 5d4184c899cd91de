/**
 * The registry and fleet suite (src/server/testing/registry_contract.ts) on a REAL
 * PostgreSQL 15 started by the test (tests/helpers/postgres.ts), and what only PostgreSQL has:
 * the migration lock and log, SCRAM over the unix socket and TCP, errors without secrets.
 */
import assert from "node:assert/strict";
import { SCHEMA_VERSION } from "../src/server/registry.ts";
import { openPostgresRegistry } from "../src/server/registry_postgres.ts";
import { fleetCases, registryCases } from "../src/server/testing/registry_contract.ts";
import { postgresFixture, startTestPostgres } from "./helpers/postgres.ts";

Deno.test("registry on PostgreSQL: the contract suite, migrations, auth, errors", async (t) => {
  const pgs = await startTestPostgres();
  const serverPid = pgs.cluster.pid;
  try {
    assert.match(pgs.version, /^15\./, `expected PostgreSQL 15, found ${pgs.version}`);
    const fixture = postgresFixture(pgs);
    for (const c of registryCases) {
      await t.step(`registry [postgres]: ${c.name}`, () => c.fn(fixture));
    }
    for (const c of fleetCases) {
      await t.step(`fleet [postgres]: ${c.name}`, () => c.fn(fixture));
    }

    await t.step(
      "replicas starting at once: each migration applied once, under the lock",
      async () => {
        const db = await pgs.createDatabase("race");
        try {
          const regs = await Promise.all(
            Array.from({ length: 5 }, () => openPostgresRegistry(pgs.config(db))),
          );
          for (const r of regs) await r.close();
          const rows = await pgs.admin(
            "SELECT version, k8s4r_version FROM k8s4r_schema_migrations ORDER BY version",
            [],
            db,
          );
          assert.deepEqual(
            rows.map((r) => r.version),
            Array.from({ length: SCHEMA_VERSION }, (_, i) => i + 1),
          );
          // The tables are the application role's, not the superuser's.
          const owners = await pgs.admin(
            "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
            [],
            db,
          );
          assert.deepEqual(owners.map((o) => `${o.tablename}:${o.tableowner}`), [
            "k8s4r_schema_migrations:k8s4r",
            "replicas:k8s4r",
            "robots:k8s4r",
            "tasks:k8s4r",
          ]);
        } finally {
          await pgs.dropDatabase(db);
        }
      },
    );

    await t.step("SCRAM over the unix socket and TCP; a wrong password is refused", async () => {
      const db = await pgs.createDatabase("auth");
      try {
        for (const via of ["socket", "tcp"] as const) {
          // Positive control: the right password.
          const reg = await openPostgresRegistry(pgs.config(db, via));
          assert.equal(reg.dialect, "postgres");
          assert.equal(reg.location, pgs.url(db, via));
          assert.ok(!reg.location.includes(pgs.password));
          const d = await reg.durability();
          assert.equal(d.synchronous_commit, "on");
          assert.equal(d.fsync, "on");
          assert.match(d.server_version, /^15\./);
          await reg.close();
          const wrong = `${pgs.password}-wrong`;
          await assert.rejects(
            () => openPostgresRegistry({ ...pgs.config(db, via), password: wrong }),
            (err: Error & { code?: string }) => {
              assert.equal(err.code, "28P01");
              assert.match(err.message, /cannot connect: password authentication failed/);
              assert.ok(err.message.startsWith(pgs.url(db, via)), err.message);
              assert.ok(!err.message.includes(wrong), "the password is in the error");
              return true;
            },
          );
        }
      } finally {
        await pgs.dropDatabase(db);
      }
    });

    await t.step("errors name the database and the SQLSTATE, never the password", async () => {
      const db = await pgs.createDatabase("errors");
      try {
        const reg = await openPostgresRegistry(pgs.config(db));
        try {
          await reg.createTask({
            id: "t",
            robotId: "r",
            command: ["x"],
            env: {},
            timeoutSeconds: 1,
            createdAt: "2025-01-01T00:00:00.000Z",
            expiresAt: "2025-01-01T00:00:01.000Z",
          });
          await assert.rejects(
            () =>
              reg.createTask({
                id: "t",
                robotId: "r",
                command: ["x"],
                env: {},
                timeoutSeconds: 1,
                createdAt: "2025-01-01T00:00:00.000Z",
                expiresAt: "2025-01-01T00:00:01.000Z",
              }),
            (err: Error & { code?: string }) => {
              assert.equal(err.code, "23505");
              assert.match(err.message, /duplicate key value .*\(SQLSTATE 23505\)$/);
              assert.ok(err.message.startsWith(pgs.url(db)));
              return true;
            },
          );
        } finally {
          await reg.close();
        }
        // Nothing listens there: the message says where it tried.
        const closed = { ...pgs.config(db, "tcp"), port: 1 };
        await assert.rejects(
          () => openPostgresRegistry(closed),
          /^PostgresError: postgres:\/\/k8s4r@127\.0\.0\.1:1\/errors_\d+_\d+: cannot connect: .*ECONNREFUSED/,
        );
      } finally {
        await pgs.dropDatabase(db);
      }
    });
  } finally {
    await pgs.destroy();
  }
  // No orphan: the server we started is gone, and so is its directory.
  assert.ok(serverPid !== undefined);
  assert.equal(pgs.cluster.pid, undefined);
  assert.ok(
    !(await Deno.stat(`/proc/${serverPid}`).then(() => true, () => false)) ||
      !(await Deno.readTextFile(`/proc/${serverPid}/cmdline`).catch(() => "")).includes(pgs.dir),
    `postgres pid ${serverPid} survived`,
  );
  await assert.rejects(() => Deno.stat(pgs.dir), Deno.errors.NotFound);
});
