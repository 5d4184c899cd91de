/**
 * The fleet server's own identity and its operators, with real parts: SPIRE v1.13.3 (server and
 * a control-host agent attested by join token), the real `k8s4r server` CLI (against a real
 * Mosquitto), `k8s4r operator add|creds|login|remove` through SPIRE's admin socket, real curl,
 * and a Go TLS client for the key-mismatch attack.
 *
 * - The server's certificate is its X.509 SVID `spiffe://<td>/fleet-server` from the agent's
 *   Workload API, with DNS `localhost`. SPIRE v1.13.3 writes `-dns 127.0.0.1` as a dNSName,
 *   not an iPAddress SAN (checked below), so the server's URL is https://localhost:PORT.
 * - It rotates (entry TTL 20 s) and the new certificate is served without a restart.
 * - No SVID: a clear error naming the ID, the socket and the entry to create.
 */
import assert from "node:assert/strict";
import { X509Certificate } from "node:crypto";
import tls from "node:tls";
import { fileURLToPath } from "node:url";
import { freePort } from "./helpers/ports.ts";
import {
  bootstrapFiles,
  spireBinaries,
  startTmpSpireServer,
  tmpSpireAgent,
} from "./helpers/spire.ts";
import { startTestBroker, type TestBroker } from "./helpers/broker.ts";
import { bufferIo } from "../src/cli/io.ts";
import { type Daemon, processStartTime, realRunner, waitFor } from "../src/process/mod.ts";
import { SpireAgentSupervisor } from "../src/spire/agent.ts";
import type { SpireServerCli, SpireServerDaemon } from "../src/spire/server.ts";
import { fleetServerDnsNames, fleetServerSpiffeId } from "../src/fleet/mod.ts";
import { TestCa } from "../src/spiffe/testing/test_ca.ts";

const TD = "k8s4r.example.org";
const REPO = fileURLToPath(new URL("..", import.meta.url));
const MAIN = `${REPO}main.ts`;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function run(cmd: string, args: string[], env: Record<string, string>, cwd: string) {
  const out = await new Deno.Command(cmd, {
    args,
    env,
    cwd,
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(120_000),
  }).output();
  const d = new TextDecoder();
  return { code: out.code, stdout: d.decode(out.stdout), stderr: d.decode(out.stderr) } as Run;
}

/** curl's answer: `-w "\n%{http_code}"` appended the status to the JSON body. */
function answer(r: Run): { status: number; body: Record<string, unknown> } {
  const i = r.stdout.lastIndexOf("\n");
  const status = Number(r.stdout.slice(i + 1));
  assert.ok(status > 0, `curl got no HTTP answer (exit ${r.code}): ${r.stderr}`);
  return { status, body: JSON.parse(r.stdout.slice(0, i)) };
}

/** The serial and SANs of the certificate a fresh TLS connection to `port` gets. */
function served(port: number, ca: string): Promise<{ serial: string; cert: X509Certificate }> {
  return new Promise((resolve, reject) => {
    const c = tls.connect({ host: "127.0.0.1", port, servername: "localhost", ca }, () => {
      const p = c.getPeerCertificate();
      c.end();
      resolve({ serial: p.serialNumber, cert: new X509Certificate(p.raw) });
    });
    c.on("error", reject);
  });
}

/** Builds the Go attack client (Go is also what builds SPIRE: it must be installed). */
async function buildKeyMismatchClient(dir: string): Promise<string> {
  const out = `${dir}/tls_key_mismatch`;
  let r;
  try {
    r = await new Deno.Command("go", {
      args: ["build", "-o", out, "."],
      cwd: `${REPO}tests/helpers/tls_key_mismatch`,
      stdout: "piped",
      stderr: "piped",
    }).output();
  } catch (err) {
    throw new Error(
      `go is needed for the key-mismatch attack client (install Go >= 1.25, as for SPIRE): ${
        (err as Error).message
      }`,
    );
  }
  assert.equal(r.code, 0, `go build: ${new TextDecoder().decode(r.stderr)}`);
  return out;
}

