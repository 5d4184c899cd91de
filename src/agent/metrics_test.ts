import assert from "node:assert/strict";
import { assertEndpointPromtoolClean, assertPromtoolClean } from "../monitoring/testing.ts";
import { serveMetrics } from "../metrics/mod.ts";
import { AgentMetrics, type AgentMetricsSources, type SvidInfo } from "./metrics.ts";

const NOW = Date.parse("2026-12-01T12:00:00.000Z");

function sample(text: string, series: string): number | undefined {
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const sp = line.lastIndexOf(" ");
    if (line.slice(0, sp) === series) return Number(line.slice(sp + 1));
  }
  return undefined;
}

function fixture() {
  let now = NOW;
  const state = {
    svid: {
      notBefore: new Date(NOW - 600_000),
      notAfter: new Date(NOW + 3000_000),
      serial: "01",
    } as SvidInfo | undefined,
    wl: true,
    connected: true,
    connects: 3,
    queue: 7,
  };
  const src: AgentMetricsSources = {
    robotId: "robot-001",
    version: "0.1.0",
    svid: () => state.svid,
    trustBundle: () => [
      { notBefore: new Date(NOW - 86400_000), notAfter: new Date(NOW + 3600_000) },
      { notBefore: new Date(NOW - 3600_000), notAfter: new Date(NOW + 82800_000) },
    ],
    workloadApiUp: () => state.wl,
    broker: () => ({ connected: state.connected, connects: state.connects }),
    outboundQueueDepth: () => state.queue,
    counters: () => ({ heartbeats: 42, tasks: 2, malformed: 1, denied: 0 }),
  };
  const m = new AgentMetrics(src, { now: () => new Date(now) });
  return { m, state, advance: (s: number) => (now += s * 1000) };
}

Deno.test("agent metrics: realistic data renders the catalogue and passes promtool", async () => {
  const { m } = fixture();
  m.observeSvid();
  const text = await m.render();
  await assertPromtoolClean(text, "the agent's metrics");
  assert.equal(sample(text, 'k8s4r_agent_info{robot="robot-001",version="0.1.0"}'), 1);
  assert.equal(sample(text, "k8s4r_agent_svid_expiry_timestamp_seconds"), NOW / 1000 + 3000);
  assert.equal(sample(text, "k8s4r_agent_svid_issued_timestamp_seconds"), NOW / 1000 - 600);
  assert.equal(sample(text, "k8s4r_agent_svid_last_rotation_timestamp_seconds"), NOW / 1000);
  assert.equal(
    sample(text, "k8s4r_agent_svid_rotations_total"),
    0,
    "the first SVID is no rotation",
  );
  assert.equal(
    sample(text, "k8s4r_agent_trust_bundle_expiry_timestamp_seconds"),
    NOW / 1000 + 82800,
  );
  assert.equal(sample(text, "k8s4r_agent_workload_api_up"), 1);
  assert.equal(sample(text, "k8s4r_agent_broker_connected"), 1);
  assert.equal(sample(text, "k8s4r_agent_broker_connects_total"), 3);
  assert.equal(sample(text, "k8s4r_agent_outbound_queue_messages"), 7);
  assert.equal(sample(text, "k8s4r_agent_heartbeats_sent_total"), 42);
  assert.equal(sample(text, "k8s4r_agent_malformed_messages_total"), 1);
  assert.equal(sample(text, "k8s4r_agent_start_time_seconds"), NOW / 1000);
});

Deno.test("agent metrics: a new SVID is a rotation, a bundle-only update is not", async () => {
  const { m, state, advance } = fixture();
  m.observeSvid();
  advance(60);
  m.observeSvid(); // the listener fired for a bundle change: same SVID
  let text = await m.render();
  assert.equal(sample(text, "k8s4r_agent_svid_rotations_total"), 0);
  assert.equal(sample(text, "k8s4r_agent_svid_last_rotation_timestamp_seconds"), NOW / 1000);
  advance(1740);
  state.svid = {
    notBefore: new Date(NOW + 1790_000),
    notAfter: new Date(NOW + 5400_000),
    serial: "02",
  };
  m.observeSvid();
  text = await m.render();
  assert.equal(sample(text, "k8s4r_agent_svid_rotations_total"), 1);
  assert.equal(sample(text, "k8s4r_agent_svid_last_rotation_timestamp_seconds"), NOW / 1000 + 1800);
  assert.equal(sample(text, "k8s4r_agent_svid_issued_timestamp_seconds"), NOW / 1000 + 1790);
});

Deno.test("agent metrics: a scrape sees a rotation the listener missed", async () => {
  const { m, state, advance } = fixture();
  await m.render(); // first SVID, taken up at NOW
  advance(30);
  state.svid = { ...state.svid!, serial: "03" };
  const text = await m.render();
  assert.equal(sample(text, "k8s4r_agent_svid_rotations_total"), 1);
  assert.equal(sample(text, "k8s4r_agent_svid_last_rotation_timestamp_seconds"), NOW / 1000 + 30);
});

Deno.test("agent metrics: before the first SVID and with the Workload API down", async () => {
  const { m, state } = fixture();
  state.svid = undefined;
  state.wl = false;
  state.connected = false;
  const text = await m.render();
  await assertPromtoolClean(text);
  assert.equal(sample(text, "k8s4r_agent_svid_expiry_timestamp_seconds"), undefined);
  assert.equal(sample(text, "k8s4r_agent_svid_last_rotation_timestamp_seconds"), undefined);
  assert.equal(sample(text, "k8s4r_agent_workload_api_up"), 0);
  assert.equal(sample(text, "k8s4r_agent_broker_connected"), 0);
  assert.deepEqual(m.heartbeatFields(), { workloadApi: "down", outboundQueueDepth: 7 });
});

Deno.test("agent metrics: heartbeat fields carry the SVID's notBefore, the API state, the queue", () => {
  const { m, state } = fixture();
  assert.deepEqual(m.heartbeatFields(), {
    svidIssuedAt: new Date(NOW - 600_000).toISOString(),
    workloadApi: "up",
    outboundQueueDepth: 7,
  });
  state.queue = -1; // a buggy source never yields an invalid field
  assert.equal(m.heartbeatFields().outboundQueueDepth, 0);
});

Deno.test("agent metrics: served on loopback, linted by promtool through HTTP", async () => {
  const { m } = fixture();
  const srv = serveMetrics(m, { hostname: "127.0.0.1", port: 0 });
  try {
    await assertEndpointPromtoolClean(srv.url);
    const res = await fetch(srv.url);
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
    assert.match(await res.text(), /^k8s4r_agent_outbound_queue_messages 7$/m);
  } finally {
    await srv.close();
  }
});
