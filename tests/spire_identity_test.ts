/**
 * Real SPIRE, end to end: spire-server v1.13.3 and a spire-agent attested by join token, in a
 * temp dir on free loopback ports; a workload entry for this test's uid; `X509Source` gets the
 * SVID and a rotated one; SpireAgentSupervisor restarts a `kill -9`ed agent without a token and
 * leaves no process behind on stop.
 *
 * Timing (SPIRE v1.13.3): the server backdates SVIDs by 10 s, so an entry with x509SVIDTTL=T
 * yields certificates living T+10 s; the agent renews at about half of that (±10 % jitter) on
 * its 5 s sync loop. With T = 20 s (any positive TTL is accepted) a rotation arrives ~5-10 s
 * after issuance.
 */
import assert from "node:assert/strict";
import { X509Certificate } from "node:crypto";
import { freePort } from "./helpers/ports.ts";
import {
  bootstrapFiles,
  spireBinaries,
  startTmpSpireServer,
  tmpSpireAgent,
} from "./helpers/spire.ts";
import { bufferIo } from "../src/cli/io.ts";
import { processStartTime, realRunner, waitFor } from "../src/process/mod.ts";
import { X509Source } from "../src/spiffe/mod.ts";
import { type AgentEvent, isAttested, SpireAgentSupervisor } from "../src/spire/agent.ts";
import { grpcHealthCheck } from "../src/spire/health.ts";
import type { SpireServerCli, SpireServerDaemon } from "../src/spire/server.ts";

const TD = "k8s4r.example.org";

