/**
 * Two REAL spire-servers (v1.13.3, our `go install` build) on one REAL PostgreSQL 15 datastore
 * (`database_type = "postgres"`, SPIRE's pure-Go driver), as `devenv start --ha` runs them:
 *
 * - a join token generated through server A attests an agent that only talks to server B, and
 *   an entry created through A is served by B (both live in the shared datastore);
 * - each server keeps its own CA (SPIRE doc/scaling_spire.md) and adds it to the shared bundle:
 *   both servers show the same bundle with both CAs, and the SVID B issued chains to B's CA;
 * - the datastore password is in no process's argv, in no log, and in no file that is not 0600.
 *
 * Positive control for "B serves A's entry": before the entry exists the agent gets no SVID.
 */
import assert from "node:assert/strict";
import { X509Certificate } from "node:crypto";
import { bufferIo, type Io } from "../src/cli/io.ts";
import { keywordValue } from "../src/postgres/local_cluster.ts";
import { type Daemon, realRunner, waitFor } from "../src/process/mod.ts";
import { findHaproxy, haproxyServers, renderHaproxyConfig } from "../src/devenv/haproxy.ts";
import { X509Source } from "../src/spiffe/mod.ts";
import { SpireAgentSupervisor } from "../src/spire/agent.ts";
import type { SpireServerCli, SpireServerDaemon } from "../src/spire/server.ts";
import { parsePemCerts } from "../src/broker/identity.ts";
import { startTestPostgres, type TestPostgres } from "./helpers/postgres.ts";
import { freePorts } from "./helpers/ports.ts";
import {
  bootstrapFiles,
  spireBinaries,
  startTmpSpireServer,
  tmpSpireAgent,
} from "./helpers/spire.ts";
import { cmdlinesContaining, filesContaining } from "./helpers/secrets.ts";

const TD = "k8s4r.example.org";

/**
 * One of the HA pair, as `devenv start --ha` runs it: its own data dir, socket and log under
 * `tmp/<name>`, the shared PostgreSQL datastore, a fast cache reload. B after A: the first
 * server creates the schema.
 */
async function startHaServer(
  io: Io,
  bins: { server: string },
  tmp: string,
  name: string,
  port: number,
  pg: { conn: string; password: string },
): Promise<{ server: SpireServerDaemon; cli: SpireServerCli }> {
  return await startTmpSpireServer(io, bins, tmp, port, {
    dataDir: `${tmp}/${name}`,
    socketPath: `${tmp}/${name}/api.sock`,
    logFile: `${tmp}/${name}.log`,
    pidFile: undefined,
    datastore: { type: "postgres", connectionString: pg.conn },
    secrets: [pg.password],
    cacheReloadInterval: "200ms",
    eventsBasedCache: true,
    readyTimeoutMs: 60_000,
  });
}

/**
 * The agent of both tests: its socket at tmp/ag/ (tmp/a/ is server A's), a 500 ms sync, the
 * server (or haproxy) at `serverPort`.
 */
function haAgent(bins: { agent: string }, tmp: string, serverPort: number) {
  return tmpSpireAgent(bins, tmp, {
    trustDomain: TD,
    serverPort,
    socketPath: `${tmp}/ag/agent.sock`,
    pidFile: undefined,
    syncInterval: "500ms",
  });
}

