import assert from "node:assert/strict";
import { TestCa } from "../spiffe/testing/test_ca.ts";
import { assertPromtoolClean } from "../monitoring/testing.ts";
import {
  FleetMetrics,
  type FleetMetricsSources,
  type MessageStats,
  parseBundlePem,
  type RobotSample,
  trustBundleFile,
} from "./metrics.ts";
import { openSqliteFile } from "./registry_sqlite.ts";

const NOW = Date.parse("2026-12-01T12:00:00.000Z");
const iso = (offsetS: number) => new Date(NOW + offsetS * 1000).toISOString();

function robots(): RobotSample[] {
  return [
    {
      id: "robot-001",
      online: true,
      lastSeen: iso(-2),
      svidExpiresAt: iso(1800),
      heartbeatsReceived: 120,
      heartbeatsMissing: 3,
    },
    {
      id: "robot-002",
      online: false,
      lastSeen: iso(-300),
      svidExpiresAt: iso(-60),
      svidIssuedAt: iso(-3660),
      heartbeatsReceived: 10,
      heartbeatsMissing: 0,
      workloadApiUp: false,
      outboundQueueDepth: 0,
    },
    {
      id: "robot-003",
      online: true,
      unknownSince: iso(-30),
      lastSeen: iso(-40),
      svidExpiresAt: null,
      heartbeatsReceived: 0,
      heartbeatsMissing: 0,
    },
  ];
}

function stats(): MessageStats {
  return {
    received: { register: 3, heartbeat: 130, status: 4, "task-status": 9 },
    dropped: {
      "bad-topic": 1,
      "too-large": 0,
      "bad-json": 2,
      "unsupported-version": 0,
      "bad-schema": 5,
      "robot-id-mismatch": 1,
    },
    tasksDispatched: 4,
    publishErrors: 1,
    staleTaskReports: 2,
    unknownTaskReports: 1,
    refusals: { "bad-signature": 7, "wrong-robot": 0, expired: 1, replay: 2, task: 3 },
    signErrors: 1,
  };
}

function sources(over: Partial<FleetMetricsSources> = {}): FleetMetricsSources {
  return {
    robots,
    stats,
    taskCounts: () => ({ pending: 1, running: 1, done: 5, failed: 1 }),
    mqtt: () => ({ connected: true, connects: 2 }),
    ...over,
  };
}

/** The value of one sample line, e.g. `sample(text, 'k8s4r_robots_known')`. */
function sample(text: string, series: string): number | undefined {
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const sp = line.lastIndexOf(" ");
    if (line.slice(0, sp) === series) return Number(line.slice(sp + 1));
  }
  return undefined;
}

function lines(text: string, name: string): string[] {
  return text.split("\n").filter((l) => l.startsWith(name + "{") || l.startsWith(name + " "));
}

