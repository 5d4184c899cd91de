/**
 * FleetService without a network: status ordering (bootId/connection, the last will), the
 * broker link (unknown state, no offline during an outage), and batches whose registry write
 * fails (nothing acknowledged past the failure).
 */
import assert from "node:assert/strict";
import { bufferIo } from "../cli/io.ts";
import { FleetService, type Publisher } from "./fleet.ts";
import { Registry } from "./registry.ts";
import { renderRobotsTable, robotStateText } from "./command.ts";

class FakePublisher implements Publisher {
  sent: string[] = [];
  publish(topic: string): Promise<void> {
    this.sent.push(topic);
    return Promise.resolve();
  }
  connected() {
    return true;
  }
}

const T0 = Date.parse("2025-01-01T00:00:00Z");

const PROBE = "k8s4r/server/k8s4r-server/probe";

function setup(opts: { probe?: boolean } = {}) {
  const clock = { t: T0 };
  const registry = Registry.openFile(":memory:");
  const pub = new FakePublisher();
  const logs: string[] = [];
  const fleet = new FleetService(registry, pub, {
    now: () => new Date(clock.t),
    heartbeatIntervalSeconds: 10,
    logger: { info: (m) => logs.push(m), warn: (m) => logs.push(m) },
    ...(opts.probe ? { probeTopic: PROBE, probeStallMs: 2000 } : {}),
  });
  return { clock, registry, pub, fleet, logs };
}

const iso = (ms: number) => new Date(ms).toISOString();

function msg(robotId: string, kind: string, body: Record<string, unknown>, ts: number) {
  return {
    topic: `k8s4r/robots/${robotId}/up/${kind}`,
    payload: new TextEncoder().encode(JSON.stringify({ v: 1, robotId, ts: iso(ts), ...body })),
  };
}

const device = {
  hostname: "h",
  os: "linux",
  arch: "x86_64",
  cpus: 1,
  memoryBytes: 1,
  load: [0, 0, 0],
  uptimeSeconds: 1,
};

function register(id: string, ts: number, bootId?: string, connection?: number) {
  return msg(id, "register", {
    type: "register",
    spiffeId: `spiffe://k8s4r.test/robot/${id}`,
    agentVersion: "test",
    heartbeatIntervalSeconds: 5,
    svidExpiresAt: iso(T0 + 3600_000),
    device,
    ...(bootId !== undefined ? { bootId } : {}),
    ...(connection !== undefined ? { connection } : {}),
  }, ts);
}

function status(
  id: string,
  s: "online" | "offline",
  ts: number,
  bootId?: string,
  connection?: number,
  reason?: string,
) {
  return msg(id, "status", {
    type: "status",
    status: s,
    ...(reason ? { reason } : {}),
    ...(bootId !== undefined ? { bootId } : {}),
    ...(connection !== undefined ? { connection } : {}),
  }, ts);
}

function heartbeat(id: string, ts: number, seq: number, bootId?: string) {
  return msg(id, "heartbeat", {
    type: "heartbeat",
    seq,
    svidExpiresAt: iso(T0 + 3600_000),
    ...(bootId !== undefined ? { bootId } : {}),
  }, ts);
}