Deno.test({
  name: "SPIRE HA: two servers on one PostgreSQL share tokens, entries and the bundle",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const bins = await spireBinaries();
    const tmp = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-ha-" });
    const io = bufferIo({ env: Deno.env.toObject(), runner: realRunner, cwd: tmp });
    let pg: TestPostgres | undefined;
    const servers: SpireServerDaemon[] = [];
    let agent: SpireAgentSupervisor | undefined;
    let source: X509Source | undefined;
    try {
      // The registry suite's PostgreSQL 15 harness: its app role owns a new database for SPIRE.
      pg = await startTestPostgres();
      // On its unix socket, as `devenv start --ha` connects SPIRE (pgx reads host=/dir).
      const target = {
        host: pg.socketDir,
        port: pg.port,
        user: pg.user,
        database: await pg.createDatabase("spire"),
      };
      const password = pg.password;
      const conn = keywordValue(target, password);
      const [portA, portB] = freePorts(2);
      // B after A: the first server creates the schema.
      const { server: srvA, cli: a } = await startHaServer(io, bins, tmp, "a", portA, {
        conn,
        password,
      });
      servers.push(srvA);
      const { server: srvB, cli: b } = await startHaServer(io, bins, tmp, "b", portB, {
        conn,
        password,
      });
      servers.push(srvB);
      assert.equal(await a.healthy(), true);
      assert.equal(await b.healthy(), true);

      // The config holds the password: 0600, like every file that has it.
      for (const s of servers) {
        const mode = Deno.statSync(s.configFile).mode! & 0o777;
        assert.equal(mode, 0o600, `${s.configFile} is ${mode.toString(8)}`);
        assert.match(Deno.readTextFileSync(s.configFile), /database_type = "postgres"/);
      }

      // One bundle for both, with both servers' CAs.
      const bundleA = parsePemCerts(await a.bundlePem());
      const bundleB = parsePemCerts(await b.bundlePem());
      assert.deepEqual(
        bundleA.map((c) => c.fingerprint256),
        bundleB.map((c) => c.fingerprint256),
        "the servers show different bundles",
      );
      assert.equal(bundleA.length, 2, `expected both servers' CAs, got ${bundleA.length}`);
      // A's CA: the issuer of an SVID minted by A.
      const mintedByA = await a.mintX509({
        spiffeId: `spiffe://${TD}/probe`,
        dnsNames: ["probe"],
        ttlSeconds: 60,
      });
      const caA = bundleA.find((c) => new X509Certificate(mintedByA.certPem).checkIssued(c));
      assert.ok(caA, "the SVID A minted chains to no CA of the bundle");
      const caB = bundleA.find((c) => c.fingerprint256 !== caA.fingerprint256)!;

      // A token from A, an agent that only knows B.
      const nodeId = `spiffe://${TD}/k8s4r/node/ha-robot`;
      const workloadId = `spiffe://${TD}/robot/ha-robot`;
      await bootstrapFiles(a, tmp, nodeId);
      agent = haAgent(bins, tmp, portB);
      const socketPath = agent.socketPath;
      await agent.start();
      assert.equal(await agent.healthy(), true, "the agent did not attest through B");
      const agents = await b.listAgents();
      assert.ok(
        agents.some((a) => a.id.includes("/spire/agent/join_token/")),
        `B lists no join-token agent: ${agents.map((a) => a.id).join(", ")}`,
      );

      // Control: no entry yet, so no SVID for the workload.
      const early = await X509Source.create({
        address: `unix://${socketPath}`,
        spiffeId: workloadId,
        timeoutMs: 2000,
      }).then((s) => (s.close(), "got one"), (e) => (e as Error).message);
      assert.notEqual(early, "got one", "an SVID before the entry exists");

      // The entry through A; the SVID comes from B, signed by B's CA.
      await a.createEntry({
        spiffeId: workloadId,
        parentId: nodeId,
        selectors: [`unix:uid:${Deno.uid()}`],
        dnsNames: ["ha-robot"],
        x509SvidTtl: 60,
      });
      assert.equal((await b.listEntries({ spiffeId: workloadId })).length, 1);
      source = await X509Source.create({
        address: `unix://${socketPath}`,
        spiffeId: workloadId,
        timeoutMs: 30_000,
      });
      const leaf = source.getX509Svid().certificates[0] as X509Certificate;
      assert.ok(leaf.checkIssued(caB) && leaf.verify(caB.publicKey), "not signed by B's CA");
      assert.ok(!leaf.checkIssued(caA), "signed by A's CA, but the agent only talks to B");

      // The password: no argv, no log, no file that others could read.
      assert.deepEqual(cmdlinesContaining(password), [], "the password is on a command line");
      for (const f of [...filesContaining(tmp, password), ...filesContaining(pg.dir, password)]) {
        assert.ok(!f.endsWith(".log"), `the password is in the log ${f}`);
        const mode = Deno.statSync(f).mode! & 0o077;
        assert.equal(mode, 0, `${f} holds the password and is readable by others`);
      }
      assert.ok(
        !(await Deno.readTextFile(pg.cluster.logFile)).includes(password),
        "the password is in PostgreSQL's log",
      );
    } finally {
      source?.close();
      await agent?.stop().catch(() => {});
      for (const s of servers.reverse()) await s.stop(5000).catch(() => {});
      await pg?.destroy().catch(() => {});
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
    }
  },
});

/**
 * haproxy in front of the two servers, as `devenv start --ha` renders it: a SIGSTOPped
 * spire-server (frozen: the kernel still completes TCP handshakes for it) is marked DOWN, its
 * agent's session is cut, and the agent keeps renewing through the other server. Control: both
 * are UP before, and the agent renews while both run.
 */
