/**
 * Agent footprint: the real `k8s4r agent` of a `devenv start` stack (real SPIRE, real broker),
 * restarted here at idle (default 10 s heartbeats) and with `--heartbeat-seconds 1`, with the V8
 * flags devenv gives it (`src/agent/runtime_flags.ts`).
 *
 * Memory, side by side, from `/proc/PID/smaps_rollup` sampled every 500 ms over each phase:
 * - RSS: every resident page, the shared Deno executable included;
 * - PSS: shared pages split between the processes that map them (noisy on a shared machine:
 *   it falls when other Deno processes run);
 * - USS: private pages only (Private_Clean + Private_Dirty), what the agent alone costs;
 * - of which anonymous (heaps): USS without the executable's pages that no other process maps
 *   at that moment. Those count as private too, and vary by a few MB with what else runs (a test
 *   suite touching the same code makes them shared), so the anonymous part is the steadier one.
 * Each run is a fresh agent; a figure holds one value per run (the phase's peak). Runs
 * alternate between modes (and trees, below), so machine noise hits them alike.
 *
 * Before/after in one run: `K8S4R_BENCH_BASELINE=/path/to/other/checkout/main.ts` measures that
 * tree's agent too, interleaved with this one, against the same stack ("baseline" figures).
 *
 * Bytes per heartbeat: the payload size as the broker delivers it (`mosquitto_sub -F %l`), plus
 * what the agent's TCP connection to the broker really carried (`ss -tin` bytes_sent /
 * bytes_received: TLS records, MQTT framing, PUBACKs, pings). CPU from /proc/PID/stat.
 */
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";
import { encode, type HeartbeatMessage, PROTOCOL_VERSION } from "../src/mqtt/messages.ts";
import { upTopic } from "../src/fleet/topics.ts";
import { agentV8FlagsEnv } from "../src/agent/runtime_flags.ts";
import { realRunner } from "../src/process/mod.ts";
import {
  type AgentRuntime,
  type BenchOptions,
  BenchStack,
  Cleanup,
  cpuSeconds,
  MAIN_TS,
  restartAgent,
  spawnSubscriber,
  tcpBytes,
  thisTreeRuntime,
} from "./lib.ts";
import { type BenchResult, figure } from "./report.ts";
import { median, round } from "./stats.ts";

/** MB, from smaps_rollup. */
export interface MemSample {
  rss: number;
  pss: number;
  uss: number;
  /** Anonymous memory (heaps); USS minus this is private file-backed pages. */
  anon: number;
}

/** RSS, PSS, USS and anonymous memory of a process, or undefined when it is gone. */
export async function memSample(pid: number): Promise<MemSample | undefined> {
  try {
    const r = await Deno.readTextFile(`/proc/${pid}/smaps_rollup`);
    const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, "m").exec(r)?.[1] ?? NaN);
    return {
      rss: kb("Rss") / 1024,
      pss: kb("Pss") / 1024,
      uss: (kb("Private_Clean") + kb("Private_Dirty")) / 1024,
      anon: kb("Anonymous") / 1024,
    };
  } catch {
    return undefined;
  }
}

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

/**
 * The runtime flags of the tree whose entry point is `main`, from that tree's
 * src/agent/runtime_flags.ts, so that a baseline runs as its own devenv would run it (a tree
 * from before `agentRunArgs` has no `deno run` flags).
 */
async function treeRuntime(main: string): Promise<AgentRuntime> {
  const base = ["run", "-A", main];
  if (main === MAIN_TS) return thisTreeRuntime();
  const rf = await import(pathToFileURL(join(dirname(main), "src/agent/runtime_flags.ts")).href)
    .catch(() => ({})) as {
      agentRunArgs?: (a: string[]) => string[];
      agentV8FlagsEnv?: (e: string | undefined) => string;
    };
  return {
    runArgs: rf.agentRunArgs ? rf.agentRunArgs(base) : base,
    v8Flags: (rf.agentV8FlagsEnv ?? agentV8FlagsEnv)(Deno.env.get("DENO_V8_FLAGS")),
  };
}

/** Replaces robot-001's agent with this tree's or a baseline's (`restartAgent`). */
function startAgent(stack: BenchStack, rt: AgentRuntime, extra: string[]) {
  return restartAgent(stack, "robot-001", extra, rt);
}

interface Phase {
  /** Peak over the phase, per measure. */
  peak: MemSample;
  cpuPct: number;
  spireRss?: number;
}

