/**
 * `k8s4r server --database postgres://...` as a user runs it: the real CLI, a real Mosquitto
 * and a real PostgreSQL 15. The password reaches the server through a 0600 file or the
 * environment, never argv, and appears in no log line; a URL with a password and a file that
 * others can read are refused before anything starts.
 *
 * The server's own identity (the HTTPS API's certificate) comes from a Workload API: here the
 * test's FakeWorkloadApi (a real gRPC server on a unix socket, as SPIRE's agent answers it),
 * handing out spiffe://k8s4r.test/fleet-server from a test CA; the API is called over HTTPS as
 * an admin operator of that CA. The same identity from a real SPIRE agent, and its rotation,
 * is tests/server_identity_test.ts.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { waitFor } from "../src/process/mod.ts";
import { startTestBroker, type TestBroker } from "./helpers/broker.ts";
import { freePort } from "./helpers/ports.ts";
import { fleetServerIdentity } from "./helpers/server_identity.ts";
import { startTestPostgres, type TestPostgres } from "./helpers/postgres.ts";

const MAIN = new URL("../main.ts", import.meta.url).pathname;
const opts = { sanitizeOps: false, sanitizeResources: false };

async function cli(args: string[], env: Record<string, string> = {}) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

Deno.test("server --database: a password in the URL or a readable password file is refused", async () => {
  const r = await cli(["server", "--database", "postgres://k8s4r:hunter2-x@127.0.0.1:5432/fleet"]);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /--database: the URL contains a password/);
  assert.match(r.stderr, /--database-password-file FILE/);
  assert.ok(!r.stderr.includes("hunter2"), r.stderr);
  assert.equal(r.stderr.trim().split("\n").filter((l) => l.includes("password")).length, 1);

  const dir = await Deno.makeTempDir({ prefix: "k8s4r-pgcli-" });
  try {
    const pw = join(dir, "pw");
    await Deno.writeTextFile(pw, "secret-pw\n");
    await Deno.chmod(pw, 0o644);
    const r2 = await cli([
      "server",
      "--database",
      "postgres://k8s4r@127.0.0.1:5432/fleet",
      "--database-password-file",
      pw,
    ]);
    assert.equal(r2.code, 1, r2.stderr);
    assert.match(r2.stderr, /database password file is readable by group or others \(mode 644/);
    assert.match(r2.stderr, /chmod 600/);
    const r3 = await cli(["server", "--database-password-file", pw]);
    assert.equal(r3.code, 2, r3.stderr);
    assert.match(r3.stderr, /--database-password-file: only with --database/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("server: a K8S4R_MQTT_PASSWORD_FILE others can read, or another user's, is refused; control: our 0600 file is taken", async () => {
  if (Deno.uid() !== 0) throw new Error("chowns a file to another user: run as root");
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-mqttpw-" });
  try {
    const pw = join(dir, "mqtt.pw");
    await Deno.writeTextFile(pw, "mqtt-secret\n");
    const run = () =>
      cli([
        "server",
        "--http-addr",
        `127.0.0.1:${freePort()}`,
        "--socket-path",
        join(dir, "no-agent.sock"),
        "--svid-timeout",
        "1",
      ], {
        K8S4R_MQTT_USERNAME: "k8s4r-server",
        K8S4R_MQTT_PASSWORD_FILE: pw,
        K8S4R_ROLES_FILE: join(dir, "roles.yaml"),
      });
    await Deno.chmod(pw, 0o644);
    const open = await run();
    assert.equal(open.code, 1, open.stderr);
    assert.match(
      open.stderr,
      new RegExp(
        `${pw}: MQTT password file is readable by group or others \\(mode 644, expected 600\\); run chmod 600`,
      ),
    );
    await Deno.chmod(pw, 0o600);
    await Deno.chown(pw, 65534, 65534);
    const foreign = await run();
    assert.equal(foreign.code, 1, foreign.stderr);
    assert.match(foreign.stderr, /MQTT password file belongs to uid 65534, not to this user/);
    assert.ok(!open.stderr.includes("mqtt-secret") && !foreign.stderr.includes("mqtt-secret"));
    // The control: our own 0600 file is accepted; the server goes on to its identity (there
    // is no Workload API here, so that is where it stops).
    await Deno.chown(pw, 0, 0);
    const ok = await run();
    assert.equal(ok.code, 1, ok.stderr);
    assert.doesNotMatch(ok.stderr, /password file/);
    assert.match(ok.stderr, /no-agent\.sock/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

class ServerProcess {
  /** Its stderr, line by line, as it comes. */
  readonly log: string[] = [];
  readonly child: Deno.ChildProcess;
  readonly api: string;
  exited = false;
  private readonly pumped: Promise<void>;

  constructor(args: string[], env: Record<string, string>, httpPort: number) {
    // The server's certificate names localhost (as SPIRE's entry -dns localhost does).
    this.api = `https://localhost:${httpPort}`;
    this.child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", MAIN, "server", ...args, "--http-addr", `127.0.0.1:${httpPort}`],
      env,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    this.child.status.then(() => (this.exited = true));
    const stderr = this.child.stderr;
    this.pumped = (async () => {
      let rest = "";
      for await (const chunk of stderr.pipeThrough(new TextDecoderStream())) {
        rest += chunk;
        const parts = rest.split("\n");
        rest = parts.pop() ?? "";
        this.log.push(...parts);
      }
      if (rest) this.log.push(rest);
    })();
  }

  async stop(): Promise<number> {
    try {
      this.child.kill("SIGTERM"); // our own child, by the pid we spawned
    } catch { /* already exited */ }
    const s = await this.child.status;
    await this.pumped;
    return s.code;
  }
}

