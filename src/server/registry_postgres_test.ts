/**
 * `--database` parsing, the password's sources and redaction (no server needed). The backend
 * itself runs against a real PostgreSQL in tests/registry_postgres_test.ts.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  describePostgres,
  loadDatabasePassword,
  numberPlaceholders,
  parseDatabaseUrl,
  redactSecrets,
} from "./registry_postgres.ts";

Deno.test("--database: TCP, unix socket and IPv6 forms; the URL shown is the URL given", () => {
  const cases: [string, object, string][] = [
    [
      "postgres://k8s4r@db.example:5433/fleet",
      { host: "db.example", port: 5433, user: "k8s4r", database: "fleet" },
      "postgres://k8s4r@db.example:5433/fleet",
    ],
    [
      "postgresql://k8s4r@127.0.0.1/fleet",
      { host: "127.0.0.1", port: 5432, user: "k8s4r", database: "fleet" },
      "postgres://k8s4r@127.0.0.1:5432/fleet",
    ],
    [
      "postgres://k8s4r@/fleet?host=/run/postgresql",
      { host: "/run/postgresql", port: 5432, user: "k8s4r", database: "fleet" },
      "postgres://k8s4r@/fleet?host=/run/postgresql",
    ],
    [
      "postgres://k8s4r@%2Frun%2Fpostgresql:5433/fleet",
      { host: "/run/postgresql", port: 5433, user: "k8s4r", database: "fleet" },
      "postgres://k8s4r@/fleet?host=/run/postgresql&port=5433",
    ],
    [
      "postgres://k8s4r@[::1]:5432/fleet",
      { host: "::1", port: 5432, user: "k8s4r", database: "fleet" },
      "postgres://k8s4r@[::1]:5432/fleet",
    ],
    [
      "postgres:///fleet?host=/tmp/s&port=6000",
      { host: "/tmp/s", port: 6000, user: "me", database: "fleet" },
      "postgres://me@/fleet?host=/tmp/s&port=6000",
    ],
    [
      "postgres://k8s4r@db.example/fleet?sslmode=verify-full&sslrootcert=/etc/k8s4r/pg-ca.pem",
      {
        host: "db.example",
        port: 5432,
        user: "k8s4r",
        database: "fleet",
        sslmode: "verify-full",
        sslrootcert: "/etc/k8s4r/pg-ca.pem",
      },
      "postgres://k8s4r@db.example:5432/fleet?sslmode=verify-full&sslrootcert=/etc/k8s4r/pg-ca.pem",
    ],
    [
      "postgres://k8s4r@db.example/fleet?sslmode=disable",
      { host: "db.example", port: 5432, user: "k8s4r", database: "fleet" },
      "postgres://k8s4r@db.example:5432/fleet",
    ],
  ];
  for (const [raw, want, shown] of cases) {
    const c = parseDatabaseUrl(raw, "me");
    assert.deepEqual(c, want, raw);
    assert.equal(describePostgres(c), shown, raw);
    assert.deepEqual(parseDatabaseUrl(describePostgres(c), "me"), want, `round trip of ${raw}`);
  }
});

Deno.test("--database: a password in the URL is refused, and not repeated in the error", () => {
  for (
    const raw of [
      "postgres://k8s4r:hunter2-secret@db:5432/fleet",
      "postgres://k8s4r@db:5432/fleet?password=hunter2-secret",
    ]
  ) {
    assert.throws(() => parseDatabaseUrl(raw, "me"), (err: Error) => {
      assert.match(err.message, /^--database: the URL contains a password/);
      assert.match(err.message, /--database-password-file FILE/);
      assert.match(err.message, /K8S4R_DATABASE_PASSWORD or PGPASSWORD/);
      assert.ok(!err.message.includes("hunter2"), err.message);
      assert.ok(!err.message.includes("\n"), "one line");
      return true;
    });
  }
  // Positive control: the same URL without the password is accepted.
  assert.equal(parseDatabaseUrl("postgres://k8s4r@db:5432/fleet", "me").user, "k8s4r");
});

Deno.test("--database: precise errors for what is not a PostgreSQL URL", () => {
  const bad: [string, RegExp][] = [
    ["mysql://u@h/db", /expected postgres:\/\/USER@HOST:PORT\/DATABASE/],
    ["not a url", /expected postgres:\/\//],
    ["postgres://u@h:5432/", /no database name/],
    ["postgres://u@h:99999/db", /expected postgres|port: expected 1-65535/],
    ["postgres://u@/db", /no host/],
    [
      "postgres://u@h/db?sslcert=/x",
      /unsupported parameter 'sslcert' \(supported: host, port, sslmode, sslrootcert\)/,
    ],
    [
      "postgres://u@h/db?sslmode=require",
      /sslmode: expected disable or verify-full, got 'require'/,
    ],
    ["postgres://u@h/db?sslmode=prefer", /sslmode: expected disable or verify-full/],
    ["postgres://u@/db?host=/s&sslmode=verify-full", /no TLS on a unix socket/],
    ["postgres://u@h/db?sslrootcert=/ca.pem", /sslrootcert: only with sslmode=verify-full/],
    ["postgres://u@h/db?sslmode=verify-full&sslrootcert=ca.pem", /expected an absolute path/],
    ["postgres://u@h/db?host=/x", /either before the path or as \?host=/],
    ["postgres:///db?host=relative/dir", /must be an absolute path/],
  ];
  for (const [raw, re] of bad) {
    assert.throws(() => parseDatabaseUrl(raw, "me"), re, raw);
  }
});

Deno.test("database password: a 0600 file, else K8S4R_DATABASE_PASSWORD, else PGPASSWORD", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-pgpw-" });
  try {
    const file = join(dir, "pw");
    await Deno.writeTextFile(file, "from-file\n", { mode: 0o600 });
    await Deno.chmod(file, 0o600);
    const env = { K8S4R_DATABASE_PASSWORD: "from-k8s4r", PGPASSWORD: "from-pg" };
    assert.equal(await loadDatabasePassword(file, env), "from-file");
    assert.equal(await loadDatabasePassword(undefined, env), "from-k8s4r");
    assert.equal(await loadDatabasePassword(undefined, { PGPASSWORD: "from-pg" }), "from-pg");
    assert.equal(await loadDatabasePassword(undefined, {}), undefined);
    // Readable by others: refused, with what to do.
    for (const mode of [0o640, 0o604, 0o644]) {
      await Deno.chmod(file, mode);
      await assert.rejects(
        () => loadDatabasePassword(file, env),
        new RegExp(
          `^Error: ${file}: database password file is readable by group or others \\(mode ${
            mode.toString(8)
          }, expected 600\\); run chmod 600 ${file}$`,
        ),
      );
    }
    await Deno.chmod(file, 0o400);
    assert.equal(await loadDatabasePassword(file, {}), "from-file", "0400 is fine");
    await Deno.writeTextFile(join(dir, "empty"), "\n", { mode: 0o600 });
    await assert.rejects(() => loadDatabasePassword(join(dir, "empty"), {}), /is empty/);
    await assert.rejects(() => loadDatabasePassword(join(dir, "nope"), {}), /not found/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("redactSecrets: URL passwords and given secrets become ***", () => {
  assert.equal(
    redactSecrets("cannot reach postgres://u:p%40ss@h:5432/db now; postgresql://x:y@z/w"),
    "cannot reach postgres://u:***@h:5432/db now; postgresql://x:***@z/w",
  );
  assert.equal(
    redactSecrets("postgres://u@h/db?a=1&password=s3cret&b=2"),
    "postgres://u@h/db?a=1&password=***&b=2",
  );
  assert.equal(
    redactSecrets("auth failed for s3cret-pw", ["s3cret-pw", undefined]),
    "auth failed for ***",
  );
  // Positive control: nothing secret, nothing changed.
  assert.equal(redactSecrets("postgres://u@h:5432/db"), "postgres://u@h:5432/db");
});

Deno.test("placeholders: ? outside quotes becomes $n", () => {
  assert.equal(
    numberPlaceholders(`SELECT '?', "a?b", x FROM t WHERE a = ? AND b IN (?, ?) AND c = 'it''s?'`),
    `SELECT '?', "a?b", x FROM t WHERE a = $1 AND b IN ($2, $3) AND c = 'it''s?'`,
  );
});