Deno.test({
  name:
    "real SPIRE: the server's SVID serves HTTPS and rotates; operator add/creds/login/remove; curl; attacks",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    const bins = await spireBinaries();
    const tmp = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-id-" });
    const io = bufferIo({ env: Deno.env.toObject(), runner: realRunner, cwd: tmp });
    const spirePort = freePort();
    const httpPort = freePort();
    const controlNode = `spiffe://${TD}/k8s4r/node/control`;
    const serverId = fleetServerSpiffeId(TD);
    const sock = `${tmp}/c/agent.sock`;
    const adminSock = `${tmp}/s/api.sock`;
    const roles = `${tmp}/etc/roles.yaml`;
    const url = `https://localhost:${httpPort}`;
    const env: Record<string, string> = {
      PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
      HOME: Deno.env.get("HOME") ?? "/root",
      XDG_CONFIG_HOME: `${tmp}/xdg`,
      NO_COLOR: "1",
      K8S4R_TRUST_DOMAIN: TD,
      K8S4R_ROLES_FILE: roles,
      K8S4R_SPIRE_SERVER_SOCKET: adminSock,
      K8S4R_SERVER_URL: url,
    };
    if (Deno.env.get("K8S4R_SPIRE_BIN_DIR")) {
      env.K8S4R_SPIRE_BIN_DIR = Deno.env.get("K8S4R_SPIRE_BIN_DIR")!;
    }
    if (Deno.env.get("DENO_DIR")) env.DENO_DIR = Deno.env.get("DENO_DIR")!;
    const k8s4r = (args: string[], extra: Record<string, string> = {}) =>
      run(
        Deno.execPath(),
        ["run", "-A", "--quiet", "--config", `${REPO}deno.json`, MAIN, ...args],
        {
          ...env,
          ...extra,
        },
        tmp,
      );
    const curl = (args: string[]) =>
      run("curl", ["-sS", "-w", "\n%{http_code}", ...args], env, tmp);
    let spire: SpireServerDaemon | undefined;
    let agent: SpireAgentSupervisor | undefined;
    let broker: TestBroker | undefined;
    let server: Daemon | undefined;
    const pids: number[] = [];
    try {
      let cli: SpireServerCli;
      ({ server: spire, cli } = await startTmpSpireServer(io, bins, tmp, spirePort, {
        dataDir: `${tmp}/srv`,
        socketPath: adminSock,
      }));
      pids.push(spire.pid);
      await bootstrapFiles(cli, tmp, controlNode);
      assert.equal(
        await cli.reconcileEntry({
          spiffeId: serverId,
          parentId: controlNode,
          selectors: [`unix:uid:${Deno.uid()}`],
          dnsNames: fleetServerDnsNames(),
          x509SvidTtl: 20, // rotates within the test
        }),
        "created",
      );
      agent = tmpSpireAgent(bins, tmp, {
        trustDomain: TD,
        serverPort: spirePort,
        socketPath: sock,
      });
      await agent.start();
      pids.push(agent.pid!);
      broker = await startTestBroker();
      await Deno.writeTextFile(`${tmp}/mqtt.json`, JSON.stringify(broker.server), { mode: 0o600 });
      const bundle = await cli.bundlePem();

      await t.step("no SVID: a clear error naming the ID, the socket and the entry", async () => {
        const r = await k8s4r([
          "server",
          "--socket-path",
          `${tmp}/nowhere/agent.sock`,
          "--svid-timeout",
          "2",
          "--mqtt-credentials",
          `${tmp}/mqtt.json`,
          "--broker-url",
          broker!.plainUrl,
          "--http-addr",
          `127.0.0.1:${httpPort}`,
          "--data-dir",
          `${tmp}/data0`,
        ]);
        assert.equal(r.code, 1, r.stderr);
        assert.match(r.stderr, new RegExp(`no X\\.509 SVID for ${serverId.replace(/\./g, "\\.")}`));
        assert.match(r.stderr, /nowhere\/agent\.sock/);
        assert.match(
          r.stderr,
          /spire-server entry create -parentID .* -spiffeID spiffe:\/\/k8s4r\.example\.org\/fleet-server/,
        );
        // A real agent that has no entry for the ID asked for.
        const other = await k8s4r([
          "server",
          "--socket-path",
          sock,
          "--spiffe-id",
          `spiffe://${TD}/not-registered`,
          "--svid-timeout",
          "3",
          "--mqtt-credentials",
          `${tmp}/mqtt.json`,
          "--broker-url",
          broker!.plainUrl,
          "--http-addr",
          `127.0.0.1:${httpPort}`,
          "--data-dir",
          `${tmp}/data0`,
        ]);
        assert.equal(other.code, 1);
        // A broken roles file stops the server at start, naming file, line and key (exit 2).
        await Deno.writeTextFile(`${tmp}/bad-roles.yaml`, "operators:\n  admin: root\n");
        const bad = await k8s4r([
          "server",
          "--roles",
          `${tmp}/bad-roles.yaml`,
          "--socket-path",
          sock,
          "--mqtt-credentials",
          `${tmp}/mqtt.json`,
        ]);
        assert.equal(bad.code, 2, bad.stderr);
        assert.match(
          bad.stderr,
          /bad-roles\.yaml:2: operators\.admin: expected a role, one of metrics, viewer, operator, got "root"/,
        );
        assert.match(
          other.stderr,
          /no X\.509 SVID for spiffe:\/\/k8s4r\.example\.org\/not-registered/,
        );
      });

      // The real server, as devenv or a unit file would run it.
      server = await realRunner.spawn({
        name: "server",
        cmd: Deno.execPath(),
        args: [
          "run",
          "-A",
          "--quiet",
          "--config",
          `${REPO}deno.json`,
          MAIN,
          "server",
          "--socket-path",
          sock,
          "--roles",
          roles,
          "--mqtt-credentials",
          `${tmp}/mqtt.json`,
          "--broker-url",
          broker.plainUrl,
          "--http-addr",
          `127.0.0.1:${httpPort}`,
          "--data-dir",
          `${tmp}/data`,
        ],
        cwd: tmp,
        env,
        logFile: `${tmp}/server.log`,
        pidFile: `${tmp}/server.pid`,
        ready: async () =>
          (await curl(["--cacert", `${tmp}/bundle.pem`, `${url}/healthz`])).stdout.endsWith("200"),
        readyTimeoutMs: 60_000,
      });
      pids.push(server.pid);
      const log = () => Deno.readTextFileSync(`${tmp}/server.log`);
      assert.match(log(), /roles\.yaml does not exist: every API request is refused/);

      await t.step("the server's certificate is its SVID (DNS localhost, no IP SAN)", async () => {
        const s = await served(httpPort, bundle);
        assert.match(
          s.cert.subjectAltName ?? "",
          /URI:spiffe:\/\/k8s4r\.example\.org\/fleet-server/,
        );
        assert.equal(s.cert.checkHost("localhost"), "localhost");
        assert.equal(s.cert.checkIP("127.0.0.1"), undefined);
        // What SPIRE does with an IP in -dns: a dNSName "127.0.0.1", never an iPAddress SAN.
        const dir = await Deno.makeTempDir({ dir: tmp, prefix: "mint-" });
        const m = await run(
          bins.server,
          [
            "x509",
            "mint",
            "-spiffeID",
            serverId,
            "-dns",
            "localhost",
            "-dns",
            "127.0.0.1",
            "-ttl",
            "5m",
            "-write",
            dir,
            "-socketPath",
            adminSock,
          ],
          env,
          tmp,
        );
        assert.equal(m.code, 0, m.stderr);
        const minted = new X509Certificate(await Deno.readTextFile(`${dir}/svid.pem`));
        assert.match(minted.subjectAltName ?? "", /DNS:127\.0\.0\.1/);
        assert.doesNotMatch(minted.subjectAltName ?? "", /IP Address/);
        assert.equal(minted.checkIP("127.0.0.1"), undefined, "SPIRE wrote an IP SAN after all");
        // So curl refuses https://127.0.0.1 (exit 60) and accepts https://localhost.
        const byIp = await curl([
          "--cacert",
          `${tmp}/bundle.pem`,
          `https://127.0.0.1:${httpPort}/healthz`,
        ]);
        assert.equal(byIp.code, 60, byIp.stderr);
        assert.match(byIp.stderr, /no alternative certificate subject name matches/);
      });

      let admin: { cert: string; key: string; bundle: string; serverUrl: string };
      await t.step(
        "operator add: 0600 credentials, role recorded, no key on any output",
        async () => {
          const r = await k8s4r(["operator", "add", "admin", "--role", "operator", "--ttl", "1h"]);
          assert.equal(r.code, 0, r.stderr);
          assert.match(
            r.stdout,
            /operator admin \(spiffe:\/\/k8s4r\.example\.org\/operator\/admin\) added as operator/,
          );
          assert.doesNotMatch(r.stdout + r.stderr, /PRIVATE KEY/);
          const dir = `${tmp}/xdg/k8s4r/operators/admin`;
          assert.equal(Deno.statSync(dir).mode! & 0o777, 0o700);
          assert.equal(Deno.statSync(`${tmp}/xdg/k8s4r/operators`).mode! & 0o777, 0o700);
          for (const f of ["cert.pem", "key.pem", "bundle.pem", "operator.json"]) {
            assert.equal(Deno.statSync(`${dir}/${f}`).mode! & 0o777, 0o600, f);
          }
          assert.deepEqual([...Deno.readDirSync(`${tmp}/xdg/k8s4r/operators`)].map((e) => e.name), [
            "admin",
          ], "a staging directory was left behind");
          const cert = new X509Certificate(await Deno.readTextFile(`${dir}/cert.pem`));
          assert.match(
            cert.subjectAltName ?? "",
            /URI:spiffe:\/\/k8s4r\.example\.org\/operator\/admin/,
          );
          const life = Date.parse(cert.validTo) - Date.parse(cert.validFrom);
          assert.ok(life > 3500_000 && life < 3700_000, `--ttl 1h gave ${life} ms`);
          assert.match(
            await Deno.readTextFile(roles),
            /admin:\n\s+role: operator\n\s+issuedAfter: \S+Z\n/,
          );
          assert.doesNotMatch(await Deno.readTextFile(`${tmp}/spire-server.log`), /PRIVATE KEY/);
          const c = await k8s4r(["operator", "creds", "--json"]);
          assert.equal(c.code, 0, c.stderr);
          admin = JSON.parse(c.stdout);
          assert.deepEqual(Object.keys(admin).sort(), ["bundle", "cert", "key", "serverUrl"]);
          assert.equal(admin.serverUrl, url);
          // Adding it again is refused (it would silently replace the certificate).
          const again = await k8s4r(["operator", "add", "admin", "--role", "viewer"]);
          assert.equal(again.code, 1);
          assert.match(again.stderr, /already has credentials/);
        },
      );

      await t.step(
        "curl with `operator creds` works; without a certificate: 401 JSON",
        async () => {
          const ok = await curl([
            "--cert",
            admin.cert,
            "--key",
            admin.key,
            "--cacert",
            admin.bundle,
            `${admin.serverUrl}/api/robots`,
          ]);
          assert.equal(ok.code, 0, ok.stderr);
          assert.deepEqual(answer(ok), { status: 200, body: { robots: [] } });
          const none = answer(
            await curl(["--cacert", admin.bundle, `${admin.serverUrl}/api/robots`]),
          );
          assert.equal(none.status, 401);
          assert.equal(none.body.code, "no-certificate");
          // The CLI finds the credentials by itself.
          const robots = await k8s4r(["robots"]);
          assert.equal(robots.code, 0, robots.stderr);
          assert.equal(robots.stdout, "no robots have registered yet\n");
          const tasks = await k8s4r(["tasks"]);
          assert.equal(tasks.code, 0, tasks.stderr);
          assert.equal(tasks.stdout, "no tasks\n");
        },
      );

      await t.step(
        "the key-mismatch attack: admin's certificate with another key fails TLS",
        async () => {
          const mm = await buildKeyMismatchClient(tmp);
          const other = TestCa.create({ trustDomain: TD }).issue({ spiffeId: `spiffe://${TD}/x` });
          await Deno.writeTextFile(`${tmp}/other.key`, other.keyPem, { mode: 0o600 });
          // Positive control: the same client with the right key gets in.
          const good = await run(
            mm,
            [admin.cert, admin.key, admin.bundle, `${url}/api/whoami`],
            env,
            tmp,
          );
          assert.equal(good.code, 0, good.stdout + good.stderr);
          assert.match(good.stdout, /^200 .*"operator": "admin"/s);
          for (const v of ["1.3", "1.2"]) {
            const bad = await run(mm, [
              admin.cert,
              `${tmp}/other.key`,
              admin.bundle,
              `${url}/api/whoami`,
            ], {
              ...env,
              TLS_VERSION: v,
            }, tmp);
            assert.equal(bad.code, 3, `TLS ${v}: ${bad.stdout}`);
            assert.match(bad.stdout, /^ERR /, `TLS ${v}`);
          }
        },
      );

      await t.step(
        "a viewer reads but cannot run a task; remove: a kept copy gets 403",
        async () => {
          const r = await k8s4r(["operator", "add", "vera", "--role", "viewer"]);
          assert.equal(r.code, 0, r.stderr);
          const asVera = { K8S4R_OPERATOR: "vera" };
          assert.equal((await k8s4r(["robots"], asVera)).code, 0);
          const run1 = await k8s4r(["task", "run", "robot-001", "--", "true"], asVera);
          assert.equal(run1.code, 1);
          assert.match(run1.stderr, /HTTP 403|is a viewer/);
          assert.match(
            run1.stderr,
            /vera is a viewer: creating and cancelling tasks needs the operator role/,
          );
          const dir = `${tmp}/xdg/k8s4r/operators/vera`;
          await Deno.copyFile(`${dir}/cert.pem`, `${tmp}/vera.pem`);
          await Deno.copyFile(`${dir}/key.pem`, `${tmp}/vera.key`);
          const before = await curl([
            "--cert",
            `${tmp}/vera.pem`,
            "--key",
            `${tmp}/vera.key`,
            "--cacert",
            admin.bundle,
            `${url}/api/robots`,
          ]);
          assert.equal(answer(before).status, 200);
          const rm = await k8s4r(["operator", "remove", "vera"]);
          assert.equal(rm.code, 0, rm.stderr);
          assert.throws(() => Deno.statSync(dir), Deno.errors.NotFound);
          assert.doesNotMatch(await Deno.readTextFile(roles), /vera/);
          const after = await curl([
            "--cert",
            `${tmp}/vera.pem`,
            "--key",
            `${tmp}/vera.key`,
            "--cacert",
            admin.bundle,
            `${url}/api/robots`,
          ]);
          assert.equal(answer(after).status, 403, after.stdout);
          assert.equal(answer(after).body.code, "no-role");
          const list = await k8s4r(["operator", "list"]);
          assert.match(list.stdout, /^admin\s+operator\s+until /m);
          assert.doesNotMatch(list.stdout, /vera/);
          assert.equal((await k8s4r(["operator", "remove", "vera"])).code, 1);
        },
      );

      await t.step("operator login renews expired credentials", async () => {
        const dir = `${tmp}/xdg/k8s4r/operators/admin`;
        const fresh = await k8s4r(["operator", "login", "admin"]);
        assert.equal(fresh.code, 0, fresh.stderr);
        assert.match(fresh.stdout, /nothing to do, valid until/);
        // An expired certificate in the directory (as after a night away).
        const expired = TestCa.create({ trustDomain: TD }).issueExpired({
          spiffeId: `spiffe://${TD}/operator/admin`,
        });
        await Deno.writeTextFile(`${dir}/cert.pem`, expired.chainPem, { mode: 0o600 });
        await Deno.writeTextFile(`${dir}/key.pem`, expired.keyPem, { mode: 0o600 });
        const refused = await k8s4r(["robots"]);
        assert.equal(refused.code, 1);
        assert.match(refused.stderr, /operator admin's certificate expired at/);
        assert.match(refused.stderr, /k8s4r operator login admin/);
        const login = await k8s4r(["operator", "login", "admin"]);
        assert.equal(login.code, 0, login.stderr);
        assert.match(login.stdout, /renewed \(expired at/);
        assert.equal((await k8s4r(["robots"])).code, 0);
        // A copy of these credentials kept elsewhere (a leaked key): still valid, and works...
        const mintedAt = Date.now();
        const kept = { cert: `${tmp}/kept-cert.pem`, key: `${tmp}/kept-key.pem` };
        await Deno.copyFile(admin.cert, kept.cert);
        await Deno.copyFile(admin.key, kept.key);
        const viaKept = () =>
          curl([
            "--cert",
            kept.cert,
            "--key",
            kept.key,
            "--cacert",
            admin.bundle,
            `${url}/api/whoami`,
          ]);
        assert.equal(answer(await viaKept()).status, 200, "the control: the copy works");
        // ...until the next login mints a new SVID (certificates carry whole seconds: the new
        // one must be of a later second to be told apart).
        await waitFor(() => Math.floor(Date.now() / 1000) > Math.floor(mintedAt / 1000), {
          timeoutMs: 2000,
          intervalMs: 20,
          what: "the next second",
        });
        const forced = await k8s4r(["operator", "login", "admin", "--force"]);
        assert.match(forced.stdout, /renewed \(renewal forced\)/);
        const revoked = answer(await viaKept());
        assert.equal(revoked.status, 403, JSON.stringify(revoked));
        assert.equal(revoked.body.code, "superseded-certificate");
        const ok = await curl([
          "--cert",
          admin.cert,
          "--key",
          admin.key,
          "--cacert",
          admin.bundle,
          `${url}/api/whoami`,
        ]);
        assert.equal(answer(ok).status, 200);
      });

      await t.step("the server's SVID rotates and is served without a restart", async () => {
        const pid = server!.pid;
        const start = processStartTime(pid);
        const first = await served(httpPort, bundle);
        let next = first;
        await waitFor(async () => {
          next = await served(httpPort, bundle);
          return next.serial !== first.serial;
        }, { timeoutMs: 60_000, intervalMs: 500, what: "a rotated server certificate" });
        assert.ok(Date.parse(next.cert.validTo) > Date.parse(first.cert.validTo));
        assert.match(next.cert.subjectAltName ?? "", /fleet-server/);
        assert.equal(processStartTime(pid), start, "the server restarted");
        assert.match(log(), /SVID spiffe:\/\/k8s4r\.example\.org\/fleet-server rotated/);
        const ok = await curl([
          "--cert",
          admin.cert,
          "--key",
          admin.key,
          "--cacert",
          admin.bundle,
          `${url}/api/robots`,
        ]);
        assert.equal(answer(ok).status, 200);
      });
    } finally {
      await server?.stop().catch(() => {});
      await agent?.stop().catch(() => {});
      await spire?.stop().catch(() => {});
      await broker?.stop().catch(() => {});
      for (const pid of pids) {
        assert.equal(processStartTime(pid), undefined, `process ${pid} survived the test`);
      }
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
    }
  },
});