/** Samples a running agent for `ms`: memory every 500 ms, CPU over the whole phase. */
async function samplePhase(pid: number, ms: number): Promise<Phase> {
  const spire = (await children(pid))[0];
  const c0 = await cpuSeconds(pid);
  const t0 = performance.now();
  const samples: MemSample[] = [];
  let spireRss: number | undefined;
  while (performance.now() - t0 < ms) {
    const s = await memSample(pid);
    if (s) samples.push(s);
    await new Promise((res) => setTimeout(res, 500));
  }
  if (spire) spireRss = (await memSample(spire))?.rss;
  const c1 = await cpuSeconds(pid);
  const secs = (performance.now() - t0) / 1000;
  if (!samples.length) throw new Error(`agent ${pid} exited during the phase`);
  const peak = (k: keyof MemSample) => Math.max(...samples.map((s) => s[k]));
  return {
    peak: { rss: peak("rss"), pss: peak("pss"), uss: peak("uss"), anon: peak("anon") },
    cpuPct: c0 !== undefined && c1 !== undefined ? ((c1 - c0) / secs) * 100 : 0,
    spireRss,
  };
}

const MODES = [
  { key: "idle", label: "idle (10 s heartbeats)", args: [] as string[] },
  { key: "hb", label: "1 heartbeat/s", args: ["--heartbeat-seconds", "1"] },
];

/** The targets of issue 15 (with the V8 flags): RSS ≤ 64 MB, USS ≤ 25 MB, on every run. */
const TARGET_RSS_MB = 64;
const TARGET_USS_MB = 25;