Deno.test("status ordering: the will of the current connection applies, even with an older ts", () => {
  const { fleet, registry, clock } = setup();
  try {
    const h = (m: { topic: string; payload: Uint8Array }) => {
      const r = fleet.handleMessage(m.topic, m.payload);
      assert.equal(r.ok, true, JSON.stringify(r));
    };
    const robot = () => registry.getRobot("robot-001")!;
    // The agent builds its will at CONNECT (ts T0), then registers and says online (ts later).
    const will1 = status("robot-001", "offline", T0, "boot-a", 1, "connection lost");
    h(register("robot-001", T0 + 10, "boot-a", 1));
    h(status("robot-001", "online", T0 + 20, "boot-a", 1));
    assert.equal(robot().online, true);
    // The register counts as the online of its connection: the online after it is no news.
    assert.equal(fleet.stats.statusReplays, 1);
    clock.t = T0 + 5000;
    h(will1);
    assert.equal(robot().online, false, "the will of connection 1 supersedes its online");
    assert.equal(robot().offlineReason, "connection lost");
    assert.equal(fleet.robotView(robot()).state, "offline");

    // A retained replay (every subscribe) changes nothing and is no sign of life.
    const seen = robot().lastSeen;
    clock.t = T0 + 9000;
    h(will1);
    assert.equal(robot().lastSeen, seen);
    assert.equal(fleet.stats.statusReplays, 2);

    // Connection 2: its register supersedes the will of connection 1 whatever the ts.
    h(register("robot-001", T0 + 30, "boot-a", 2));
    assert.equal(robot().online, true);
    // The old will arriving after the new register (redelivered late) is stale.
    h(will1);
    assert.equal(robot().online, true, "a will of connection 1 after the register of 2");
    assert.equal(fleet.stats.staleStatuses, 1);
    h(status("robot-001", "online", T0 + 40, "boot-a", 2));
    assert.equal(fleet.stats.statusReplays, 3, "online of 2 after register of 2: nothing new");
    // The will of connection 2 is applied.
    h(status("robot-001", "offline", T0 + 25, "boot-a", 2, "connection lost"));
    assert.equal(robot().online, false);
    // A register of connection 1 redelivered now is not a sign that the robot is online.
    h(register("robot-001", T0 + 10, "boot-a", 1));
    assert.equal(robot().online, false);
    assert.equal(fleet.stats.staleRegisters, 1);

    // The agent restarts: a new boot. Wills of the old boot are stale from now on.
    h(register("robot-001", T0 + 50, "boot-b", 1));
    assert.equal(robot().online, true);
    assert.equal(robot().bootId, "boot-b");
    h(status("robot-001", "offline", T0 + 60, "boot-a", 7, "connection lost"));
    assert.equal(robot().online, true, "a will of another boot");
    assert.equal(fleet.stats.staleStatuses, 2);
    // A heartbeat of the old boot does not revive a robot that its current boot's will downed.
    h(status("robot-001", "offline", T0 + 45, "boot-b", 1, "connection lost"));
    assert.equal(robot().online, false);
    h(heartbeat("robot-001", T0 + 70, 9, "boot-a"));
    assert.equal(robot().online, false);
    h(heartbeat("robot-001", T0 + 70, 1, "boot-b"));
    assert.equal(robot().online, true);
    const view = fleet.robotView(robot());
    assert.equal(view.bootId, "boot-b");
    assert.equal(view.connection, 1);
  } finally {
    registry.close();
  }
});

Deno.test("status ordering: messages without bootId/connection fall back to ts", () => {
  const { fleet, registry } = setup();
  try {
    fleet.handleMessage(register("robot-001", T0).topic, register("robot-001", T0).payload);
    const off = status("robot-001", "offline", T0 + 1000);
    fleet.handleMessage(off.topic, off.payload);
    assert.equal(registry.getRobot("robot-001")!.online, false);
    const older = status("robot-001", "online", T0 + 500);
    fleet.handleMessage(older.topic, older.payload);
    assert.equal(registry.getRobot("robot-001")!.online, false, "older ts ignored");
    assert.equal(fleet.stats.staleStatuses, 1);
    fleet.handleMessage(off.topic, off.payload);
    assert.equal(fleet.stats.statusReplays, 1);
    const newer = status("robot-001", "online", T0 + 2000);
    fleet.handleMessage(newer.topic, newer.payload);
    assert.equal(registry.getRobot("robot-001")!.online, true);
    // A status of a robot never registered creates it; its boot becomes the current one.
    const first = status("robot-002", "online", T0, "boot-x", 3);
    fleet.handleMessage(first.topic, first.payload);
    assert.equal(registry.getRobot("robot-002")!.bootId, "boot-x");
    assert.deepEqual(registry.getRobot("robot-002")!.statusOrder, { connection: 3, rank: 0 });
  } finally {
    registry.close();
  }
});

