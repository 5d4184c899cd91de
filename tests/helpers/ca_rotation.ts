/**
 * The frame the two CA rotation tests share (tests/ca_rotation_test.ts and its control's
 * counterpart tests/ca_upstream_rotation_test.ts): a real stack started with a short CA TTL and
 * SVID TTL, a timestamped log of what was seen (printed as it happens, quoted in failures), the
 * state before the rotation, and the teardown that keeps the first failure the story.
 */
import assert from "node:assert/strict";
import { isRecordAlive, type PidRecord, readPidFile } from "../../src/process/mod.ts";
import { E2eStack, ROBOTS } from "../e2e/stack.ts";

export interface RotationRun {
  stack: E2eStack;
  /** Logs `s` with the time and keeps it for the failure message (`seen`). */
  note(s: string): void;
  seen: string[];
}

/**
 * Runs `fn` on a new stack (1 s heartbeats). A failure is recorded as `failureName` (its logs
 * kept); the teardown stops everything by pid files and asserts nothing of ours survives. On
 * failure a teardown error is printed, not thrown: the first failure is the story.
 */
export async function withRotationStack(
  failureName: string,
  fn: (run: RotationRun) => Promise<void>,
): Promise<void> {
  const stack = await E2eStack.create({ heartbeatSeconds: 1 });
  const seen: string[] = [];
  const note = (s: string) => {
    const line = `${new Date().toISOString()} ${s}`;
    seen.push(line);
    console.log(`  ${line}`);
  };
  let failed = false;
  try {
    await fn({ stack, note, seen });
  } catch (err) {
    failed = true;
    throw err;
  } finally {
    if (failed) stack.failures.push(failureName);
    await stack.teardown().catch((err) => {
      if (!failed) throw err;
      console.log(`teardown after the failure: ${(err as Error).message}`);
    });
  }
}

/**
 * `devenv start --robots <all> --broker native --ca-ttl <caTtl> --svid-ttl <svidTtl> ...extra`,
 * asserted to succeed. Returns its stdout, when it was done (`t0`), and the config SPIRE runs
 * with (which must carry the CA TTL: asserted here).
 */
export async function startRotatingStack(
  stack: E2eStack,
  o: { caTtl: number; svidTtl: number; extra?: string[] },
): Promise<{ stdout: string; t0: number; conf: string }> {
  const start = await stack.devenv(
    "start",
    "--robots",
    String(ROBOTS.length),
    "--broker",
    "native",
    "--ca-ttl",
    String(o.caTtl),
    "--svid-ttl",
    String(o.svidTtl),
    ...(o.extra ?? []),
  );
  stack.remember();
  assert.equal(start.code, 0, `devenv start failed:\n${start.stdout}\n${start.stderr}`);
  stack.started = true;
  const t0 = Date.now();
  const conf = await Deno.readTextFile(
    `${stack.layout.spireServerDataDir}/server.generated.conf`,
  );
  assert.match(conf, new RegExp(`ca_ttl = "${o.caTtl}s"`), conf);
  return { stdout: start.stdout, t0, conf };
}

/** Before the rotation: Mosquitto's pid record (asserted alive), each robot's heartbeat count. */
export async function rotationBaseline(
  stack: E2eStack,
): Promise<{ mosquitto: PidRecord; heartbeats: Map<string, number> }> {
  const mosquitto = readPidFile(stack.files.mosquittoPid);
  assert.ok(mosquitto && isRecordAlive(mosquitto), "mosquitto is not running");
  const heartbeats = new Map<string, number>();
  for (const id of ROBOTS) heartbeats.set(id, (await stack.robot(id)).heartbeats.received);
  return { mosquitto, heartbeats };
}
