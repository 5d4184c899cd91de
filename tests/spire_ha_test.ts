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
import { bufferIo } from "../src/cli/io.ts";
import { keywordValue } from "../src/postgres/local_cluster.ts";
import { realRunner } from "../src/process/mod.ts";
import { X509Source } from "../src/spiffe/mod.ts";
import { SpireAgentSupervisor } from "../src/spire/agent.ts";
import { SpireServerCli, type SpireServerDaemon, startSpireServer } from "../src/spire/server.ts";
import { parsePemCerts } from "../src/broker/identity.ts";
import { startTestPostgres, type TestPostgres } from "./helpers/postgres.ts";
import { freePorts } from "./helpers/ports.ts";
import { spireBinaries } from "./helpers/spire.ts";
import { cmdlinesContaining, filesContaining } from "./helpers/secrets.ts";

const TD = "k8s4r.example.org";
const REPO = new URL("..", import.meta.url).pathname;

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
      const target = {
        host: "127.0.0.1",
        port: pg.port,
        user: pg.user,
        database: await pg.createDatabase("spire"),
      };
      const password = pg.password;
      const conn = keywordValue(target, password);
      const [portA, portB] = freePorts(2);
      const start = (name: string, port: number) =>
        startSpireServer(io, {
          bin: bins.server,
          configFile: `${REPO}config/spire/server.conf`,
          cwd: tmp,
          port,
          dataDir: `${tmp}/${name}`,
          socketPath: `${tmp}/${name}/api.sock`,
          logFile: `${tmp}/${name}.log`,
          datastore: { type: "postgres", connectionString: conn },
          secrets: [password],
          cacheReloadInterval: "200ms",
          eventsBasedCache: true,
          readyTimeoutMs: 60_000,
        });
      // B after A: the first server creates the schema.
      servers.push(await start("a", portA));
      servers.push(await start("b", portB));
      const [a, b] = servers.map((s) => new SpireServerCli(realRunner, bins.server, s.socketPath));
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
      await Deno.writeTextFile(`${tmp}/bundle.pem`, await a.bundlePem());

      // A token from A, an agent that only knows B.
      const nodeId = `spiffe://${TD}/k8s4r/node/ha-robot`;
      const workloadId = `spiffe://${TD}/robot/ha-robot`;
      const token = await a.generateJoinToken(nodeId, 600);
      await Deno.writeTextFile(`${tmp}/join.token`, token.value, { mode: 0o600 });
      const socketPath = `${tmp}/ag/agent.sock`;
      agent = new SpireAgentSupervisor({
        runner: realRunner,
        bin: bins.agent,
        configPath: `${tmp}/agent/agent.conf`,
        dataDir: `${tmp}/agent/data`,
        socketPath,
        logFile: `${tmp}/spire-agent.log`,
        trustBundlePath: `${tmp}/bundle.pem`,
        joinTokenFile: `${tmp}/join.token`,
        trustDomain: TD,
        serverAddress: "127.0.0.1",
        serverPort: portB,
        logLevel: "INFO",
        syncInterval: "500ms",
      });
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
