/**
 * Agent footprint: the real `k8s4r agent` (started by `devenv start`) at idle (default 10 s
 * heartbeats) and with `--heartbeat-seconds 1`: RSS and CPU from /proc, its own process and its
 * supervised spire-agent apart. Bytes per heartbeat: the payload size as the broker delivers it
 * (`mosquitto_sub -F %l`), plus what the agent's TCP connection to the broker really carried
 * (`ss -tin` bytes_sent / bytes_received: TLS records, MQTT framing, PUBACKs, pings).
 */
import { encode, type HeartbeatMessage, PROTOCOL_VERSION } from "../src/mqtt/messages.ts";
import { upTopic } from "../src/fleet/topics.ts";
import { robotLayout } from "../src/devenv/layout.ts";
import { readPidFile, realRunner } from "../src/process/mod.ts";
import {
  type BenchOptions,
  BenchStack,
  Cleanup,
  memBreakdown,
  ProcSampler,
  restartAgent,
  spawnSubscriber,
  tcpBytes,
} from "./lib.ts";
import { type BenchResult, figure } from "./report.ts";
import { median, round } from "./stats.ts";

/** Child pids of a process (e.g. the agent's spire-agent). */
async function children(pid: number): Promise<number[]> {
  try {
    const txt = await Deno.readTextFile(`/proc/${pid}/task/${pid}/children`);
    return txt.trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/** The local port of the agent's connection to the broker's mTLS port. */
async function agentLocalPort(agentPid: number, brokerPort: number): Promise<number | undefined> {
  const r = await realRunner.output("ss", [
    "-tnpH",
    "state",
    "established",
    `dport = :${brokerPort}`,
  ], { check: false, timeoutMs: 5000 });
  for (const line of r.stdout.split("\n")) {
    if (!line.includes(`pid=${agentPid},`)) continue;
    const m = /127\.0\.0\.1:(\d+)\s+127\.0\.0\.1:\d+/.exec(line) ??
      /\S+:(\d+)\s+\S+:\d+/.exec(line);
    if (m) return Number(m[1]);
  }
  return undefined;
}

export async function benchFootprint(opts: BenchOptions, result: BenchResult): Promise<void> {
  const phaseMs = opts.quick ? 6_000 : 15_000;
  const cleanup = new Cleanup();
  try {
    const stack = await BenchStack.create("k8s4r-bp-");
    cleanup.add("stack", () => stack.destroy());
    const st = await stack.start(["--timeout", "120"]);
    if (st.code !== 0) {
      throw new Error(`devenv start exited ${st.code}: ${st.stderr.trim().split("\n").pop()}`);
    }
    const r = robotLayout(stack.layout, "robot-001", stack.env);
    const agentPid = readPidFile(r.pidFile)?.pid;
    if (!agentPid) throw new Error("agent pid file missing");
    const spirePid = (await children(agentPid))[0];
    await new Promise((res) => setTimeout(res, 2000)); // settle after start
    const idle = new ProcSampler(
      spirePid ? { agent: agentPid, spireAgent: spirePid } : { agent: agentPid },
    );
    await idle.start();
    await new Promise((res) => setTimeout(res, phaseMs));
    const idleP = await idle.stop();
    const idleMem = await memBreakdown(agentPid);

    // Heartbeats every second: a new agent with --heartbeat-seconds 1 (its spire-agent has
    // attested already, so no token is needed).
    const { daemon } = await restartAgent(stack, "robot-001", ["--heartbeat-seconds", "1"]);
    const hbPid = daemon.pid;
    const hbSpire = (await children(hbPid))[0];
    const sub = await spawnSubscriber(stack, cleanup, upTopic("robot-001", "heartbeat"), "%l");
    await new Promise((res) => setTimeout(res, 2000));
    const port = await agentLocalPort(hbPid, stack.layout.ports.mqttTls);
    const b0 = port ? await tcpBytes(port) : undefined;
    const lines0 = (await Deno.readTextFile(sub.out).catch(() => "")).split("\n").filter(Boolean)
      .length;
    const busy = new ProcSampler(
      hbSpire ? { agent: hbPid, spireAgent: hbSpire } : { agent: hbPid },
    );
    await busy.start();
    const t0 = performance.now();
    await new Promise((res) => setTimeout(res, phaseMs));
    const busyP = await busy.stop();
    const busyMem = await memBreakdown(hbPid);
    const b1 = port ? await tcpBytes(port) : undefined;
    const secs = (performance.now() - t0) / 1000;
    const lines = (await Deno.readTextFile(sub.out).catch(() => "")).split("\n").filter(Boolean);
    const sizes = lines.map(Number).filter((n) => Number.isFinite(n) && n > 0);
    const hbCount = lines.length - lines0;

    result.figures.push(
      figure("footprint.idle.rss", "agent RSS, idle (10 s heartbeats)", "MB", idleP.agent.rssMb, {
        runs: 1,
        target: { op: "<=", value: 80, on: "max" },
      }),
      figure("footprint.idle.cpu", "agent CPU, idle", "%", [idleP.agent.cpuPct]),
      figure("footprint.hb.rss", "agent RSS, 1 heartbeat/s", "MB", busyP.agent.rssMb, {
        runs: 1,
        target: { op: "<=", value: 80, on: "max" },
      }),
      figure("footprint.hb.cpu", "agent CPU, 1 heartbeat/s", "%", [busyP.agent.cpuPct]),
    );
    const mems = [idleMem, busyMem].filter((m) => m !== undefined);
    if (mems.length) {
      result.figures.push(
        figure(
          "footprint.anon",
          "agent private memory (RssAnon), idle and 1 hb/s",
          "MB",
          mems.map((m) => m.anon),
          { runs: 1 },
        ),
        figure(
          "footprint.file",
          "agent file-backed RSS (the shared deno executable)",
          "MB",
          mems.map((m) => m.file),
          { runs: 1 },
        ),
      );
      const pss = mems.map((m) => m.pss).filter((v): v is number =>
        v !== undefined && !Number.isNaN(v)
      );
      if (pss.length) {
        result.figures.push(
          figure(
            "footprint.pss",
            "agent PSS (shared pages split between deno processes)",
            "MB",
            pss,
            { runs: 1 },
          ),
        );
      }
    }
    if (idleP.spireAgent) {
      result.figures.push(
        figure("footprint.spire.rss", "its spire-agent RSS (separate process)", "MB", [
          ...idleP.spireAgent.rssMb,
          ...(busyP.spireAgent?.rssMb ?? []),
        ], { runs: 2 }),
      );
    }
    if (sizes.length) {
      result.figures.push(
        figure("footprint.hb.payload", "heartbeat payload (JSON)", "B", sizes, { runs: 1 }),
      );
    }
    const sample: HeartbeatMessage = {
      v: PROTOCOL_VERSION,
      type: "heartbeat",
      robotId: "robot-001",
      ts: new Date().toISOString(),
      seq: 123,
      svidExpiresAt: new Date().toISOString(),
      load: [0.12, 0.34, 0.56],
    };
    const topicLen = upTopic("robot-001", "heartbeat").length;
    const payload = sizes.length ? median(sizes) : encode(sample).length;
    // MQTT 5 PUBLISH QoS 1: fixed header 1 + remaining length 2 (>127) + topic 2+len + packet
    // id 2 + property length 1; PUBACK 4 bytes. TLS 1.3 AES-GCM record: 5 + 1 + 16 = 22 bytes.
    const mqttUp = payload + 1 + 2 + 2 + topicLen + 2 + 1;
    const computedUp = mqttUp + 22;
    const computedDown = 4 + 22;
    if (b0 && b1 && hbCount > 0) {
      const up = (b1.sent - b0.sent) / hbCount;
      const down = (b1.received - b0.received) / hbCount;
      result.figures.push(
        figure(
          "footprint.hb.wire_up",
          "TCP payload bytes per heartbeat, robot → broker (ss)",
          "B",
          [up],
        ),
        figure(
          "footprint.hb.wire_down",
          "TCP payload bytes per heartbeat, broker → robot (ss)",
          "B",
          [down],
        ),
      );
    }
    result.notes.push(
      `Heartbeat: ${
        round(payload)
      } B of JSON; computed MQTT 5 PUBLISH ${mqttUp} B, in one TLS 1.3 record ` +
        `${computedUp} B up and ${computedDown} B (PUBACK) down, plus TCP/IP headers (2 × 52 B on loopback). ` +
        `${hbCount} heartbeats in ${round(secs)} s measured on the wire (local port ${
          port ?? "not found"
        }).`,
      `The agent's spire-agent is a separate process (RSS ${
        round(median(idleP.spireAgent?.rssMb ?? [0]))
      } MB); the 80 MB target applies to the k8s4r agent process.`,
    );
    result.details = {
      idleMem,
      busyMem,
      idle: idleP,
      heartbeat: busyP,
      bytes: { b0, b1, hbCount, secs },
    };
  } finally {
    await cleanup.run(opts.log);
  }
}
