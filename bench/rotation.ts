/**
 * Rotation: a real agent whose entry has a short X.509 SVID TTL (`devenv start --svid-ttl`), with
 * heartbeats every second, through `rotations` SVID rotations. Each rotation makes the agent
 * replace its MQTT connection (the broker checks the certificate only at the handshake).
 *
 * - Messages lost: heartbeat sequence numbers missing at a bare `mosquitto_sub` (QoS 1) on the
 *   robot's heartbeat topic, between the first and the last one it received (target 0).
 * - Reconnect gap: from the agent's `mqtt.rotating_connection` to its next `mqtt.connected`
 *   (timestamps of its own log, ms resolution).
 */
import { upTopic } from "../src/fleet/topics.ts";
import { waitFor } from "../src/process/mod.ts";
import { type BenchOptions, BenchStack, Cleanup, restartAgent, spawnSubscriber } from "./lib.ts";
import { type BenchResult, figure } from "./report.ts";

interface LogEvent {
  t: number;
  event: string;
}

function parseAgentLog(text: string): LogEvent[] {
  const out: LogEvent[] = [];
  for (const line of text.split("\n")) {
    const m = /^(\d{4}-\d\d-\d\dT[\d:.]+Z) agent\[[^\]]+\] (\S+)/.exec(line);
    if (m) out.push({ t: Date.parse(m[1]), event: m[2] });
  }
  return out;
}

export async function benchRotation(opts: BenchOptions, result: BenchResult): Promise<void> {
  const rotations = opts.quick ? 3 : 10;
  const ttl = 20;
  const cleanup = new Cleanup();
  try {
    const stack = await BenchStack.create("k8s4r-br-");
    cleanup.add("stack", () => stack.destroy());
    const st = await stack.start(["--timeout", "120", "--svid-ttl", String(ttl)]);
    if (st.code !== 0) {
      throw new Error(`devenv start exited ${st.code}: ${st.stderr.trim().split("\n").pop()}`);
    }
    const sub = await spawnSubscriber(stack, cleanup, upTopic("robot-001", "heartbeat"), "%p");
    const { logFile } = await restartAgent(stack, "robot-001", ["--heartbeat-seconds", "1"]);
    const count = async () =>
      parseAgentLog(await Deno.readTextFile(logFile)).filter((e) =>
        e.event === "mqtt.rotating_connection"
      ).length;
    opts.log(`rotation: waiting for ${rotations} rotations (SVID TTL ${ttl} s)`);
    await waitFor(async () => {
      const ev = parseAgentLog(await Deno.readTextFile(logFile));
      const rot = ev.filter((e) => e.event === "mqtt.rotating_connection");
      const last = rot[rotations - 1];
      return last !== undefined && ev.some((e) => e.event === "mqtt.connected" && e.t >= last.t);
    }, {
      timeoutMs: (rotations + 2) * ttl * 1000,
      intervalMs: 500,
      what: `${rotations} rotations (have ${await count()})`,
    });
    // A few more heartbeats so that the last rotation's held messages are visibly delivered.
    await new Promise((r) => setTimeout(r, 3000));
    const events = parseAgentLog(await Deno.readTextFile(logFile));
    const gaps: number[] = [];
    let pending: number | undefined;
    let updates = 0;
    for (const e of events) {
      if (e.event === "svid.updated") updates++;
      if (e.event === "mqtt.rotating_connection") pending = e.t;
      if (e.event === "mqtt.connected" && pending !== undefined) {
        gaps.push(e.t - pending);
        pending = undefined;
      }
    }
    const seqs: number[] = [];
    for (const line of (await Deno.readTextFile(sub.out)).split("\n")) {
      try {
        const m = JSON.parse(line);
        if (typeof m?.seq === "number") seqs.push(m.seq);
      } catch { /* not a message line */ }
    }
    const unique = new Set(seqs);
    const min = Math.min(...seqs);
    const max = Math.max(...seqs);
    const lost = seqs.length ? max - min + 1 - unique.size : NaN;
    const dups = seqs.length - unique.size;
    result.figures.push(
      figure("rotation.lost", `heartbeats lost over ${gaps.length} rotations`, "msgs", [lost], {
        target: { op: "<=", value: 0, on: "median" },
      }),
    );
    if (gaps.length) {
      result.figures.push(
        figure("rotation.gap", "reconnect gap per rotation (rotating → connected)", "ms", gaps, {
          runs: 1,
        }),
      );
    }
    result.notes.push(
      `${gaps.length} rotations (${updates} SVID updates seen by the agent, SVID TTL ${ttl} s, 1 heartbeat/s); ` +
        `mosquitto_sub got ${seqs.length} heartbeats (seq ${min}..${max}), ${lost} missing, ${dups} duplicates ` +
        "(QoS 1 allows duplicates; held messages are re-sent after the reconnect).",
    );
    result.details = { gaps, seqsReceived: seqs.length, min, max, lost, dups, updates };
  } finally {
    await cleanup.run(opts.log);
  }
}
