import assert from "node:assert/strict";
// @ts-types="@types/pg"
import pg from "pg";
import { openPostgresRegistry } from "./registry_postgres.ts";
import { clientConfig, insecureAuthMessage, newClient, sslOptions } from "./postgres_connect.ts";
import { startFakePostgres } from "./testing/fake_postgres.ts";

const PASSWORD = "s3cret-" + crypto.randomUUID();

for (const ask of ["cleartext", "md5"] as const) {
  Deno.test(`a server that asks for the password as ${ask} without TLS never gets it`, async () => {
    const fake = await startFakePostgres(ask);
    try {
      const config = {
        host: "127.0.0.1",
        port: fake.port,
        user: "k8s4r",
        database: "k8s4r",
        password: PASSWORD,
      };
      // Positive control: pg as it comes answers the fake, so the fake does ask and listen.
      const plain = new pg.Client({ ...config, ssl: false });
      plain.on("error", () => {});
      await assert.rejects(() => plain.connect(), /password authentication failed/);
      await plain.end().catch(() => {});
      assert.equal(fake.passwords.length, 1, "the control's password did not reach the fake");
      assert.ok(fake.passwords[0].length > 0);
      fake.passwords.length = 0;
      const before = fake.startups;

      // The registry (its pool) and a single client of ours: refused before anything is sent.
      await assert.rejects(
        () => openPostgresRegistry(config),
        (err: Error) => {
          assert.match(err.message, /cannot connect: the server asked for the password/);
          assert.ok(err.message.includes(insecureAuthMessage(ask === "md5" ? "MD5" : "cleartext")));
          assert.ok(err.message.startsWith(`postgres://k8s4r@127.0.0.1:${fake.port}/k8s4r`));
          assert.ok(!err.message.includes(PASSWORD));
          return true;
        },
      );
      const c = newClient(config);
      c.on("error", () => {});
      await assert.rejects(() => c.connect(), /refused, whoever answers at this address/);
      await c.end().catch(() => {});
      assert.ok(fake.startups >= before + 2, "the refused clients did not reach the fake");
      assert.deepEqual(fake.passwords, [], "a password reached the fake server");
    } finally {
      await fake.close();
    }
  });
}

Deno.test("sslmode: disable is plain; verify-full verifies the chain and the configured host", () => {
  const e = { host: "db.example", port: 5432, user: "u", database: "d" };
  assert.equal(clientConfig(e).ssl, false);
  assert.equal(sslOptions({ ...e, sslmode: "disable" }), false);
  const v = sslOptions({ ...e, sslmode: "verify-full" }) as Record<string, unknown>;
  assert.equal(v.rejectUnauthorized, true);
  assert.equal(v.ca, undefined, "no sslrootcert: the runtime's CA store");
  assert.equal(typeof v.checkServerIdentity, "function");
  assert.throws(
    () => sslOptions({ ...e, sslmode: "verify-full", sslrootcert: "/nonexistent/ca.pem" }),
    /^Error: \/nonexistent\/ca\.pem: cannot read sslrootcert/,
  );
});
