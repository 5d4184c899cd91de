/**
 * Fleet load: N simulated robots (default 1000), each with its own SVID from the real SPIRE,
 * connected over mTLS through the real ACL to the real Mosquitto of a `devenv start` stack, with
 * the real k8s4r server subscribed on the loopback listener. Phases, all in one run:
 *
 * 1. provisioning: N entries in batches under one simulator node; its one spire-agent serves all
 *    N SVIDs in one FetchX509SVID stream; N mTLS connections;
 * 2. steady: 1 heartbeat per robot per second; server and broker CPU and RSS;
 * 3. burst: every robot publishes QoS 1 back to back; server ingest rate vs a bare
 *    `mosquitto_sub` on the same topics in the same run;
 * 4. tasks: M tasks over the fleet (heartbeats continue); the simulated robots answer `done` at
 *    once; round trip = the server's createdAt -> finishedAt of each task. In 3 alternating
 *    rounds (1 with --quick): the unsigned baseline (bench/unsigned_server.ts, the simulator
 *    decoding plain JSON), then the real server signing every task and the simulator verifying
 *    each with checkDown.
 */
import { join } from "node:path";
import { bufferIo } from "../src/cli/io.ts";
import { brokerSpiffeId, robotSpiffeId } from "../src/fleet/mod.ts";
import { readPidFile, realRunner, stopPidFile, waitFor } from "../src/process/mod.ts";
import { serverArgs } from "../src/devenv/components.ts";
import { findSpireBinaries } from "../src/spire/binaries.ts";
import { SpireServerCli } from "../src/spire/server.ts";
import { X509Source } from "../src/spiffe/workload/x509_source.ts";
import { WorkloadApiClient } from "../src/spiffe/workload/client.ts";
import { createEntriesBatch, type SimEntry, SimFleet, startSimNode } from "../src/sim/mod.ts";
import { type BenchResult, figure } from "./report.ts";
import {
  type BenchOptions,
  BenchStack,
  Cleanup,
  ProcSampler,
  REPO,
  spawnSubscriber,
} from "./lib.ts";
import { percentile, round } from "./stats.ts";

interface Sample {
  t: number;
  server: number;
  sub: number;
}

/** Per-interval rates (msg/s) of one counter between `from` and `to`. */
function intervalRates(
  samples: Sample[],
  key: "server" | "sub",
  from: number,
  to: number,
): number[] {
  const inside = samples.filter((s) => s.t >= from && s.t <= to);
  const out: number[] = [];
  for (let i = 1; i < inside.length; i++) {
    const dt = (inside[i].t - inside[i - 1].t) / 1000;
    if (dt > 0) out.push((inside[i][key] - inside[i - 1][key]) / dt);
  }
  return out;
}

