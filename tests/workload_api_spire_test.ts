/**
 * The Workload API client (src/spiffe/workload: gRPC over node:http2, the hand-written codec)
 * against a real spire-agent v1.13.3: all five RPCs, streaming, PermissionDenied "no identity
 * issued" for a caller no entry matches, and InvalidArgument "security header missing from
 * request" for a call without the `workload.spiffe.io` metadata (with its positive control).
 * The unit tests use a grpc-js fake; this is the check that the real agent agrees.
 */
import assert from "node:assert/strict";
import { freePort } from "./helpers/ports.ts";
import {
  bootstrapFiles,
  spireBinaries,
  startTmpSpireServer,
  tmpSpireAgent,
} from "./helpers/spire.ts";
import { bufferIo } from "../src/cli/io.ts";
import { processStartTime, realRunner } from "../src/process/mod.ts";
import { WorkloadApiClient, WorkloadApiError, X509Source } from "../src/spiffe/mod.ts";
import { GrpcChannel, GrpcError, GrpcStatus } from "../src/spiffe/workload/grpc.ts";
import { encodeJwtSvidRequest } from "../src/spiffe/workload/proto.ts";
import { SECURITY_HEADER } from "../src/spiffe/workload/client.ts";
import { SpireAgentSupervisor } from "../src/spire/agent.ts";
import { SpireServerCli, startSpireServer } from "../src/spire/server.ts";

const TD = "k8s4r.example.org";

async function rejectsKind(p: Promise<unknown>, kind: string, message: RegExp): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof WorkloadApiError, String(err));
    assert.equal(err.kind, kind, err.message);
    assert.match(err.message, message);
    return true;
  });
}

Deno.test({
  name: "real SPIRE: the Workload API client's five RPCs, no identity, missing header",
  // The SPIRE processes outlive awaited calls; every one is stopped and checked in `finally`.
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    const bins = await spireBinaries();
    const tmp = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-" });
    const io = bufferIo({ env: Deno.env.toObject(), runner: realRunner, cwd: tmp });
    const port = freePort();
    const nodeId = `spiffe://${TD}/k8s4r/node/wl-test`;
    const workloadId = `spiffe://${TD}/robot/wl-test`;
    const socketPath = `${tmp}/a/agent.sock`;
    const address = `unix://${socketPath}`;
    let server: Awaited<ReturnType<typeof startSpireServer>> | undefined;
    let agent: SpireAgentSupervisor | undefined;
    let client: WorkloadApiClient | undefined;
    let source: X509Source | undefined;
    const pids: number[] = [];
    try {
      let cli: SpireServerCli;
      ({ server, cli } = await startTmpSpireServer(io, bins, tmp, port));
      pids.push(server.pid);
      await bootstrapFiles(cli, tmp, nodeId);
      // An entry under this node that does not match this process (another uid).
      await cli.reconcileEntry({
        spiffeId: `spiffe://${TD}/robot/someone-else`,
        parentId: nodeId,
        selectors: [`unix:uid:${(Deno.uid() ?? 0) + 4242}`],
        dnsNames: ["someone-else"],
      });
      agent = tmpSpireAgent(bins, tmp, { trustDomain: TD, serverPort: port });
      await agent.start();
      pids.push(agent.pid!);
      client = new WorkloadApiClient({ address });

      await t.step("no matching entry: PermissionDenied 'no identity issued'", async () => {
        await rejectsKind(
          client!.fetchX509Context({ timeoutMs: 10_000 }),
          "no-identity",
          /PermissionDenied: no identity issued/,
        );
        await rejectsKind(
          client!.fetchJwtSvid({ audience: "k8s4r-test" }, { timeoutMs: 10_000 }),
          "no-identity",
          /no identity issued/,
        );
      });

      await t.step("a call without the security header is InvalidArgument", async () => {
        const channel = new GrpcChannel({ kind: "unix", path: socketPath });
        const req = encodeJwtSvidRequest({ audience: ["k8s4r-test"], spiffeId: "" });
        try {
          await assert.rejects(
            channel.unary("/SpiffeWorkloadAPI/FetchJWTSVID", req, {}, { timeoutMs: 10_000 }),
            (e: unknown) =>
              e instanceof GrpcError && e.code === GrpcStatus.INVALID_ARGUMENT &&
              e.details === "security header missing from request",
          );
          // Positive control: the same call with the header gets past that check.
          await assert.rejects(
            channel.unary("/SpiffeWorkloadAPI/FetchJWTSVID", req, { [SECURITY_HEADER]: "true" }, {
              timeoutMs: 10_000,
            }),
            (e: unknown) => e instanceof GrpcError && e.code === GrpcStatus.PERMISSION_DENIED,
          );
        } finally {
          channel.close();
        }
      });

      await cli.reconcileEntry({
        spiffeId: workloadId,
        parentId: nodeId,
        selectors: [`unix:uid:${Deno.uid()}`],
        dnsNames: ["wl-test"],
      });

      await t.step("FetchX509SVID streams the SVID once the entry exists", async () => {
        // The agent sees the new entry after the server's cache reload and its own sync.
        source = await X509Source.create({ address, spiffeId: workloadId, timeoutMs: 45_000 });
        assert.equal(source.getX509Svid().id.toString(), workloadId);
        const ctx = await client!.fetchX509Context({ timeoutMs: 10_000 });
        assert.deepEqual(ctx.svids.map((s) => s.id.toString()), [workloadId]);
        assert.ok(ctx.bundles.has(TD));
        assert.equal(ctx.bundles.get(TD)!.toPem().trim(), (await cli.bundlePem()).trim());
      });

      await t.step(
        "FetchX509Bundles and FetchJWTBundles stream the trust domain's bundles",
        async () => {
          const x = await client!.fetchX509Bundles({ timeoutMs: 10_000 });
          assert.ok(x.has(TD));
          const jwt = await client!.fetchJwtBundles({ timeoutMs: 10_000 });
          const keys = jwt.get(TD)?.jwks.keys;
          assert.ok(Array.isArray(keys) && keys.length >= 1, JSON.stringify(jwt.get(TD)?.jwks));
          // A watch delivers its first message and ends cleanly on abort.
          const ac = new AbortController();
          let seen = 0;
          await client!.watchJwtBundles({
            onUpdate: () => {
              seen++;
              ac.abort();
            },
          }, { signal: ac.signal });
          assert.equal(seen, 1);
        },
      );

      await t.step("FetchJWTSVID and ValidateJWTSVID", async () => {
        const svid = await client!.fetchJwtSvid({ audience: "k8s4r-test" }, { timeoutMs: 10_000 });
        assert.equal(svid.id.toString(), workloadId);
        assert.deepEqual(svid.audience, ["k8s4r-test"]);
        assert.ok(svid.expiry.getTime() > Date.now());
        const v = await client!.validateJwtSvid(svid.token, "k8s4r-test", { timeoutMs: 10_000 });
        assert.equal(v.id.toString(), workloadId);
        assert.equal(v.claims.sub, workloadId);
        assert.deepEqual(v.claims.aud, ["k8s4r-test"]);
        await rejectsKind(
          client!.validateJwtSvid(svid.token, "another-audience", { timeoutMs: 10_000 }),
          "invalid-argument",
          /InvalidArgument/,
        );
      });
    } finally {
      await source?.close();
      client?.close();
      await agent?.stop().catch(() => {});
      await server?.stop().catch(() => {});
      for (const pid of pids) {
        assert.equal(processStartTime(pid), undefined, `process ${pid} survived the test`);
      }
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
    }
  },
});