Deno.test("fleet metrics: realistic data renders every catalogue series and passes promtool", async () => {
  const ca1 = TestCa.create({
    notBefore: new Date(NOW - 20 * 3600_000),
    notAfter: new Date(NOW + 4 * 3600_000),
  });
  const ca2 = TestCa.create({
    notBefore: new Date(NOW - 3600_000),
    notAfter: new Date(NOW + 23 * 3600_000),
  });
  const bundle = parseBundlePem(ca1.rootPem + ca2.rootPem);
  const m = new FleetMetrics(sources({ trustBundle: () => bundle }), {
    version: '0.1.0 "dev"',
    now: () => new Date(NOW),
  });
  m.recordRobotTelemetry("robot-001", {
    svidIssuedAt: iso(-1800),
    workloadApi: "up",
    outboundQueueDepth: 2,
  });
  m.taskFinished({ state: "done", createdAt: iso(-3), finishedAt: iso(-1) });
  m.taskFinished({ state: "running", createdAt: iso(-3) }); // not final: ignored
  m.storage.time("message", () => 1);
  assert.throws(() =>
    m.storage.time("message", () => {
      throw new Error("disk I/O error");
    }), /disk I\/O error/);

  const text = await m.render();
  await assertPromtoolClean(text, "the fleet server's metrics");

  assert.equal(sample(text, "k8s4r_robots_known"), 3);
  assert.equal(sample(text, "k8s4r_robots_online"), 1, "an unknown robot is not counted online");
  assert.equal(sample(text, "k8s4r_robots_unknown"), 1);
  assert.equal(sample(text, 'k8s4r_robot_online{robot="robot-001"}'), 1);
  assert.equal(sample(text, 'k8s4r_robot_online{robot="robot-002"}'), 0);
  assert.equal(sample(text, 'k8s4r_robot_online{robot="robot-003"}'), undefined);
  assert.equal(
    sample(text, 'k8s4r_robot_last_seen_timestamp_seconds{robot="robot-002"}'),
    NOW / 1000 - 300,
  );
  assert.equal(
    sample(text, 'k8s4r_robot_svid_expiry_timestamp_seconds{robot="robot-001"}'),
    NOW / 1000 + 1800,
  );
  assert.equal(
    sample(text, 'k8s4r_robot_svid_expiry_timestamp_seconds{robot="robot-003"}'),
    undefined,
  );
  // From the heartbeat telemetry hook for robot-001, from the record itself for robot-002.
  assert.equal(
    sample(text, 'k8s4r_robot_svid_issued_timestamp_seconds{robot="robot-001"}'),
    NOW / 1000 - 1800,
  );
  assert.equal(
    sample(text, 'k8s4r_robot_svid_issued_timestamp_seconds{robot="robot-002"}'),
    NOW / 1000 - 3660,
  );
  assert.equal(sample(text, 'k8s4r_robot_workload_api_up{robot="robot-001"}'), 1);
  assert.equal(sample(text, 'k8s4r_robot_workload_api_up{robot="robot-002"}'), 0);
  assert.equal(sample(text, 'k8s4r_robot_workload_api_up{robot="robot-003"}'), undefined);
  assert.equal(sample(text, 'k8s4r_robot_outbound_queue_messages{robot="robot-001"}'), 2);
  assert.equal(sample(text, 'k8s4r_robot_heartbeats_received_total{robot="robot-001"}'), 120);
  assert.equal(sample(text, 'k8s4r_robot_heartbeats_missing_total{robot="robot-001"}'), 3);
  assert.equal(sample(text, 'k8s4r_robot_heartbeats_missing_total{robot="robot-003"}'), 0);

  assert.equal(sample(text, 'k8s4r_messages_received_total{type="heartbeat"}'), 130);
  assert.equal(sample(text, 'k8s4r_messages_dropped_total{reason="bad-schema"}'), 5);
  assert.equal(sample(text, 'k8s4r_messages_dropped_total{reason="too-large"}'), 0);
  assert.equal(sample(text, 'k8s4r_messages_dropped_total{reason="unknown-task"}'), 1);
  assert.equal(sample(text, 'k8s4r_task_refusals_total{reason="bad-signature"}'), 7);
  assert.equal(sample(text, 'k8s4r_task_refusals_total{reason="wrong-robot"}'), 0);
  assert.equal(sample(text, 'k8s4r_task_refusals_total{reason="task"}'), 3);
  assert.equal(sample(text, "k8s4r_task_sign_errors_total"), 1);
  assert.equal(sample(text, 'k8s4r_messages_dropped_total{reason="stale-task-report"}'), 2);
  assert.equal(lines(text, "k8s4r_messages_dropped_total").length, 8);

  assert.equal(sample(text, 'k8s4r_tasks{state="done"}'), 5);
  assert.equal(sample(text, 'k8s4r_tasks{state="expired"}'), 0, "every state has a series");
  assert.equal(sample(text, 'k8s4r_tasks{state="cancelled"}'), 0, "cancel states too");
  assert.equal(lines(text, "k8s4r_tasks").length, 10);
  assert.equal(sample(text, "k8s4r_tasks_dispatched_total"), 4);
  assert.equal(sample(text, "k8s4r_task_publish_errors_total"), 1);
  assert.equal(sample(text, 'k8s4r_task_latency_seconds_count{state="done"}'), 1);
  assert.equal(sample(text, 'k8s4r_task_latency_seconds_sum{state="done"}'), 2);
  assert.equal(sample(text, 'k8s4r_task_latency_seconds_bucket{le="1",state="done"}'), 0);
  assert.equal(sample(text, 'k8s4r_task_latency_seconds_bucket{le="2.5",state="done"}'), 1);
  assert.equal(sample(text, 'k8s4r_task_latency_seconds_count{state="expired"}'), 0);
  assert.equal(sample(text, 'k8s4r_task_latency_seconds_count{state="running"}'), undefined);

  assert.equal(sample(text, "k8s4r_mqtt_connected"), 1);
  assert.equal(sample(text, "k8s4r_mqtt_connects_total"), 2);
  assert.equal(sample(text, 'k8s4r_storage_operation_duration_seconds_count{op="message"}'), 2);
  assert.equal(sample(text, 'k8s4r_storage_errors_total{op="message"}'), 1);
  assert.equal(sample(text, 'k8s4r_storage_errors_total{op="sweep"}'), 0);
  // The scrape's own registry reads are timed: robots and task counts.
  assert.equal(sample(text, 'k8s4r_storage_operation_duration_seconds_count{op="read"}'), 2);

  // The CA that expires last is the one the bundle's lifetime depends on.
  assert.equal(sample(text, "k8s4r_trust_bundle_expiry_timestamp_seconds"), NOW / 1000 + 23 * 3600);
  assert.equal(sample(text, "k8s4r_trust_bundle_issued_timestamp_seconds"), NOW / 1000 - 3600);
  assert.equal(sample(text, 'k8s4r_server_info{version="0.1.0 \\"dev\\""}'), 1);
  assert.equal(sample(text, "k8s4r_server_start_time_seconds"), NOW / 1000);
});