Deno.test({
  name:
    "SPIRE HA: haproxy marks a frozen (SIGSTOP) spire-server DOWN; the agent renews through the other",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const bins = await spireBinaries();
    const haproxy = findHaproxy(Deno.env.toObject());
    assert.ok(haproxy, "haproxy is not installed (apt-get install -y haproxy)");
    const tmp = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-hap-" });
    const io = bufferIo({ env: Deno.env.toObject(), runner: realRunner, cwd: tmp });
    let pg: TestPostgres | undefined;
    const servers: SpireServerDaemon[] = [];
    let proxy: Daemon | undefined;
    let agent: SpireAgentSupervisor | undefined;
    let source: X509Source | undefined;
    let stopped: number | undefined;
    try {
      pg = await startTestPostgres();
      const conn = keywordValue({
        host: pg.socketDir,
        port: pg.port,
        user: pg.user,
        database: await pg.createDatabase("spire"),
      }, pg.password);
      const [portA, portB, front] = freePorts(3);
      const { server: srvA, cli: a } = await startHaServer(io, bins, tmp, "a", portA, {
        conn,
        password: pg.password,
      });
      servers.push(srvA);
      const { server: srvB, cli: b } = await startHaServer(io, bins, tmp, "b", portB, {
        conn,
        password: pg.password,
      });
      servers.push(srvB);
      const names = ["spire-server", "spire-server-2"];
      const stats = `${tmp}/haproxy.sock`;
      await Deno.writeTextFile(
        `${tmp}/haproxy.cfg`,
        renderHaproxyConfig({
          frontend: { address: "127.0.0.1", port: front },
          backends: [
            { name: names[0], address: "127.0.0.1", port: portA },
            { name: names[1], address: "127.0.0.1", port: portB },
          ],
          statsSocket: stats,
        }),
      );
      const state = async () => await haproxyServers(stats);
      proxy = await realRunner.spawn({
        name: "haproxy",
        cmd: haproxy,
        args: ["-f", `${tmp}/haproxy.cfg`, "-db"],
        logFile: `${tmp}/haproxy.log`,
        pidFile: `${tmp}/haproxy.pid`,
        ready: async () => (await state()) !== undefined,
        readyTimeoutMs: 20_000,
      });
      // Control: both servers UP behind it.
      await waitFor(async () => {
        const st = await state();
        return names.every((n) => st?.get(n)?.status === "UP");
      }, {
        timeoutMs: 20_000,
        what: "both SPIRE servers UP in haproxy",
      });

      const nodeId = `spiffe://${TD}/k8s4r/node/hap-robot`;
      const workloadId = `spiffe://${TD}/robot/hap-robot`;
      await bootstrapFiles(a, tmp, nodeId);
      await a.createEntry({
        spiffeId: workloadId,
        parentId: nodeId,
        selectors: [`unix:uid:${Deno.uid()}`],
        dnsNames: ["hap-robot"],
        x509SvidTtl: 12,
      });
      agent = haAgent(bins, tmp, front); // through haproxy
      const socketPath = agent.socketPath;
      await agent.start();
      source = await X509Source.create({
        address: `unix://${socketPath}`,
        spiffeId: workloadId,
        timeoutMs: 30_000,
      });
      const serial = () => (source!.getX509Svid().certificates[0] as X509Certificate).serialNumber;
      // Control: it renews while both servers run.
      const first = serial();
      await waitFor(() => serial() !== first, { timeoutMs: 30_000, what: "an SVID renewal" });

      // The server the agent's session goes to: freeze it.
      let busy = -1;
      await waitFor(async () => {
        const st = (await state())!;
        busy = names.findIndex((n) => (st.get(n)?.sessions ?? 0) > 0);
        return busy >= 0;
      }, { timeoutMs: 20_000, what: "the agent's session in haproxy" });
      const other = 1 - busy;
      // The surviving server's CA (the issuer of an SVID it mints).
      const minted = await [a, b][other].mintX509({
        spiffeId: `spiffe://${TD}/probe`,
        dnsNames: ["probe"],
        ttlSeconds: 60,
      });
      const bundle = parsePemCerts(await a.bundlePem());
      const caOther = bundle.find((c) => new X509Certificate(minted.certPem).checkIssued(c));
      assert.ok(caOther, "the surviving server's CA is not in the bundle");
      stopped = servers[busy].pid;
      const t0 = Date.now();
      Deno.kill(stopped, "SIGSTOP");
      await waitFor(async () => (await state())!.get(names[busy])?.status === "DOWN", {
        timeoutMs: 30_000,
        what: `haproxy to mark the frozen ${names[busy]} DOWN`,
      }).catch(async (err) => {
        throw new Error(`${(err as Error).message}: ${JSON.stringify([...(await state())!])}`);
      });
      const downMs = Date.now() - t0;
      assert.equal((await state())!.get(names[other])?.status, "UP");
      // The agent renews through the other server: a new SVID, signed by the survivor's CA.
      const before = serial();
      await waitFor(() => serial() !== before, {
        timeoutMs: 60_000,
        what: "an SVID renewal through the surviving server",
      });
      const leaf = source.getX509Svid().certificates[0] as X509Certificate;
      assert.ok(leaf.checkIssued(caOther), "the renewed SVID is not from the surviving server");
      console.log(
        `  ${names[busy]} frozen: DOWN in haproxy after ${downMs} ms, the agent's next SVID (from ${
          names[other]
        }) ${Date.now() - t0} ms after the SIGSTOP`,
      );
    } finally {
      if (stopped !== undefined) {
        try {
          Deno.kill(stopped, "SIGCONT");
        } catch { /* gone */ }
      }
      source?.close();
      await agent?.stop().catch(() => {});
      await proxy?.stop().catch(() => {});
      for (const s of servers.reverse()) await s.stop(5000).catch(() => {});
      await pg?.destroy().catch(() => {});
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
    }
  },
});