Deno.test("broker link down: nobody goes offline, state unknown since T; full grace after", () => {
  const { fleet, registry, clock } = setup();
  try {
    for (const id of ["robot-001", "robot-002"]) {
      const r = register(id, T0, `boot-${id}`, 1);
      fleet.handleMessage(r.topic, r.payload);
    }
    // Both announce 5 s heartbeats: offline after 15 s of silence when the link is up.
    const id = fleet.registry.createTask({
      id: "t1",
      robotId: "robot-001",
      command: ["sleep", "1"],
      env: {},
      timeoutSeconds: 1,
      createdAt: iso(T0),
      expiresAt: iso(T0 + 3600_000),
    }).id;
    registry.applyTaskEvent(id, "running", iso(T0));
    clock.t = T0 + 1000;
    fleet.linkDown();
    const down = fleet.linkState();
    assert.deepEqual(down, {
      connected: false,
      since: iso(T0 + 1000),
      delivering: false,
      confirmedAt: iso(T0 + 1000),
    });
    clock.t = T0 + 600_000; // ten minutes without a word from anyone
    const swept = fleet.sweep();
    assert.deepEqual(swept.offline, []);
    assert.deepEqual(swept.lost, [], "a running task is not lost while nothing can be heard");
    const v = fleet.robotView(registry.getRobot("robot-001")!);
    assert.equal(v.state, "unknown");
    assert.equal(v.unknownSince, iso(T0 + 1000));
    assert.equal(v.online, true, "the last known value");
    assert.match(
      robotStateText(v, T0 + 601_000),
      /^unknown since 2025-01-01T00:00:01Z \(10m ago\), last online$/,
    );
    assert.match(renderRobotsTable([v], T0 + 601_000), /robot-001\s+unknown since/);

    // Back: robot-001's queued heartbeat arrives 5 s later, robot-002 stays silent.
    fleet.linkUp();
    const up = clock.t;
    assert.equal(fleet.robotView(registry.getRobot("robot-001")!).state, "online");
    clock.t = up + 5000;
    const hb = heartbeat("robot-001", T0 + 2000, 1, "boot-robot-001");
    fleet.handleMessage(hb.topic, hb.payload);
    clock.t = up + 15_000; // exactly the grace (3 x 5 s) after the reconnect: not yet
    assert.deepEqual(fleet.sweep().offline, []);
    clock.t = up + 15_001;
    assert.deepEqual(fleet.sweep().offline, ["robot-002"]);
    assert.equal(registry.getRobot("robot-002")!.offlineReason, "missed 3 heartbeats");
    // The heartbeat that arrived after the reconnect counts from its arrival.
    assert.equal(registry.getRobot("robot-001")!.online, true);
    // Lost-task detection restarts with its own grace (60 s) from the reconnect.
    assert.deepEqual(fleet.sweep().lost, []);
    clock.t += 45_000;
    assert.deepEqual(fleet.sweep().lost, ["t1"]);
  } finally {
    registry.close();
  }
});

/** The server's own probe, echoed by the broker: it was published at `sentAt`. */
function probe(sentAt: number) {
  return { topic: PROBE, payload: new TextEncoder().encode(String(sentAt)) };
}

Deno.test("a frozen broker (no probe echo) marks nobody offline: unknown, then re-derived", () => {
  const { fleet, registry, clock } = setup({ probe: true });
  try {
    for (const id of ["robot-001", "robot-002"]) {
      const r = register(id, T0, `boot-${id}`, 1);
      fleet.handleMessage(r.topic, r.payload);
    }
    // Positive control: with echoes flowing, a silent robot goes offline after 3 x 5 s.
    fleet.handleBatch([probe(T0)]);
    assert.equal(fleet.linkState().delivering, true);
    // The broker freezes at T0 + 1 s: the connection stays up, nothing is delivered any more.
    clock.t = T0 + 1000;
    fleet.handleBatch([probe(T0 + 1000)]);
    // An echo claiming a time ahead of our clock is ignored.
    fleet.handleBatch([probe(T0 + 50_000)]);
    clock.t = T0 + 60_000;
    assert.deepEqual(fleet.sweep().offline, [], "silence through a frozen broker proves nothing");
    const v = fleet.robotView(registry.getRobot("robot-001")!);
    assert.equal(v.state, "unknown");
    assert.equal(v.unknownSince, iso(T0 + 1000));
    assert.equal(fleet.linkState().delivering, false);
    // It resumes: what was queued arrives in order (robot-001's heartbeat), then a fresh echo.
    const hb = heartbeat("robot-001", T0 + 2000, 1, "boot-robot-001");
    fleet.handleBatch([hb, probe(T0 + 59_500)]);
    assert.equal(fleet.robotView(registry.getRobot("robot-001")!).state, "online");
    assert.deepEqual(fleet.sweep().offline, ["robot-002"], "robot-002 said nothing since T0");
    assert.equal(registry.getRobot("robot-001")!.online, true);
  } finally {
    registry.close();
  }
});