Deno.test("fleet metrics: a scrape follows its sources (collected at scrape time)", async () => {
  let online = true;
  let connected = true;
  const m = new FleetMetrics(sources({
    robots: () => [{ ...robots()[0], online }],
    mqtt: () => ({ connected, connects: 1 }),
  }));
  let text = await m.render();
  assert.equal(sample(text, 'k8s4r_robot_online{robot="robot-001"}'), 1);
  assert.equal(sample(text, "k8s4r_mqtt_connected"), 1);
  online = false;
  connected = false;
  text = await m.render();
  assert.equal(sample(text, 'k8s4r_robot_online{robot="robot-001"}'), 0);
  assert.equal(sample(text, "k8s4r_robots_online"), 0);
  assert.equal(sample(text, "k8s4r_mqtt_connected"), 0);
  assert.equal(
    lines(text, "k8s4r_trust_bundle_expiry_timestamp_seconds").length,
    0,
    "no bundle source, no series",
  );
});

Deno.test("fleet metrics: one robots() read per scrape, even for overlapping scrapes", async () => {
  let reads = 0;
  const m = new FleetMetrics(sources({
    robots: () => {
      reads++;
      return robots();
    },
  }));
  const texts = await Promise.all([m.render(), m.render(), m.render()]);
  assert.equal(reads, 3);
  for (const t of texts) assert.equal(sample(t, "k8s4r_robots_known"), 3);
});

Deno.test("fleet metrics: a failing registry read is counted, and the scrape still answers", async () => {
  let broken = true;
  const m = new FleetMetrics(sources({
    robots: () => {
      if (broken) throw new Error("database is locked");
      return robots();
    },
    taskCounts: () => {
      if (broken) throw new Error("database is locked");
      return { done: 1 };
    },
  }));
  let text = await m.render();
  await assertPromtoolClean(text);
  assert.equal(sample(text, 'k8s4r_storage_errors_total{op="read"}'), 2);
  assert.equal(lines(text, "k8s4r_robot_online").length, 0);
  assert.equal(lines(text, "k8s4r_robots_known").length, 0, "no made-up robot count");
  assert.equal(lines(text, "k8s4r_tasks").length, 0, "no made-up task counts");
  assert.equal(sample(text, "k8s4r_mqtt_connected"), 1, "the rest of the page is there");
  // Positive control: the same object reads again once the registry recovers.
  broken = false;
  text = await m.render();
  assert.equal(sample(text, "k8s4r_robots_known"), 3);
  assert.equal(sample(text, 'k8s4r_tasks{state="done"}'), 1);
  assert.equal(sample(text, 'k8s4r_storage_errors_total{op="read"}'), 2);
});

Deno.test("fleet metrics: telemetry hook keeps the newest value of each field", async () => {
  const m = new FleetMetrics(sources({ robots: () => [robots()[0]] }));
  m.recordRobotTelemetry("robot-001", { workloadApi: "up", outboundQueueDepth: 5 });
  m.recordRobotTelemetry("robot-001", { workloadApi: "down" }); // a heartbeat without the depth
  const text = await m.render();
  assert.equal(sample(text, 'k8s4r_robot_workload_api_up{robot="robot-001"}'), 0);
  assert.equal(sample(text, 'k8s4r_robot_outbound_queue_messages{robot="robot-001"}'), 5);
});