export async function benchFootprint(opts: BenchOptions, result: BenchResult): Promise<void> {
  const phaseMs = opts.quick ? 6_000 : 12_000;
  const settleMs = 3_000;
  const runs = opts.quick ? 2 : 3;
  const baseline = Deno.env.get("K8S4R_BENCH_BASELINE");
  const trees = [{ name: "", main: MAIN_TS, rt: await treeRuntime(MAIN_TS) }];
  if (baseline) trees.push({ name: "baseline", main: baseline, rt: await treeRuntime(baseline) });
  const cleanup = new Cleanup();
  try {
    const stack = await BenchStack.create("k8s4r-bp-");
    cleanup.add("stack", () => stack.destroy());
    const st = await stack.start(["--timeout", "120"]);
    if (st.code !== 0) {
      throw new Error(`devenv start exited ${st.code}: ${st.stderr.trim().split("\n").pop()}`);
    }
    // One unmeasured start per tree, so each measured run finds Deno's caches warm.
    for (const t of trees) await startAgent(stack, t.rt, []);

    const phases = new Map<string, Phase[]>(); // `${tree}/${mode}`
    let wire:
      | { up: number; down: number; hbCount: number; secs: number; port?: number }
      | undefined;
    let sizes: number[] = [];
    const sub = await spawnSubscriber(stack, cleanup, upTopic("robot-001", "heartbeat"), "%l");
    for (let run = 0; run < runs; run++) {
      for (const t of trees) {
        for (const mode of MODES) {
          opts.log(`footprint: run ${run + 1}/${runs} ${t.name || "this tree"} ${mode.key}`);
          const { daemon } = await startAgent(stack, t.rt, mode.args);
          await new Promise((res) => setTimeout(res, settleMs));
          const measureWire = run === 0 && t.name === "" && mode.key === "hb";
          const port = measureWire
            ? await agentLocalPort(daemon.pid, stack.layout.ports.mqttTls)
            : undefined;
          const b0 = port ? await tcpBytes(port) : undefined;
          const lines0 = measureWire ? (await readLines(sub.out)).length : 0;
          const t0 = performance.now();
          const phase = await samplePhase(daemon.pid, phaseMs);
          if (measureWire) {
            const b1 = port ? await tcpBytes(port) : undefined;
            const lines = await readLines(sub.out);
            const hbCount = lines.length - lines0;
            sizes = lines.slice(lines0).map(Number).filter((n) => Number.isFinite(n) && n > 0);
            const secs = (performance.now() - t0) / 1000;
            if (b0 && b1 && hbCount > 0) {
              wire = {
                up: (b1.sent - b0.sent) / hbCount,
                down: (b1.received - b0.received) / hbCount,
                hbCount,
                secs,
                port,
              };
            } else wire = { up: NaN, down: NaN, hbCount, secs, port };
          }
          const key = `${t.name}/${mode.key}`;
          phases.set(key, [...(phases.get(key) ?? []), phase]);
        }
      }
    }

    for (const t of trees) {
      const pre = t.name ? `footprint.${t.name}.` : "footprint.";
      const who = t.name ? `${t.name} agent` : "agent";
      for (const mode of MODES) {
        const ps = phases.get(`${t.name}/${mode.key}`) ?? [];
        const mine = t.name === "";
        result.figures.push(
          figure(
            `${pre}${mode.key}.rss`,
            `${who} RSS, ${mode.label}`,
            "MB",
            ps.map((p) => p.peak.rss),
            {
              target: mine ? { op: "<=", value: TARGET_RSS_MB, on: "max" } : undefined,
            },
          ),
          figure(
            `${pre}${mode.key}.pss`,
            `${who} PSS, ${mode.label}`,
            "MB",
            ps.map((p) => p.peak.pss),
          ),
          figure(
            `${pre}${mode.key}.uss`,
            `${who} USS (private), ${mode.label}`,
            "MB",
            ps.map((p) => p.peak.uss),
            {
              target: mine ? { op: "<=", value: TARGET_USS_MB, on: "max" } : undefined,
            },
          ),
          figure(
            `${pre}${mode.key}.anon`,
            `${who} USS: anonymous (heaps), ${mode.label}`,
            "MB",
            ps.map((p) => p.peak.anon),
          ),
        );
        if (mine) {
          result.figures.push(
            figure(
              `${pre}${mode.key}.cpu`,
              `${who} CPU, ${mode.label}`,
              "%",
              ps.map((p) => p.cpuPct),
            ),
          );
        }
      }
    }
    const spire = [...phases.values()].flat().map((p) => p.spireRss).filter((v): v is number =>
      v !== undefined
    );
    if (spire.length) {
      result.figures.push(
        figure("footprint.spire.rss", "its spire-agent RSS (separate process)", "MB", spire),
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
    const payload = Math.round(sizes.length ? median(sizes) : encode(sample).length);
    // MQTT 5 PUBLISH QoS 1: fixed header 1 + remaining length 2 (>127) + topic 2+len + packet
    // id 2 + property length 1; PUBACK 4 bytes. TLS 1.3 AES-GCM record: 5 + 1 + 16 = 22 bytes.
    const mqttUp = payload + 1 + 2 + 2 + topicLen + 2 + 1;
    const computedUp = mqttUp + 22;
    const computedDown = 4 + 22;
    if (wire && Number.isFinite(wire.up)) {
      result.figures.push(
        figure(
          "footprint.hb.wire_up",
          "TCP payload bytes per heartbeat, robot → broker (ss)",
          "B",
          [wire.up],
        ),
        figure(
          "footprint.hb.wire_down",
          "TCP payload bytes per heartbeat, broker → robot (ss)",
          "B",
          [wire.down],
        ),
      );
    }
    result.notes.push(
      `Memory: ${runs} fresh agents per mode${
        baseline ? ` and per tree (baseline: ${baseline})` : ""
      }, each sampled every 500 ms for ${phaseMs / 1000} s after a ${
        settleMs / 1000
      } s settle; each value is one run's peak. ${
        trees.map((t) =>
          `${t.name || "This tree"}: \`deno ${
            t.rt.runArgs.slice(0, -1).join(" ")
          }\`, DENO_V8_FLAGS=${t.rt.v8Flags}`
        ).join("; ")
      }.`,
      `Heartbeat: ${
        round(payload)
      } B of JSON; computed MQTT 5 PUBLISH ${mqttUp} B, in one TLS 1.3 record ` +
        `${computedUp} B up and ${computedDown} B (PUBACK) down, plus TCP/IP headers (2 × 52 B on loopback). ` +
        `${wire?.hbCount ?? 0} heartbeats in ${
          round(wire?.secs ?? 0)
        } s measured on the wire (local port ${wire?.port ?? "not found"}).`,
      `The agent's spire-agent is a separate process (RSS ${
        round(median(spire.length ? spire : [0]))
      } MB); the targets apply to the k8s4r agent process.`,
    );
    result.details = { phases: Object.fromEntries(phases), wire };
  } finally {
    await cleanup.run(opts.log);
  }
}

async function readLines(file: string): Promise<string[]> {
  return (await Deno.readTextFile(file).catch(() => "")).split("\n").filter(Boolean);
}