Deno.test("a frozen server: the first sweep after SIGCONT runs before the queued heartbeats", () => {
  const { fleet, registry, clock } = setup({ probe: true });
  try {
    const r = register("robot-001", T0, "boot-1", 1);
    fleet.handleMessage(r.topic, r.payload);
    fleet.handleBatch([probe(T0)]);
    // SIGSTOP at T0 + 1 s, SIGCONT at T0 + 30 s: the sweep timer fires before any socket read.
    clock.t = T0 + 30_000;
    assert.deepEqual(fleet.sweep().offline, []);
    // Then the heartbeats robot-001 sent meanwhile, and an echo of a probe sent after SIGCONT.
    const hb = heartbeat("robot-001", T0 + 29_000, 5, "boot-1");
    fleet.handleBatch([hb, probe(T0 + 30_001)]);
    clock.t = T0 + 31_000;
    assert.deepEqual(fleet.sweep().offline, []);
    assert.equal(registry.getRobot("robot-001")!.online, true);
  } finally {
    registry.close();
  }
});

Deno.test("a batch stops at the message whose write fails: nothing after it is acknowledged", () => {
  const { fleet, registry, pub } = setup();
  try {
    const r1 = register("robot-001", T0, "b", 1);
    fleet.handleMessage(r1.topic, r1.payload);
    registry.createTask({
      id: "t1",
      robotId: "robot-001",
      command: ["true"],
      env: {},
      timeoutSeconds: 5,
      createdAt: iso(T0),
      expiresAt: iso(T0 + 3600_000),
    });
    const orig = registry.recordHeartbeat.bind(registry);
    let calls = 0;
    const failOn = new Set([2, 4]);
    registry.recordHeartbeat = (...a) => {
      orig(...a); // written, then the failure: the savepoint must roll it back
      if (failOn.has(++calls)) throw new Error("disk I/O error (injected)");
    };
    const items = [
      heartbeat("robot-001", T0 + 1, 1), // applied
      { topic: "k8s4r/robots/robot-001/up/heartbeat", payload: new TextEncoder().encode("{") },
      heartbeat("robot-001", T0 + 2, 2), // fails
      register("robot-001", T0 + 3, "b", 2), // not applied: after the failure
    ];
    const before = pub.sent.length;
    const r = fleet.handleBatch(items);
    assert.equal(r.acked, 2);
    assert.deepEqual(r.results, [{ ok: true }, { ok: false, reason: "bad-json" }]);
    assert.match(r.error!, /disk I\/O error/);
    assert.equal(fleet.stats.applyErrors, 1);
    assert.equal(fleet.stats.received.heartbeat, 1);
    assert.equal(fleet.stats.received.register, 1, "the register after the failure not counted");
    assert.equal(fleet.stats.dropped["bad-json"], 1);
    assert.equal(registry.getRobot("robot-001")!.heartbeatsReceived, 1);
    assert.equal(registry.getRobot("robot-001")!.statusOrder?.connection, 1);
    assert.equal(pub.sent.length, before, "no dispatch for a register that was not applied");
    // Redelivered: applied once.
    const again = fleet.handleBatch(items.slice(2));
    assert.equal(again.acked, 2);
    assert.equal(registry.getRobot("robot-001")!.heartbeatsReceived, 2);
    assert.equal(registry.getRobot("robot-001")!.statusOrder?.connection, 2);
    // The single-message form reports the error and writes nothing.
    const one = heartbeat("robot-001", T0 + 4, 3);
    const res = fleet.handleMessage(one.topic, one.payload);
    assert.equal(res.ok, false);
    assert.match(res.error!, /injected/);
    assert.equal(registry.getRobot("robot-001")!.heartbeatsReceived, 2);
  } finally {
    registry.close();
  }
});

Deno.test("robots table: offline reason and state of servers that predate `state`", () => {
  const base = { id: "r", lastSeen: iso(T0), svidExpiresAt: null, agentVersion: null };
  assert.equal(
    robotStateText({ ...base, state: "offline", online: false, offlineReason: "connection lost" }),
    "offline (connection lost)",
  );
  assert.equal(robotStateText({ ...base, online: true, offlineReason: null }), "online");
  const io = bufferIo();
  io.stdout.write(renderRobotsTable([{ ...base, online: false, offlineReason: null }], T0));
  assert.match(io.out(), /^r\s+offline\s+/m);
});