Deno.test("fleet metrics: trust bundle file is re-read when it changes; a bad file yields no series", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-metrics-" });
  try {
    const path = `${dir}/spire-ca.crt`;
    const a = TestCa.create({ ttlSeconds: 3600 });
    await Deno.writeTextFile(path, a.rootPem);
    const read = trustBundleFile(path);
    assert.equal(read()?.length, 1);
    assert.equal(read()?.[0].notAfter.getTime(), new Date(a.root.validTo).getTime());
    const b = TestCa.create({ ttlSeconds: 7200 });
    await Deno.writeTextFile(path, a.rootPem + b.rootPem);
    assert.equal(read()?.length, 2);
    await Deno.writeTextFile(path, "not a PEM bundle\n");
    assert.equal(read(), undefined);
    await Deno.remove(path);
    assert.equal(read(), undefined);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("fleet metrics: a scrape of 10,000 robots from a real registry is correct", async () => {
  const N = 10_000;
  const reg = openSqliteFile(":memory:");
  try {
    const at = new Date(NOW).toISOString();
    await reg.transaction(async (tx) => {
      for (let i = 0; i < N; i++) {
        const id = `robot-${String(i).padStart(5, "0")}`;
        await tx.recordRegister(id, at, {
          spiffeId: `spiffe://k8s4r.example.org/robot/${id}`,
          agentVersion: "0.1.0",
          svidExpiresAt: iso(3600),
          heartbeatIntervalSeconds: 10,
          device: {
            hostname: id,
            os: "linux",
            arch: "x86_64",
            cpus: 4,
            memoryBytes: 8e9,
            load: [0.1, 0.2, 0.3],
            uptimeSeconds: 100,
          },
        });
        await tx.recordHeartbeat(id, at, { seq: 1, bootId: "b", svidExpiresAt: iso(3600) });
        await tx.recordHeartbeat(id, at, { seq: 4, bootId: "b", svidExpiresAt: iso(3600) });
        await tx.setOnline(id, i % 10 !== 0, i % 10 === 0 ? "missed 3 heartbeats" : null);
      }
    });
    // The sources are synchronous (phase 2 wiring reads the registry before each scrape).
    const t0read = performance.now();
    const robots = await reg.listRobots();
    const readMs = performance.now() - t0read;
    const taskCounts = await reg.countTasksByState();
    const m = new FleetMetrics({
      robots: () => robots,
      stats,
      taskCounts: () => taskCounts,
      mqtt: () => ({ connected: true, connects: 1 }),
    });
    for (let i = 0; i < N; i++) {
      m.recordRobotTelemetry(`robot-${String(i).padStart(5, "0")}`, {
        svidIssuedAt: iso(-1800),
        workloadApi: "up",
        outboundQueueDepth: 0,
      });
    }
    await m.render(); // warm-up (JIT, statement cache)
    const t0 = performance.now();
    const text = await m.render();
    const ms = performance.now() - t0;
    const series = text.split("\n").filter((l) => l !== "" && !l.startsWith("#")).length;
    console.log(
      `scrape of ${N} robots: ${ms.toFixed(0)} ms (registry listRobots ${
        readMs.toFixed(0)
      } ms), ${series} series, ${(text.length / 1e6).toFixed(2)} MB`,
    );
    assert.equal(sample(text, "k8s4r_robots_known"), N);
    assert.equal(sample(text, "k8s4r_robots_online"), N - N / 10);
    assert.equal(lines(text, "k8s4r_robot_online").length, N);
    assert.equal(lines(text, "k8s4r_robot_svid_issued_timestamp_seconds").length, N);
    assert.equal(sample(text, 'k8s4r_robot_heartbeats_missing_total{robot="robot-09999"}'), 2);
    assert.equal(sample(text, 'k8s4r_robot_heartbeats_received_total{robot="robot-00000"}'), 2);
    assert.equal(sample(text, 'k8s4r_robot_online{robot="robot-00010"}'), 0);
    // 8 per-robot series per robot plus the fleet-wide ones.
    assert.ok(series >= 8 * N && series < 8 * N + 200, `${series} series`);
    await assertPromtoolClean(text, `the metrics of ${N} robots`);
  } finally {
    await reg.close();
  }
});