Deno.test({
  name: "real SPIRE: join-token agent, X509Source SVID + rotation, supervisor restart and stop",
  // grpc-js (health checks, Workload API stream) keeps timers briefly after close; every process
  // this test starts is stopped and checked in `finally`.
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    const bins = await spireBinaries();
    // Short: the agent socket path must stay under 107 bytes.
    const tmp = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-" });
    const io = bufferIo({ env: Deno.env.toObject(), runner: realRunner, cwd: tmp });
    const port = freePort();
    const nodeId = `spiffe://${TD}/k8s4r/node/test-robot`;
    const workloadId = `spiffe://${TD}/robot/test-robot`;
    const events: AgentEvent[] = [];
    let server: SpireServerDaemon | undefined;
    let agent: SpireAgentSupervisor | undefined;
    let source: X509Source | undefined;
    const pids: number[] = [];
    try {
      // The committed config, run from the temp dir: its ./.spire-data paths land in tmp.
      let cli: SpireServerCli;
      ({ server, cli } = await startTmpSpireServer(io, bins, tmp, port));
      pids.push(server.pid);
      assert.equal(await cli.healthy(), true);
      const token = await bootstrapFiles(cli, tmp, nodeId);
      assert.ok(token.expiresAt.getTime() > Date.now());

      const desired = {
        spiffeId: workloadId,
        parentId: nodeId,
        selectors: [`unix:uid:${Deno.uid()}`],
        dnsNames: ["test-robot"],
        x509SvidTtl: 20,
      };
      assert.equal(await cli.reconcileEntry(desired), "created");
      assert.equal(await cli.reconcileEntry(desired), "unchanged");
      assert.equal((await cli.listEntries({ spiffeId: workloadId })).length, 1);

      const socketPath = `${tmp}/a/agent.sock`;
      agent = tmpSpireAgent(bins, tmp, {
        trustDomain: TD,
        serverPort: port,
        socketPath,
        onEvent: (e) => events.push(e),
      });
      const t0 = performance.now();
      await agent.start();
      pids.push(agent.pid!);
      assert.equal(await agent.healthy(), true);
      assert.equal(await isAttested(`${tmp}/agent/data`), true);
      assert.deepEqual(events[0], { type: "starting", attempt: 0, withToken: true });
      // The token never reaches a command line, k8s4r's events, or the agent's log (SPIRE names
      // the agent spiffe://<td>/spire/agent/join_token/<token>; the supervisor redacts it).
      assert.ok(!Deno.readTextFileSync(`/proc/${agent.pid}/cmdline`).includes(token.value));
      assert.ok(!JSON.stringify(events).includes(token.value));
      const agentLog = await Deno.readTextFile(`${tmp}/spire-agent.log`);
      assert.ok(agentLog.includes("join_token/<redacted>"), "the agent log names the redacted ID");
      assert.ok(!agentLog.includes(token.value), "the join token is in the spire-agent log");
      const serverLog = await Deno.readTextFile(`${tmp}/spire-server.log`);
      assert.ok(!serverLog.includes(token.value), "the join token is in the spire-server log");

      await t.step("X509Source receives the workload's SVID", async () => {
        source = await X509Source.create({
          address: `unix://${socketPath}`,
          spiffeId: workloadId,
          timeoutMs: 30_000,
        });
        const svid = source.getX509Svid();
        console.log(
          `time to first SVID (agent start -> SVID): ${Math.round(performance.now() - t0)} ms`,
        );
        assert.equal(svid.id.toString(), workloadId);
        const leaf = svid.certificates[0] as X509Certificate;
        assert.match(leaf.subjectAltName ?? "", /DNS:test-robot/);
        assert.match(leaf.subject, /CN=test-robot/);
      });

      await t.step("the SVID rotates and X509Source emits an update", async () => {
        const first = source!.getX509Svid().certificates[0] as X509Certificate;
        let updates = 0;
        const off = source!.onUpdate(() => updates++);
        try {
          // Listeners fire after the source's coalescing window (25 ms), so the new SVID can be
          // visible a moment before its update is emitted: wait for both.
          await waitFor(
            () =>
              (source!.getX509Svid().certificates[0] as X509Certificate).serialNumber !==
                first.serialNumber && updates >= 1,
            { timeoutMs: 45_000, intervalMs: 200, what: "a rotated SVID and its update event" },
          );
        } finally {
          off();
        }
        const next = source!.getX509Svid().certificates[0] as X509Certificate;
        assert.notEqual(next.serialNumber, first.serialNumber);
        assert.ok(new Date(next.validTo) > new Date(first.validTo));
        assert.ok(updates >= 1);
        assert.equal(source!.getX509Svid().id.toString(), workloadId);
      });
      source?.close();
      source = undefined;

      await t.step("kill -9 of spire-agent: restarted, without a token", async () => {
        // Once attested, the token is no longer needed: prove it by removing it.
        await Deno.remove(`${tmp}/join.token`);
        const oldPid = agent!.pid!;
        Deno.kill(oldPid, "SIGKILL");
        await waitFor(
          async () =>
            agent!.restarts >= 1 && agent!.pid !== undefined && agent!.pid !== oldPid &&
            await agent!.healthy(),
          { timeoutMs: 30_000, intervalMs: 100, what: "spire-agent to be restarted" },
        );
        pids.push(agent!.pid!);
        assert.equal(processStartTime(oldPid), undefined);
        assert.ok(events.some((e) => e.type === "exited" && e.pid === oldPid && e.code === 137));
        const restarts = events.filter((e) => e.type === "starting" && e.attempt > 0);
        assert.ok(restarts.length >= 1);
        assert.ok(restarts.every((e) => e.type === "starting" && !e.withToken));
      });

      await t.step("stop leaves no spire-agent process", async () => {
        const pid = agent!.pid!;
        await agent!.stop();
        assert.equal(processStartTime(pid), undefined);
        assert.equal(agent!.pid, undefined);
        await assert.rejects(grpcHealthCheck(socketPath, 500));
        assert.ok(events.some((e) => e.type === "stopped"));
      });
    } finally {
      source?.close();
      await agent?.stop().catch(() => {});
      await server?.stop().catch(() => {});
      for (const pid of pids) {
        assert.equal(processStartTime(pid), undefined, `process ${pid} survived the test`);
      }
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name: "real SPIRE: x509 mint and a failed agent start reported clearly",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const bins = await spireBinaries();
    const tmp = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-" });
    const io = bufferIo({ env: Deno.env.toObject(), runner: realRunner, cwd: tmp });
    const port = freePort();
    let server: SpireServerDaemon | undefined;
    try {
      let cli: SpireServerCli;
      ({ server, cli } = await startTmpSpireServer(io, bins, tmp, port, {
        dataDir: `${tmp}/srv`,
        defaultX509SvidTtl: "10m",
        pidFile: undefined,
      }));
      const minted = await cli.mintX509({
        spiffeId: `spiffe://${TD}/mqtt-broker`,
        dnsNames: ["localhost"],
        ttlSeconds: 300,
      });
      const cert = new X509Certificate(minted.certPem);
      assert.match(cert.subjectAltName ?? "", /URI:spiffe:\/\/k8s4r\.example\.org\/mqtt-broker/);
      assert.match(minted.keyPem, /PRIVATE KEY/);
      assert.ok(cert.verify(new X509Certificate(minted.bundlePem).publicKey));
      // The rendered config (for dataDir and TTL overrides) put the datastore in srv/.
      assert.ok(Deno.statSync(`${tmp}/srv/datastore.sqlite3`).isFile);

      // A bogus token: spire-agent retries forever, start() says why instead of timing out.
      await Deno.writeTextFile(`${tmp}/bundle.pem`, await cli.bundlePem());
      await Deno.writeTextFile(`${tmp}/bad.token`, "not-a-real-token", { mode: 0o600 });
      const agent = tmpSpireAgent(bins, tmp, {
        trustDomain: TD,
        serverPort: port,
        pidFile: undefined,
        joinTokenFile: `${tmp}/bad.token`,
        readyTimeoutMs: 30_000,
      });
      try {
        await assert.rejects(
          agent.start(),
          /could not attest to the SPIRE server: join token does not exist or has already been used/,
        );
      } finally {
        await agent.stop();
      }
      assert.equal(agent.pid, undefined);
    } finally {
      await server?.stop().catch(() => {});
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
    }
  },
});
