/**
 * The registry and fleet suite (src/server/testing/registry_contract.ts) on a REAL
 * PostgreSQL 15 started by the test (tests/helpers/postgres.ts), and what only PostgreSQL has:
 * the migration lock and log, SCRAM over the unix socket and TCP, TLS (sslmode=verify-full),
 * errors without secrets.
 */
import assert from "node:assert/strict";
import { resendRequestedSinceClaim, SCHEMA_VERSION } from "../src/server/registry.ts";
import { openPostgresRegistry } from "../src/server/registry_postgres.ts";
import { fleetCases, registryCases } from "../src/server/testing/registry_contract.ts";
import { TestCa } from "../src/spiffe/testing/test_ca.ts";
import { postgresFixture, startTestPostgres } from "./helpers/postgres.ts";
import { waitFor } from "../src/process/mod.ts";

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
      "resend mark against a PUBACK being recorded on another connection: waited for, never skipped",
      async () => {
        const db = await pgs.createDatabase("resend");
        const a = await openPostgresRegistry(pgs.config(db)); // the claim holder (replica A)
        const b = await openPostgresRegistry(pgs.config(db)); // the register's replica (B)
        const now = "2025-01-01T00:00:00.000Z";
        const lease = "2025-01-01T00:00:30.000Z";
        const claim = (reg: typeof a, owner: string) =>
          reg.transaction((tx) =>
            tx.claimTasks({ robotId: "robot-001", owner, now, leaseUntil: lease, limit: 10 })
          );
        // B's register of a new connection: the mark, then its own claim, in one transaction.
        const register = (tx: Parameters<Parameters<typeof b.transaction>[0]>[0]) =>
          tx.requestResend("robot-001", now).then(async (marked) => ({
            marked,
            claimed: (await tx.claimTasks({
              robotId: "robot-001",
              owner: "B",
              now,
              leaseUntil: lease,
              limit: 10,
            })).map((x) => x.id),
          }));
        const lockWaits = async () =>
          Number(
            (await pgs.admin(
              "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
              [db],
            ))[0].n,
          );
        const gate = () => {
          let open!: () => void;
          const p = new Promise<void>((r) => open = r);
          return { p, open };
        };
        const task = (id: string) => ({
          id,
          robotId: "robot-001",
          command: ["true"],
          env: {},
          timeoutSeconds: 5,
          createdAt: now,
          expiresAt: "2025-01-01T01:00:00.000Z",
        });
        try {
          await a.touchRobot("robot-001", now);
          await a.setOnline("robot-001", true, null);
          await a.transaction((tx) => tx.createTask(task("t1"), { owner: "A", leaseUntil: lease }));
          // 1. A records t1's PUBACK (dispatched, claim released), its transaction still open.
          const held = gate();
          const locked = gate();
          const puback = a.transaction(async (tx) => {
            await tx.applyTaskEvent("t1", "dispatch", now);
            await tx.releaseClaim("t1", "A");
            locked.open();
            await held.p;
          });
          await locked.p;
          // Control: a claim alone (SKIP LOCKED) skips the row being recorded: it would miss
          // the task, which is why the mark waits for the row instead.
          assert.deepEqual(await claim(b, "B"), [], "SKIP LOCKED skipped the locked row");
          const reg1 = b.transaction(register);
          await waitFor(async () => await lockWaits() >= 1, {
            timeoutMs: 10_000,
            what: "the register's mark waiting on t1's row",
          });
          held.open();
          await puback;
          assert.deepEqual(
            await reg1,
            { marked: 0, claimed: ["t1"] },
            "the claim was released meanwhile: not marked, claimed by the register and re-sent",
          );
          await b.transaction((tx) => tx.releaseClaim("t1", "B"));
          // 2. The register marks first (A holds t2's claim, publishing); A's PUBACK then
          // waits for it and reads the mark.
          await a.transaction((tx) => tx.createTask(task("t2"), { owner: "A", leaseUntil: lease }));
          const held2 = gate();
          const marked = gate();
          const reg2 = b.transaction(async (tx) => {
            const r = await register(tx);
            marked.open();
            await held2.p;
            return r;
          });
          await marked.p;
          const puback2 = a.transaction(async (tx) => {
            const r = await tx.applyTaskEvent("t2", "dispatch", now);
            await tx.releaseClaim("t2", "A");
            return r;
          });
          await waitFor(async () => await lockWaits() >= 1, {
            timeoutMs: 10_000,
            what: "A's PUBACK waiting on t2's row",
          });
          held2.open();
          assert.deepEqual(await reg2, { marked: 1, claimed: ["t1"] });
          const r = await puback2;
          assert.equal(r?.task.state, "dispatched");
          assert.ok(
            resendRequestedSinceClaim(r?.task.resendRequestedAt ?? null),
            "the PUBACK read the register's mark",
          );
        } finally {
          await a.close();
          await b.close();
          await pgs.dropDatabase(db);
        }
      },
    );

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

    await t.step(
      "sslmode=verify-full: TLS to the named host, its certificate checked",
      async () => {
        const db = await pgs.createDatabase("tls");
        try {
          const reg = await openPostgresRegistry(pgs.config(db, "tls"));
          try {
            assert.match(reg.location, /\?sslmode=verify-full&sslrootcert=\//);
            // The pool keeps its connection: PostgreSQL says it is TLS.
            const rows = await pgs.admin(
              `SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.datname = $1 AND a.application_name = 'k8s4r-server'`,
              [db],
            );
            assert.ok(rows.length > 0 && rows.every((r) => r.ssl === true), JSON.stringify(rows));
          } finally {
            await reg.close();
          }
          // Another CA: refused. The right CA but another name (the address, not in the
          // certificate): refused. Neither sends the password (SCRAM never does anyway).
          const other = await Deno.makeTempFile({ dir: pgs.dir, suffix: ".pem" });
          await Deno.writeTextFile(other, TestCa.create().rootPem);
          await assert.rejects(
            () => openPostgresRegistry({ ...pgs.config(db, "tls"), sslrootcert: other }),
            /cannot connect: unable to verify the first certificate/,
          );
          await assert.rejects(
            () => openPostgresRegistry({ ...pgs.config(db, "tls"), host: "127.0.0.1" }),
            /cannot connect: Hostname\/IP does not match certificate's altnames: IP: 127\.0\.0\.1/,
          );
        } finally {
          await pgs.dropDatabase(db);
        }
      },
    );

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
