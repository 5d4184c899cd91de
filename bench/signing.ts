/**
 * Signing: the cost of one sign (fleet server: `TaskSigner.sign`, JWS ES256 over the encoded
 * task) and one verify (robot: `checkDown`, the whole decision: JWS structure, chain against the
 * bundle, signer, kind, robot, expiry, window), in-process, in the same run as today's unsigned
 * path (`decodeDown` of the plain task). The chain is an SVID issued by an intermediate CA under
 * the root in the bundle, like SPIRE's when it has an upstream authority; verify is measured
 * with the chain cache the agent keeps (`X5cChainCache`, the normal case: one fleet-server SVID
 * for hours) and without (every message a new chain: after a rotation, or a flood of chains).
 *
 * Each run times `ops` operations back to back; the figure is µs per operation over `runs` runs.
 */
import { X509Bundle, X509BundleSet } from "../src/spiffe/bundle.ts";
import { StaticX509Source } from "../src/spiffe/source.ts";
import { parseX509SvidPem } from "../src/spiffe/svid.ts";
import { TestCa } from "../src/spiffe/testing/test_ca.ts";
import { downTopic } from "../src/fleet/topics.ts";
import { fleetServerSpiffeId } from "../src/fleet/ids.ts";
import { decodeDown, encode, PROTOCOL_VERSION, type TaskMessage } from "../src/mqtt/messages.ts";
import { checkDown, TaskSigner, X5cChainCache } from "../src/mqtt/signed.ts";
import type { BenchOptions } from "./lib.ts";
import { type BenchResult, figure } from "./report.ts";

const TD = "k8s4r.example.org";
const ROBOT = "robot-001";

function task(i: number): TaskMessage {
  const now = new Date();
  return {
    v: PROTOCOL_VERSION,
    type: "task",
    robotId: ROBOT,
    ts: now.toISOString(),
    id: crypto.randomUUID(),
    command: ["uname", "-a", String(i)],
    env: { LANG: "C" },
    timeoutSeconds: 30,
    createdAt: now.toISOString(),
    expiresAt: new Date(now.getTime() + 3600_000).toISOString(),
  };
}

function perOpUs(ops: number, fn: (i: number) => void): number {
  const t0 = performance.now();
  for (let i = 0; i < ops; i++) fn(i);
  return ((performance.now() - t0) * 1000) / ops;
}

export function benchSigning(opts: BenchOptions, result: BenchResult): Promise<void> {
  const runs = opts.quick ? 3 : 7;
  const ops = opts.quick ? 200 : 500;
  const root = TestCa.create({ trustDomain: TD });
  const ca = root.intermediate();
  const issued = ca.issue({ spiffeId: fleetServerSpiffeId(TD) });
  const bundles = new X509BundleSet([X509Bundle.fromPem(TD, root.rootPem)]);
  const signer = new TaskSigner(
    new StaticX509Source(parseX509SvidPem(issued.chainPem, issued.keyPem), bundles),
  );
  const topic = downTopic(ROBOT, "task");
  const tasks = Array.from({ length: ops }, (_, i) => task(i));
  const plain = tasks.map((t) => encode(t));
  const signed = tasks.map((t) => signer.sign(t));
  const check = (p: Uint8Array, cache?: X5cChainCache) => {
    const v = checkDown(topic, p, {
      robotId: ROBOT,
      bundles,
      signerId: fleetServerSpiffeId(TD),
      cache,
    });
    if (!v.ok) throw new Error(`verify failed: ${v.error}`);
  };
  const s: Record<string, number[]> = { sign: [], cached: [], cold: [], unsigned: [] };
  const cache = new X5cChainCache();
  for (let r = 0; r < runs; r++) {
    s.sign.push(perOpUs(ops, (i) => signer.sign(tasks[i])));
    s.cached.push(perOpUs(ops, (i) => check(signed[i], cache)));
    s.cold.push(perOpUs(ops, (i) => check(signed[i])));
    s.unsigned.push(perOpUs(ops, (i) => {
      const d = decodeDown(topic, plain[i]);
      if (!d.ok) throw new Error(d.error);
    }));
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  result.figures.push(
    figure("signing.sign", "sign one task (TaskSigner, ES256 JWS)", "µs", s.sign),
    figure(
      "signing.verify",
      "verify one task (checkDown, chain cached)",
      "µs",
      s.cached,
    ),
    figure(
      "signing.verify_cold",
      "verify one task (checkDown, chain verified afresh)",
      "µs",
      s.cold,
    ),
    figure("signing.unsigned", "today's unsigned path (decodeDown)", "µs", s.unsigned),
  );
  const sizes = `payload ${plain[0].byteLength} B unsigned, ${signed[0].byteLength} B signed`;
  result.notes.push(
    `${ops} operations per run. Throughput at the medians: sign ${
      Math.round(1e6 / median(s.sign))
    } ops/s, verify ${Math.round(1e6 / median(s.cached))} ops/s (${
      Math.round(1e6 / median(s.cold))
    } ops/s without the chain cache), unsigned decode ${
      Math.round(1e6 / median(s.unsigned))
    } ops/s. ${sizes} (chain: leaf + intermediate).`,
  );
  result.details = {
    ops,
    runs,
    us: s,
    bytes: { unsigned: plain[0].byteLength, signed: signed[0].byteLength },
  };
  return Promise.resolve();
}