async function mqttCredentials(b: TestBroker, dir: string): Promise<string> {
  const f = join(dir, "server-mqtt.json");
  await Deno.writeTextFile(
    f,
    JSON.stringify({ username: b.server.username, password: b.server.password }),
    { mode: 0o600 },
  );
  await Deno.chmod(f, 0o600);
  return f;
}

Deno.test({
  name: "server --database: runs on PostgreSQL with the password from a 0600 file or the env",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    let pgs: TestPostgres | undefined;
    const dir = await Deno.makeTempDir({ prefix: "k8s4r-pgcli-" });
    const running: ServerProcess[] = [];
    const id = await fleetServerIdentity(dir, { ttlSeconds: 3600, svidTimeoutSeconds: 20 });
    const { web } = id;
    try {
      pgs = await startTestPostgres();
      const db = await pgs.createDatabase("cli");
      const creds = await mqttCredentials(b, dir);
      const base = ["--broker-url", b.plainUrl, "--mqtt-credentials", creds, ...id.args];
      // A database whose commits are not durable: the server says so.
      const lax = await pgs.createDatabase("lax");
      await pgs.admin(`ALTER DATABASE ${lax} SET synchronous_commit = off`);
      const cases: {
        what: string;
        db: string;
        via: "socket" | "tcp";
        args: string[];
        env: Record<string, string>;
      }[] = [
        {
          what: "unix socket, --database-password-file",
          db,
          via: "socket",
          args: ["--database", pgs.url(db), "--database-password-file", pgs.passwordFile],
          env: {},
        },
        {
          what: "TCP, K8S4R_DATABASE_PASSWORD",
          db,
          via: "tcp",
          args: ["--database", pgs.url(db, "tcp")],
          env: { K8S4R_DATABASE_PASSWORD: pgs.password },
        },
        {
          what: "synchronous_commit=off, PGPASSWORD",
          db: lax,
          via: "socket",
          args: ["--database", pgs.url(lax)],
          env: { PGPASSWORD: pgs.password },
        },
      ];
      for (const c of cases) {
        const s = new ServerProcess([...base, ...c.args], c.env, freePort());
        running.push(s);
        await waitFor(async () => {
          const r = await web.fetch(`${s.api}/healthz`).catch(() => undefined);
          await r?.body?.cancel();
          return r?.status === 200;
        }, {
          timeoutMs: 30_000,
          what: `the server (${c.what}) to serve /healthz`,
          fatal: () => s.exited ? new Error(`${c.what}: the server exited`) : undefined,
        }).catch((err) => {
          throw new Error(`${err.message}; its log:\n${s.log.join("\n")}`);
        });
        // The registry is in PostgreSQL: a task created through the API is a row there.
        const rows = await pgs.admin("SELECT count(*)::int AS n FROM robots", [], c.db);
        assert.equal(rows[0].n, 0);
        const robots = await web.json(`${s.api}/api/robots`);
        assert.deepEqual(robots, { status: 200, body: { robots: [] } });
        const cmdline = await Deno.readTextFile(`/proc/${s.child.pid}/cmdline`);
        assert.ok(!cmdline.includes(pgs.password), `${c.what}: the password is in argv`);
        assert.equal(await s.stop(), 0, s.log.join("\n"));
        running.pop();
        const all = s.log.join("\n");
        assert.ok(!all.includes(pgs.password), `${c.what}: the password is in the log`);
        const url = pgs.url(c.db, c.via);
        assert.ok(all.includes(`, registry ${url}, broker`), `${c.what}: ${all}`);
        const warned = all.includes(
          `WARN ${url}: synchronous_commit=off: an acknowledged message can be lost`,
        );
        assert.equal(warned, c.db === lax, `${c.what}: the durability warning`);
        assert.match(all, /fleet server stopped/);
      }

      // A wrong password: refused by PostgreSQL, reported without the password.
      const wrong = `${pgs.password}-wrong`;
      const r = await cli([
        "server",
        ...base,
        "--database",
        pgs.url(db),
        "--http-addr",
        `127.0.0.1:${freePort()}`,
      ], { PGPASSWORD: wrong });
      assert.equal(r.code, 1, r.stderr);
      assert.match(
        r.stderr,
        /cannot start the fleet server: postgres:\/\/k8s4r@\/cli_\d+_\d+\?host=.*: cannot connect: password authentication failed for user "k8s4r" \(SQLSTATE 28P01\)/,
      );
      assert.ok(!r.stderr.includes(wrong));
    } finally {
      for (const s of running) await s.stop();
      await id.close();
      await pgs?.destroy();
      await b.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});