export async function benchFleet(opts: BenchOptions, result: BenchResult): Promise<void> {
  const { log } = opts;
  const n = opts.robots;
  const quick = opts.quick;
  const steadyMs = quick ? 6_000 : 15_000;
  const burstMs = quick ? 5_000 : 6_000;
  const tasksN = quick ? 200 : 1000;
  const taskRate = 100; // tasks per second, open loop
  const cleanup = new Cleanup();
  const notes = result.notes;
  const details: Record<string, unknown> = {};
  result.details = details;
  try {
    const stack = await BenchStack.create("k8s4r-bf-");
    cleanup.add("stack", () => stack.destroy());
    log(`fleet: devenv start in ${stack.dir}`);
    const st = await stack.start();
    log(`fleet: devenv start exited ${st.code} after ${Math.round(st.ms)} ms`);
    if (st.code !== 0) {
      // The robots' agents are not what this benchmark measures: go on if the rest is up.
      notes.push(
        `devenv start exited ${st.code} (${
          st.stderr.trim().split("\n").pop()
        }); the fleet benchmark uses its SPIRE server, broker and k8s4r server`,
      );
    }
    await stack.waitServer(30_000);
    const bins = await findSpireBinaries(bufferIo({ env: Deno.env.toObject() }));
    if (!bins) throw new Error("SPIRE binaries not found (run k8s4r devenv install)");
    const cli = new SpireServerCli(realRunner, bins.server, stack.layout.spireServerSocket);
    const td = stack.layout.trustDomain;

    // 1. Identities.
    const t0 = performance.now();
    const node = await startSimNode({
      runner: realRunner,
      cli,
      spireAgentBin: bins.agent,
      trustDomain: td,
      serverPort: stack.layout.ports.spireServer,
      trustBundlePath: stack.layout.caBundleFile,
      dir: join(stack.dir, "sim"),
      socketPath: join(stack.dir, "s", "sim", "agent.sock"),
    });
    cleanup.add("simulator spire-agent", () => node.stop());
    const ids = Array.from({ length: n }, (_, i) => `sim-${String(i + 1).padStart(5, "0")}`);
    const uid = Deno.uid() ?? 0;
    const entries: SimEntry[] = ids.map((id) => ({
      spiffeId: robotSpiffeId(td, id),
      parentId: node.nodeSpiffeId,
      dnsName: id,
      selectors: [`unix:uid:${uid}`],
    }));
    const tEntries = performance.now();
    const created = await createEntriesBatch(realRunner, cli, entries, join(stack.dir, "sim"));
    const entriesMs = performance.now() - tEntries;
    log(`fleet: ${created.created} entries in ${Math.round(entriesMs)} ms`);
    // One process holds every simulated robot's SVID: SPIRE sends them all in one Workload API
    // message (13 MB at 10,000 robots), over the 4 MiB limit of gRPC clients (ours, grpc-go's,
    // grpc-js's), which a real robot (one SVID) never comes near. Only this harness raises it.
    const workload = new WorkloadApiClient({
      address: `unix://${node.socketPath}`,
      maxMessageBytes: Math.max(4, Math.ceil(n / 500)) * 1024 * 1024,
    });
    cleanup.add("Workload API client", () => workload.close());
    const source = await X509Source.create({
      client: workload,
      timeoutMs: 120_000,
      picker: (svids) => svids[0],
    });
    cleanup.add("X509Source", () => source.close());
    await waitFor(() => source.getX509Svids().length >= n, {
      timeoutMs: 180_000,
      intervalMs: 100,
      what: `${n} SVIDs from the simulator node`,
    });
    const svidMs = performance.now() - t0;
    log(`fleet: ${source.getX509Svids().length} SVIDs after ${Math.round(svidMs)} ms`);
    const byRobot = new Map<string, ReturnType<typeof source.getX509Svids>[number]>();
    for (const s of source.getX509Svids()) {
      const id = s.id.path.replace(/^\/robot\//, "");
      byRobot.set(id, s);
    }
    const svids = ids.filter((id) => byRobot.has(id)).map((id) => ({
      robotId: id,
      svid: byRobot.get(id)!,
    }));

    const taskSeen = new Map<string, number>();
    const taskDone = new Map<string, number>();
    const tConnect = performance.now();
    const fleet = await SimFleet.connect({
      brokerUrl: `mqtts://localhost:${stack.layout.ports.mqttTls}`,
      brokerSpiffeId: brokerSpiffeId(td),
      svids,
      bundles: source.bundles!,
      heartbeatIntervalSeconds: 1,
      onTask: (_r, id, at) => taskSeen.set(id, at),
      onTaskDone: (_r, id, at) => taskDone.set(id, at),
    });
    cleanup.add("simulated fleet", () => fleet.close());
    const connectMs = performance.now() - tConnect;
    log(
      `fleet: ${fleet.stats.connected} connected (${fleet.stats.connectFailures} failed) in ${
        Math.round(connectMs)
      } ms${fleet.stats.lastError ? `; last error: ${fleet.stats.lastError}` : ""}`,
    );
    if (fleet.stats.connected === 0) {
      throw new Error(`no robot connected: ${fleet.stats.lastError}`);
    }
    result.figures.push(
      figure("fleet.provision", `${n} SVIDs from real SPIRE (entries + node agent)`, "s", [
        svidMs / 1000,
      ]),
      figure("fleet.connect", `${fleet.stats.connected} mTLS MQTT connections`, "s", [
        connectMs / 1000,
      ]),
      figure(
        "fleet.connect_one",
        "one connection (TLS + CONNECT), under load",
        "ms",
        fleet.stats.connectMs,
        {
          runs: 1,
        },
      ),
    );
    details.provisioning = {
      entriesMs,
      svidMs,
      connectMs,
      connected: fleet.stats.connected,
      connectFailures: fleet.stats.connectFailures,
    };

    // The bare subscriber: same broker, same listener, same topics, same QoS as the server.
    // "-F x": one "x\n" per message, so the file size counts messages.
    const { daemon: sub, out: subOut } = await spawnSubscriber(
      stack,
      cleanup,
      "k8s4r/robots/+/up/#",
      "x",
    );
    const subCount = async () => {
      try {
        return Math.floor((await Deno.stat(subOut)).size / 2);
      } catch {
        return 0;
      }
    };
    const heartbeats = async () => (await stack.serverStats())?.messages.received.heartbeat ?? NaN;

    const serverPid = readPidFile(stack.files.serverPid)?.pid;
    const brokerPid = readPidFile(stack.files.mosquittoPid)?.pid;
    if (!serverPid || !brokerPid) throw new Error("server or broker pid file missing");
    const pids = { server: serverPid, broker: brokerPid, simulator: Deno.pid, sub: sub.pid };

    // 2. Steady 1/s.
    fleet.startHeartbeats(1000);
    await waitFor(async () => (await subCount()) > 0, {
      timeoutMs: 10_000,
      what: "mosquitto_sub to receive",
    });
    await new Promise((r) => setTimeout(r, 3000)); // warm-up: every robot on its 1 s cycle
    const steadySamples: Sample[] = [];
    const sampler = new ProcSampler(pids);
    await sampler.start();
    const steadyStart = performance.now();
    while (performance.now() - steadyStart < steadyMs) {
      steadySamples.push({
        t: performance.now(),
        server: await heartbeats(),
        sub: await subCount(),
      });
      await new Promise((r) => setTimeout(r, 1000));
    }
    steadySamples.push({ t: performance.now(), server: await heartbeats(), sub: await subCount() });
    const steadyProc = await sampler.stop();
    const steadyServerRates = intervalRates(steadySamples, "server", 0, Infinity);
    result.figures.push(
      figure(
        "fleet.steady.ingest",
        `steady ingest at ${fleet.stats.connected} heartbeats/s`,
        "msg/s",
        steadyServerRates,
        { runs: 1 },
      ),
      figure("fleet.steady.server_cpu", "server CPU, steady 1 hb/s per robot", "%", [
        steadyProc.server.cpuPct,
      ]),
      figure("fleet.steady.server_rss", "server RSS, steady", "MB", steadyProc.server.rssMb, {
        runs: 1,
      }),
      figure("fleet.steady.broker_cpu", "mosquitto CPU, steady", "%", [steadyProc.broker.cpuPct]),
      figure("fleet.steady.broker_rss", "mosquitto RSS, steady", "MB", steadyProc.broker.rssMb, {
        runs: 1,
      }),
    );
    details.steady = { samples: steadySamples, proc: steadyProc };
    log(
      `fleet: steady ingest ${round(percentile(steadyServerRates, 50))} msg/s, server CPU ${
        round(steadyProc.server.cpuPct)
      }%`,
    );

    // 3. Bursts: every robot publishes QoS 1 back to back (window 1), as fast as the broker
    // acknowledges. The server's /api/stats may answer late while it ingests, so each
    // consumer's throughput is measured as messages / time until it had them all.
    fleet.stopHeartbeats();
    const bursts = quick ? 1 : 3;
    const serverRates: number[] = [];
    const subRates: number[] = [];
    const ratios: number[] = [];
    const brokerRates: number[] = [];
    const statsLatency: number[] = [];
    const burstRuns: unknown[] = [];
    let burstProc: Awaited<ReturnType<ProcSampler["stop"]>> | undefined;
    for (let k = 0; k < bursts; k++) {
      await new Promise((r) => setTimeout(r, 1000));
      const subS: { t: number; count: number }[] = [];
      const srvS: { t: number; count: number }[] = [];
      let sampling = true;
      const subLoop = (async () => {
        while (sampling) {
          const c = await subCount();
          subS.push({ t: performance.now(), count: c });
          await new Promise((r) => setTimeout(r, 100));
        }
      })();
      const srvLoop = (async () => {
        while (sampling) {
          const t = performance.now();
          const h = await heartbeats();
          const t2 = performance.now();
          statsLatency.push(t2 - t);
          if (Number.isFinite(h)) srvS.push({ t: t2, count: h });
          await new Promise((r) => setTimeout(r, 250));
        }
      })();
      const subBase = await subCount();
      const srvBase = await heartbeats();
      const bSampler = new ProcSampler(pids);
      await bSampler.start();
      const ackedBefore = fleet.stats.acked;
      const bStart = performance.now();
      await fleet.burst(burstMs, 1);
      const bEnd = performance.now();
      const proc = await bSampler.stop();
      if (k === 0) burstProc = proc;
      brokerRates.push((fleet.stats.acked - ackedBefore) / ((bEnd - bStart) / 1000));
      // Drain: until both counters stop moving for 2 s (or 60 s).
      let stable = 0;
      let prev = "";
      await waitFor(async () => {
        const now = `${await subCount()}/${await heartbeats()}`;
        stable = now === prev ? stable + 1 : 0;
        prev = now;
        return stable >= 4;
      }, { timeoutMs: 60_000, intervalMs: 500, what: "the consumers to drain" }).catch(() => {});
      sampling = false;
      await Promise.all([subLoop, srvLoop]);
      const subFinal = (await subCount()) - subBase;
      const srvFinal = (await heartbeats()) - srvBase;
      const reached = (xs: { t: number; count: number }[], base: number, final: number) =>
        xs.find((x) => x.count - base >= final)?.t;
      const subT = reached(subS, subBase, subFinal);
      const srvT = reached(srvS, srvBase, srvFinal);
      const subRate = subT ? subFinal / ((subT - bStart) / 1000) : NaN;
      const srvRate = srvT ? srvFinal / ((srvT - bStart) / 1000) : NaN;
      subRates.push(subRate);
      serverRates.push(srvRate);
      ratios.push(srvRate / subRate);
      burstRuns.push({
        subFinal,
        srvFinal,
        subSeconds: subT ? (subT - bStart) / 1000 : null,
        srvSeconds: srvT ? (srvT - bStart) / 1000 : null,
        burstSeconds: (bEnd - bStart) / 1000,
        proc,
      });
      log(
        `fleet: burst ${k + 1}/${bursts}: broker ${round(brokerRates[k])}/s, sub ${subFinal} msgs ${
          round(subRate)
        }/s, server ${srvFinal} msgs ${round(srvRate)}/s`,
      );
    }
    const ok = (xs: number[]) => xs.filter((x) => Number.isFinite(x));
    result.figures.push(
      figure(
        "fleet.burst.broker_in",
        "burst: broker PUBACK rate to the robots",
        "msg/s",
        brokerRates,
      ),
      figure("fleet.burst.sub", "burst: bare mosquitto_sub throughput", "msg/s", ok(subRates)),
      figure(
        "fleet.burst.server",
        "burst: k8s4r server ingest throughput",
        "msg/s",
        ok(serverRates),
        {
          target: { op: ">=", value: 5000, on: "median" },
        },
      ),
      figure("fleet.burst.ratio", "burst: server / mosquitto_sub (same bursts)", "×", ok(ratios), {
        target: { op: ">=", value: 0.5, on: "median" },
      }),
      figure(
        "fleet.burst.stats_latency",
        "GET /api/stats latency while ingesting",
        "ms",
        statsLatency,
        {
          runs: bursts,
        },
      ),
    );
    if (burstProc) {
      result.figures.push(
        figure("fleet.burst.server_cpu", "server CPU during burst 1", "%", [
          burstProc.server.cpuPct,
        ]),
        figure("fleet.burst.broker_cpu", "mosquitto CPU during burst 1", "%", [
          burstProc.broker.cpuPct,
        ]),
        figure("fleet.burst.sim_cpu", "simulator (bench process) CPU during burst 1", "%", [
          burstProc.simulator.cpuPct,
        ]),
        figure(
          "fleet.burst.server_rss",
          "server RSS during burst 1",
          "MB",
          burstProc.server.rssMb,
          { runs: 1 },
        ),
      );
      notes.push(
        `Burst 1 CPU (100% = one core, 200% = the machine): server ${
          round(burstProc.server.cpuPct)
        }%, ` +
          `mosquitto ${round(burstProc.broker.cpuPct)}%, simulator ${
            round(burstProc.simulator.cpuPct)
          }%, ` +
          `mosquitto_sub ${round(burstProc.sub.cpuPct)}%.`,
      );
    }
    details.bursts = burstRuns;

    // 4. Tasks, with 1/s heartbeats going on, on both paths in the same run: the path before
    // signing (bench/unsigned_server.ts in place of the dev stack's server, the simulator decoding
    // plain JSON), and the real server, which signs every task with its SVID, the simulator
    // verifying each with checkDown (chain, signer, robot, expiry, window) with one chain cache
    // per robot, as in one agent process. In each round the baseline goes first: the signed phase
    // then runs on the larger registry, so any bias is against signing.
    const client = await stack.client();
    const robotsUp = fleet.robots.map((r) => r.id);
    const taskPhase = async (label: string) => {
      taskSeen.clear();
      taskDone.clear();
      const refusedBefore = fleet.stats.refused;
      const serverPid = readPidFile(stack.files.serverPid)?.pid;
      if (!serverPid) throw new Error(`${label}: no server pid`);
      const sampler = new ProcSampler({ server: serverPid, simulator: Deno.pid });
      await sampler.start();
      fleet.startHeartbeats(1000);
      const posted: { id: string; robot: string; t: number }[] = [];
      const postErrors: string[] = [];
      const tTasks = performance.now();
      const inflight = new Set<Promise<void>>();
      for (let i = 0; i < tasksN; i++) {
        const due = tTasks + (i * 1000) / taskRate;
        const wait = due - performance.now();
        if (wait > 0) await new Promise((r) => setTimeout(r, wait));
        const robot = robotsUp[i % robotsUp.length];
        const t = performance.now();
        const p = fetch(`${stack.api}/api/robots/${robot}/tasks`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ command: ["true"], timeoutSeconds: 30 }),
          client,
        }).then(async (r) => {
          const body = await r.json();
          if (r.status !== 201) postErrors.push(`${r.status} ${JSON.stringify(body)}`);
          else posted.push({ id: body.id, robot, t });
        }).catch((err) => void postErrors.push((err as Error).message));
        inflight.add(p);
        p.finally(() => inflight.delete(p));
      }
      await Promise.all([...inflight]);
      await waitFor(() => posted.every((p) => taskDone.has(p.id)), {
        timeoutMs: 60_000,
        intervalMs: 200,
        what: "every task answered",
      }).catch(() => {});
      const proc = await sampler.stop();
      fleet.stopHeartbeats();
      const rtt: number[] = [];
      const delivery: number[] = [];
      const notDone: string[] = [];
      const q = [...posted];
      await Promise.all(Array.from({ length: 10 }, async () => {
        while (q.length) {
          const p = q.shift()!;
          const r = await fetch(`${stack.api}/api/tasks/${p.id}`, { client });
          const t = await r.json() as {
            state: string;
            createdAt: string;
            finishedAt?: string | null;
          };
          if (t.state === "done" && t.finishedAt) {
            rtt.push(Date.parse(t.finishedAt) - Date.parse(t.createdAt));
          } else notDone.push(`${p.id}: ${t.state}`);
          const seen = taskSeen.get(p.id);
          if (seen !== undefined) delivery.push(seen - p.t);
        }
      }));
      const refused = fleet.stats.refused - refusedBefore;
      notes.push(
        `Tasks (${label}): ${posted.length} posted (${postErrors.length} POST errors${
          postErrors[0] ? `, e.g. ${postErrors[0]}` : ""
        }), ${rtt.length} done, ${notDone.length} not done${
          notDone[0] ? ` (e.g. ${notDone[0]})` : ""
        }, ${refused} refused by the simulated robots${
          refused && fleet.stats.lastRefusal ? ` (e.g. ${fleet.stats.lastRefusal})` : ""
        }; server CPU ${round(proc.server.cpuPct)}%, simulator ${
          round(proc.simulator.cpuPct)
        }% over the phase.`,
      );
      return { rtt, delivery, posted: posted.length, postErrors, notDone, refused, proc };
    };

    // The two paths alternate, round by round (the dev stack's signing server swapped for the
    // baseline and back, same registry, same port), so that drift in the machine's load (other
    // processes on its 2 cores) falls on both alike.
    const rounds = quick ? 1 : 3;
    type Phase = Awaited<ReturnType<typeof taskPhase>>;
    const phases: Record<"unsigned" | "signed", Phase[]> = { unsigned: [], signed: [] };
    const serverUp = () =>
      waitFor(async () => (await stack.serverStats())?.mqtt.connected === true, {
        timeoutMs: 30_000,
        what: "the server subscribed",
      });
    for (let round = 1; round <= rounds; round++) {
      // The baseline: the same server code without a signer (bench/unsigned_server.ts).
      log(`fleet: tasks round ${round}/${rounds}: unsigned baseline (bench/unsigned_server.ts)`);
      await stopPidFile(stack.files.serverPid, 15_000);
      const baseline = await realRunner.spawn({
        name: "unsigned baseline server",
        cmd: Deno.execPath(),
        args: [
          "run",
          "-A",
          join(REPO, "bench", "unsigned_server.ts"),
          ...serverArgs(stack.layout, stack.files),
        ],
        cwd: stack.dir,
        env: stack.env,
        logFile: stack.files.serverLog,
        pidFile: stack.files.serverPid,
        detached: true,
        ready: async () => (await stack.serverStats())?.mqtt.connected === true,
        readyTimeoutMs: 60_000,
        readyIntervalMs: 100,
      });
      if (round === 1) {
        cleanup.add("unsigned baseline server", () => stopPidFile(stack.files.serverPid, 15_000));
      }
      fleet.unsignedBaseline = true;
      phases.unsigned.push(await taskPhase(`unsigned baseline, round ${round}/${rounds}`));
      fleet.unsignedBaseline = false;
      await stopPidFile(stack.files.serverPid, 15_000);
      log(`fleet: baseline server (pid ${baseline.pid}) stopped`);
      // The real server again (devenv restarts what is down): it signs every task.
      log(
        `fleet: tasks round ${round}/${rounds}: signed by the server's SVID, verified by checkDown`,
      );
      const restart = await stack.start();
      if (restart.code !== 0 && restart.code !== 1) {
        throw new Error(`devenv start (server restart) exited ${restart.code}: ${restart.stderr}`);
      }
      await serverUp();
      phases.signed.push(await taskPhase(`signed, round ${round}/${rounds}`));
    }
    const pooled = (ps: Phase[]) => ({
      rtt: ps.flatMap((p) => p.rtt),
      delivery: ps.flatMap((p) => p.delivery),
      posted: ps.reduce((n, p) => n + p.posted, 0),
      cpu: ps.map((p) => p.proc.server.cpuPct),
      p99: ps.map((p) => round(percentile(p.rtt, 99))),
    });
    const unsigned = pooled(phases.unsigned);
    const signed = pooled(phases.signed);
    const rttFigure = (id: string, what: string, r: typeof signed, target?: boolean) =>
      figure(
        id,
        `task round trip (server createdAt → done), ${tasksN} tasks at ${taskRate}/s × ${rounds}, ${what}`,
        "ms",
        r.rtt,
        { runs: rounds, ...(target ? { target: { op: "<=", value: 15, on: "p99" } } : {}) },
      );
    if (unsigned.rtt.length) {
      result.figures.push(
        rttFigure("fleet.task.rtt_unsigned", "unsigned baseline (before signing)", unsigned),
        figure(
          "fleet.task.delivery_unsigned",
          "POST sent → task at the simulated robot, unsigned baseline",
          "ms",
          unsigned.delivery,
          { runs: rounds },
        ),
        figure(
          "fleet.task.server_cpu_unsigned",
          "server CPU during a task phase, unsigned baseline",
          "%",
          unsigned.cpu,
        ),
      );
    }
    if (signed.rtt.length) {
      result.figures.push(
        rttFigure("fleet.task.rtt", "signed (server SVID) and verified (checkDown)", signed, true),
        figure(
          "fleet.task.delivery",
          "POST sent → task at the simulated robot, signed and verified",
          "ms",
          signed.delivery,
          { runs: rounds },
        ),
        figure(
          "fleet.task.server_cpu",
          "server CPU during a task phase, signed",
          "%",
          signed.cpu,
        ),
      );
    }
    notes.push(
      `Task round trip p99 per round (ms): unsigned ${unsigned.p99.join(", ")}; signed ${
        signed.p99.join(", ")
      } (rounds alternate, baseline first).`,
    );
    notes.push(
      "Round trip uses the server's own timestamps (ms resolution): createdAt (POST handled) → " +
        "finishedAt (the robot's done report applied), through the broker both ways; " +
        "simulated robots answer done at once without running the command. Signed: the server " +
        "signs each task with its SVID at dispatch (TaskSigner), each simulated robot verifies it " +
        "with checkDown before answering (the first task of a robot verifies the whole chain).",
    );
    details.tasks = { unsigned: phases.unsigned, signed: phases.signed };
    details.fleetStats = { ...fleet.stats, connectMs: undefined };
    if (fleet.stats.denied > 0 || fleet.stats.disconnects > 0) {
      notes.push(
        `Simulator: ${fleet.stats.denied} publishes denied, ${fleet.stats.disconnects} disconnects, ${fleet.stats.publishErrors} publish errors.`,
      );
    }
  } finally {
    await cleanup.run(log);
  }
}
