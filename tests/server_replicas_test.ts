/**
 * Fleet-server replicas (`--shared-subscription` on one PostgreSQL registry) against a REAL
 * Mosquitto and a REAL PostgreSQL 15: three FleetServers in this process, each with its own
 * client id, session, HTTPS API and database pool; robots are plain mqtt.js clients over mTLS.
 *
 * - What Mosquitto does with a shared subscriber that dies (raw clients, no k8s4r).
 * - Each message handled once; heartbeats split across replicas are each counted once; every
 *   replica's API shows the same state.
 * - A replica "killed" (`FleetServer.crash()`: sockets cut without DISCONNECT, nothing written,
 *   its sweeper lock gone with its connection) during a task stream: the sweeper adopts its
 *   session on its last will; no heartbeat lost, every task done, none run twice.
 * - A replica cut from the broker: nobody is marked offline on its account, every API says
 *   `unknown`; once it is back, silence is judged again (positive control).
 * - Retained statuses, which a shared subscription never gets, are read at start.
 * - Tasks created through all replicas at once while robots re-register: each published once.
 */
import assert from "node:assert/strict";
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { waitFor } from "../src/process/mod.ts";
import { checkDown, TaskSigner } from "../src/mqtt/signed.ts";
import { fleetServerSpiffeId } from "../src/fleet/ids.ts";
import { robotSubscription, upTopic } from "../src/fleet/topics.ts";
import { FleetServer } from "../src/server/fleet_server.ts";
import type { PostgresConfig } from "../src/server/registry_postgres.ts";
import { TestHttps } from "../src/server/testing.ts";
import { startTestBroker, TEST_TRUST_DOMAIN, type TestBroker } from "./helpers/broker.ts";
import { startTestPostgres, type TestPostgres } from "./helpers/postgres.ts";
import { captureLog, ProtoRobot } from "./helpers/proto_robot.ts";
import { TcpProxy } from "./helpers/tcp_proxy.ts";

// mqtt.js keeps internal timers a little past end(); every process and client is closed below.
const opts = { sanitizeOps: false, sanitizeResources: false };
const web = new TestHttps(TEST_TRUST_DOMAIN);
const enc = (v: unknown) => JSON.stringify(v);
const sleepUntil = (t: number) =>
  waitFor(() => Date.now() >= t, {
    timeoutMs: t - Date.now() + 5000,
    intervalMs: 50,
    what: "time",
  });

/** Version of the mosquitto on PATH (the one the tests run). */
async function mosquittoVersion(): Promise<string> {
  const out = await new Deno.Command("mosquitto", {
    args: ["-h"],
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  const t = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  return /mosquitto version (\S+)/.exec(t)?.[1] ?? "unknown";
}

interface Replica {
  n: number;
  server: FleetServer;
  api: string;
  log: ReturnType<typeof captureLog>;
}

class Cluster {
  readonly replicas: Replica[] = [];
  private constructor(
    readonly b: TestBroker,
    readonly pgs: TestPostgres,
    readonly postgres: PostgresConfig,
  ) {}

  static async create(): Promise<Cluster> {
    const b = await startTestBroker();
    const pgs = await startTestPostgres();
    const db = await pgs.createDatabase("rep");
    return new Cluster(b, pgs, pgs.config(db));
  }

  async start(
    n: number,
    extra: { sweepIntervalMs?: number; brokerUrl?: string } = {},
  ): Promise<Replica> {
    const log = captureLog();
    const server = await FleetServer.start({
      brokerUrl: extra.brokerUrl ?? this.b.plainUrl,
      username: this.b.server.username,
      password: this.b.server.password,
      dataDir: "/nonexistent",
      postgres: this.postgres,
      sharedSubscription: true,
      clientId: `k8s4r-server-${n}`,
      http: web.options(),
      sweepIntervalMs: extra.sweepIntervalMs ?? 200,
      reconnectPeriodMs: 200,
      replicaTickMs: 200,
      leaseMs: 1500,
      logger: log.logger,
      fleet: { heartbeatIntervalSeconds: 1, signer: new TaskSigner(web.source) },
    });
    await server.waitConnected(10_000);
    const r = { n, server, api: server.http!.url, log };
    this.replicas.push(r);
    return r;
  }

  live(): Replica[] {
    return this.replicas.filter((r) => !(r as { dead?: boolean }).dead);
  }

  logs(): string {
    return this.replicas.map((r) =>
      `--- replica ${r.n}\n${
        r.log.lines.slice(-40).map((l) => `${new Date(l.at).toISOString()} ${l.msg}`).join("\n")
      }`
    ).join("\n");
  }

  async until(what: string, probe: () => boolean | Promise<boolean>, timeoutMs = 20_000) {
    await waitFor(probe, { timeoutMs, intervalMs: 100, what }).catch(async (err) => {
      throw new Error(
        `${(err as Error).message}\n${this.logs()}\n--- mosquitto\n${await this.b.logTail()}`,
      );
    });
  }

  async close(): Promise<void> {
    for (const r of this.live()) await r.server.close();
    await this.b.stop();
    await this.pgs.destroy();
  }
}

async function robotView(api: string, id: string) {
  const r = await web.json(`${api}/api/robots/${id}`);
  return r.body;
}

/**
 * A robot that also takes tasks as the agent does: each task id runs at most once (it is
 * remembered before it "runs"), a second delivery of the same id is counted and not run; it
 * reports accepted, then done.
 */
class TaskRobot {
  readonly received = new Map<string, number>();
  readonly ran: string[] = [];
  private constructor(readonly robot: ProtoRobot) {
    const c = robot.client;
    c.on("message", (topic, payload) => {
      // Signed by the server's SVID (TestHttps'), verified as the agent does.
      const d = checkDown(topic, new Uint8Array(payload), {
        robotId: robot.id,
        bundles: web.source,
        signerId: fleetServerSpiffeId(TEST_TRUST_DOMAIN),
      });
      if (!d.ok || d.message.type !== "task") return;
      const id = d.message.id;
      this.received.set(id, (this.received.get(id) ?? 0) + 1);
      if (this.received.get(id)! > 1) return; // at most once, like task-ids.json
      this.ran.push(id);
      const report = (state: string, extra = {}) =>
        c.publish(
          upTopic(robot.id, "task"),
          enc({
            v: 1,
            type: "task-status",
            robotId: robot.id,
            ts: new Date().toISOString(),
            taskId: id,
            state,
            ...extra,
          }),
          { qos: 1 },
        );
      report("accepted");
      report("done", { exitCode: 0, stdout: "", stderr: "" });
    });
  }

  static async start(b: TestBroker, id: string): Promise<TaskRobot> {
    const r = await ProtoRobot.start(b, id, {
      heartbeatIntervalSeconds: 1,
      reconnectPeriodMs: 200,
    });
    await r.client.subscribeAsync(robotSubscription(id), { qos: 1 });
    return new TaskRobot(r);
  }
}

Deno.test({
  name:
    "mosquitto: a dead shared subscriber keeps its in-flight messages, and its share of new ones, for its own client id only",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    const version = await mosquittoVersion();
    const cred = { username: b.server.username, password: b.server.password };
    const members: Record<string, MqttClient> = {};
    const got: Record<string, string[]> = { s1: [], s2: [], s3: [] };
    const member = async (id: string, ack: boolean) => {
      // manualConnect: handlers attached before the broker can redeliver anything.
      const c = mqtt.connect(b.plainUrl, {
        ...cred,
        clientId: id,
        clean: false,
        protocolVersion: 5,
        properties: { sessionExpiryInterval: 3600 },
        reconnectPeriod: 0,
        manualConnect: true,
      });
      c.handleMessage = (p, cb) => {
        got[id].push(`${p.payload.toString()}${p.dup ? "(dup)" : ""}`);
        cb(ack ? undefined : new Error("not acknowledged"));
      };
      await new Promise((res, rej) => {
        c.once("connect", res);
        c.once("error", rej);
        c.connect();
      });
      await c.subscribeAsync("$share/g/k8s4r/robots/+/up/#", { qos: 1 });
      members[id] = c;
    };
    const pub = await mqtt.connectAsync(b.plainUrl, {
      ...cred,
      clientId: "pub",
      protocolVersion: 5,
    });
    const send = (from: number, to: number) =>
      Promise.all(
        Array.from({ length: to - from }, (_, i) =>
          pub.publishAsync("k8s4r/robots/r1/up/heartbeat", String(from + i), { qos: 1 })),
      );
    try {
      await member("s1", true);
      await member("s2", false); // takes its share and never acknowledges it
      await member("s3", true);
      await send(0, 6);
      await waitFor(() => got.s1.length + got.s2.length + got.s3.length === 6, {
        timeoutMs: 5000,
        what: "the first 6 messages, one member each",
      });
      const inFlight = [...got.s2];
      assert.equal(inFlight.length, 2, `round robin over 3 members: ${JSON.stringify(got)}`);
      // s2 dies: its socket is cut without DISCONNECT, as by kill -9.
      members.s2.stream.destroy();
      await waitFor(() => !members.s2.connected, { timeoutMs: 5000, what: "s2 to be gone" });
      const before = { s1: got.s1.length, s3: got.s3.length };
      await send(10, 19);
      await waitFor(() => got.s1.length + got.s3.length - before.s1 - before.s3 >= 6, {
        timeoutMs: 5000,
        what: "the live members' share",
      });
      const others = [...got.s1, ...got.s3];
      // The round robin goes on over the dead member: 3 of the 9 new ones are its.
      const missing = Array.from({ length: 9 }, (_, i) => String(10 + i))
        .filter((m) => !others.includes(m));
      assert.equal(missing.length, 3, `the live members got ${JSON.stringify(got)}`);
      for (const m of inFlight) assert.ok(!others.includes(m), `${m} went to another member`);
      // Only the same client id gets them: first its in-flight (DUP), then what was routed to
      // it while it was gone.
      got.s2 = [];
      await member("s2", true);
      await waitFor(() => got.s2.length >= inFlight.length, {
        timeoutMs: 5000,
        what: "the in-flight messages redelivered to s2",
      });
      assert.deepEqual(got.s2.slice(0, inFlight.length), inFlight.map((m) => `${m}(dup)`));
      await waitFor(() => got.s2.length >= inFlight.length + missing.length, {
        timeoutMs: 3000,
        what: "the messages routed to s2 while it was gone",
      }).catch(() => {});
      console.log(
        `  mosquitto ${version}: dead member's in-flight redelivered to its client id: ${inFlight}; ` +
          `routed to it while dead: ${missing}; after its reconnect it got ${
            JSON.stringify(got.s2)
          }`,
      );
      assert.deepEqual(
        got.s2.slice(inFlight.length),
        missing,
        `mosquitto ${version} lost the messages it queued for the offline session (2.0.21 does ` +
          "so with per_listener_settings true: /work/wt/NOTES.md); with them lost, no replica can " +
          "recover them",
      );
    } finally {
      for (const c of Object.values(members)) c.end(true);
      pub.end(true);
      await b.stop();
    }
  },
});

Deno.test({
  name:
    "replicas: each message handled once; heartbeats split across replicas all counted; every API shows the same state",
  ...opts,
  async fn() {
    const c = await Cluster.create();
    const robots: ProtoRobot[] = [];
    try {
      for (const n of [1, 2, 3]) await c.start(n);
      for (const id of ["robot-001", "robot-002", "robot-003", "robot-004"]) {
        robots.push(await ProtoRobot.start(c.b, id, { heartbeatIntervalSeconds: 1 }));
      }
      await c.until("every robot online on every replica", async () => {
        for (const r of c.replicas) {
          for (const robot of robots) {
            if ((await robotView(r.api, robot.id)).state !== "online") return false;
          }
        }
        return true;
      });
      // Fast heartbeats (every 20 ms per robot) for 3 s: the broker spreads them over the
      // three sessions, so each robot's seqs are applied by all three, out of order.
      const t0 = Date.now();
      const sent = new Map(robots.map((r) => [r.id, 0]));
      while (Date.now() - t0 < 3000) {
        for (const r of robots) {
          r.seq++;
          sent.set(r.id, r.seq);
          r.client.publish(
            upTopic(r.id, "heartbeat"),
            enc({
              v: 1,
              type: "heartbeat",
              robotId: r.id,
              ts: new Date().toISOString(),
              seq: r.seq,
              bootId: r.bootId,
              svidExpiresAt: new Date(Date.now() + 3600_000).toISOString(),
            }),
            { qos: 1 },
          );
        }
        await new Promise((res) => setTimeout(res, 20));
      }
      const total = [...sent.values()].reduce((a, b) => a + b, 0);
      await c.until("every heartbeat written", async () => {
        for (const r of robots) {
          if ((await robotView(c.replicas[0].api, r.id)).heartbeats.received < sent.get(r.id)!) {
            return false;
          }
        }
        return true;
      });
      const perReplica = c.replicas.map((r) => r.server.fleet.stats.received.heartbeat);
      console.log(`  ${total} heartbeats; applied by replica: ${perReplica.join(", ")}`);
      // Each message handled once: the replicas' counts add up to what was sent.
      assert.equal(perReplica.reduce((a, b) => a + b, 0), total);
      for (const n of perReplica) assert.ok(n > total / 6, `a replica got only ${n} of ${total}`);
      for (const r of robots) {
        const v = await robotView(c.replicas[1].api, r.id);
        assert.equal(v.heartbeats.received, sent.get(r.id));
        assert.equal(v.heartbeats.missing, 0, `${r.id}: ${JSON.stringify(v.heartbeats)}`);
      }
      const conflicts = c.replicas.map((r) => r.server.fleet.stats.conflictRetries);
      const errors = c.replicas.map((r) => r.server.fleet.stats.applyErrors);
      console.log(`  conflict retries ${conflicts}, apply errors ${errors}`);
      assert.deepEqual(errors, [0, 0, 0], "a write failed (deadlock not retried?)");
      // The same registry state on every replica's API (the last known online value and the
      // counts; the derived `state` may read `unknown` on one replica for a moment under load,
      // each replica reading the fleet's clock at its own tick), and the same derived state once
      // they settle; one sweeper.
      const views = await Promise.all(
        c.replicas.map(async (r) =>
          (await web.json(`${r.api}/api/robots`)).body.robots.map((x: Record<string, unknown>) =>
            `${x.id}:${x.online}:${(x.heartbeats as { received: number }).received}`
          )
        ),
      );
      assert.deepEqual(views[1], views[0]);
      assert.deepEqual(views[2], views[0]);
      await c.until("every robot online on every replica again", async () => {
        for (const r of c.replicas) {
          for (const robot of robots) {
            if ((await robotView(r.api, robot.id)).state !== "online") return false;
          }
        }
        return true;
      });
      const stats = await Promise.all(c.replicas.map((r) => web.json(`${r.api}/api/stats`)));
      const sweepers = stats.filter((s) => s.body.replicas.sweeper).length;
      assert.equal(sweepers, 1, JSON.stringify(stats.map((s) => s.body.replicas)));
      assert.equal(stats[0].body.replicas.replicas.length, 3);
    } finally {
      for (const r of robots) await r.close();
      await c.close();
    }
  },
});

/**
 * Three replicas, three robots, a task every 100 ms through every replica's API in turn, for
 * about 6 s; with `kill`, the sweeper (the hardest case: the lock, the adoption and the sweep
 * move) is "killed" after 10 tasks. Then everything must settle: every heartbeat sent written
 * (none missing), every task done, each run exactly once, every robot online.
 */
async function taskStream(kill: boolean): Promise<void> {
  const c = await Cluster.create();
  const robots: TaskRobot[] = [];
  const tasks: { id: string; robot: string }[] = [];
  let streaming = true;
  let stream: Promise<void> | undefined;
  try {
    for (const n of [1, 2, 3]) await c.start(n);
    for (const id of ["robot-001", "robot-002", "robot-003"]) {
      robots.push(await TaskRobot.start(c.b, id));
    }
    for (const r of robots) r.robot.startHeartbeats();
    await c.until("robots online", async () => {
      for (const r of robots) {
        if ((await robotView(c.replicas[0].api, r.robot.id)).state !== "online") return false;
      }
      return true;
    });
    // One of them takes the sweeper's lock on its next tick: wait for it (a snapshot taken just
    // before that, on a loaded machine, found none).
    let vi = -1;
    await c.until("a sweeper among the replicas", async () => {
      const stats = await Promise.all(c.replicas.map((r) => web.json(`${r.api}/api/stats`)));
      vi = stats.findIndex((s) => s.body.replicas.sweeper);
      return vi >= 0;
    });
    const victim = c.replicas[vi];
    const survivors = c.replicas.filter((r) => r !== victim);
    let dead = false;
    let k = 0;
    stream = (async () => {
      while (streaming) {
        const via = [...survivors, ...(dead ? [] : [victim])][k % 3] ?? survivors[0];
        const robot = robots[k % robots.length].robot.id;
        k++;
        const r = await web.fetch(`${via.api}/api/robots/${robot}/tasks`, {
          method: "POST",
          body: enc({ command: ["true"], timeoutSeconds: 30 }),
        }).catch(() => undefined);
        if (r?.status === 201) tasks.push({ id: (await r.json()).id, robot });
        else await r?.body?.cancel();
        await new Promise((res) => setTimeout(res, 100));
      }
    })();
    await c.until("10 tasks", () => tasks.length >= 10);
    const t0 = Date.now();
    let adoptedMs = -1;
    if (kill) {
      dead = true;
      (victim as { dead?: boolean }).dead = true;
      await victim.server.crash();
      // Recovery: a survivor sweeps and serves the victim's session (adopted on its last will).
      await c.until(
        "the victim's session adopted",
        () => survivors.some((s) => s.server.adoptions.has(`k8s4r-server-${victim.n}`)),
      );
      adoptedMs = Date.now() - t0;
    }
    await sleepUntil(t0 + 3000); // more tasks and heartbeats meanwhile
    streaming = false;
    await stream;
    const sent = () => robots.map((r) => r.robot.seq);
    await c.until("every heartbeat written, none missing", async () => {
      for (const [i, r] of robots.entries()) {
        const v = await robotView(survivors[0].api, r.robot.id);
        if (v.heartbeats.received < sent()[i] - 1 || v.heartbeats.missing !== 0) return false;
      }
      return true;
    }, 30_000);
    const heartbeatsMs = Date.now() - t0;
    await c.until("every task done", async () => {
      for (const t of tasks) {
        const v = await web.json(`${survivors[0].api}/api/tasks/${t.id}`);
        if (v.body.state !== "done") return false;
      }
      return true;
    }, 60_000);
    const tasksMs = Date.now() - t0;
    const ran = robots.flatMap((r) => r.ran);
    const twice = robots.flatMap((r) => [...r.received.values()]).filter((n) => n > 1).length;
    console.log(
      `  ${
        kill
          ? `killed replica ${victim.n} (the sweeper): adopted after ${adoptedMs} ms; `
          : "no kill: "
      }` +
        `heartbeats all written ${heartbeatsMs} ms after the ${kill ? "kill" : "10th task"}, ` +
        `${tasks.length} tasks done after ${tasksMs} ms; ${twice} task(s) delivered twice ` +
        "(run once)",
    );
    assert.ok(tasks.length >= 30, `only ${tasks.length} tasks were created`);
    assert.equal(ran.length, tasks.length, "a task ran twice, or one never ran");
    assert.equal(new Set(ran).size, ran.length);
    for (const t of tasks) assert.ok(ran.includes(t.id), `task ${t.id} never ran`);
    for (const r of robots) {
      const v = await robotView(survivors[1].api, r.robot.id);
      assert.equal(v.state, "online", `${r.robot.id} went ${v.state}`);
      assert.equal(v.heartbeats.missing, 0);
    }
    if (!kill) {
      // The control: nobody adopted anything, every replica published a share of the tasks.
      for (const r of c.replicas) assert.deepEqual([...r.server.adoptions.keys()], []);
      const published = c.replicas.map((r) => r.server.fleet.stats.tasksDispatched);
      assert.equal(published.reduce((a, b) => a + b, 0), tasks.length, `${published}`);
    }
  } finally {
    streaming = false;
    await stream;
    for (const r of robots) await r.robot.close();
    await c.close();
  }
}

Deno.test({
  name:
    "replicas: kill -9 of one replica during a task stream: its session is adopted; no heartbeat or task lost, none run twice",
  ...opts,
  fn: () => taskStream(true),
});

Deno.test({
  name:
    "replicas: the same task stream without a kill (control): every task once, no heartbeat lost",
  ...opts,
  fn: () => taskStream(false),
});

Deno.test({
  name:
    "replicas: one cut from the broker marks nobody offline and every API says unknown; back, silence is judged again",
  ...opts,
  async fn() {
    const c = await Cluster.create();
    const robots: ProtoRobot[] = [];
    // Replica 3 reaches the broker through a proxy that can stop moving bytes: a network that
    // stops delivering while the TCP connection stays up (no last will, no disconnect).
    const proxy = TcpProxy.start({ hostname: "127.0.0.1", port: c.b.plainPort });
    try {
      for (const n of [1, 2]) await c.start(n);
      await c.start(3, { brokerUrl: proxy.url });
      for (const id of ["robot-001", "robot-002"]) {
        const r = await ProtoRobot.start(c.b, id, { heartbeatIntervalSeconds: 1 });
        r.startHeartbeats();
        robots.push(r);
      }
      await c.until("robots online", async () => {
        for (const r of robots) {
          if ((await robotView(c.replicas[0].api, r.id)).state !== "online") return false;
        }
        return true;
      });
      // Replica 3 stops hearing the broker (its lease, and the database, are fine). Silence
      // from robot-002 from now on: 3 missed heartbeats are 3 s.
      const cut = c.replicas[2];
      proxy.freeze();
      robots[1].stopHeartbeats();
      const t0 = Date.now();
      await c.until("every replica's API to say unknown", async () => {
        for (const r of c.replicas) {
          if ((await robotView(r.api, "robot-001")).state !== "unknown") return false;
        }
        return true;
      });
      const unknownMs = Date.now() - t0;
      await sleepUntil(t0 + 6000);
      for (const r of c.replicas) {
        const v = await robotView(r.api, "robot-002");
        assert.equal(v.state, "unknown", `replica ${r.n}: ${JSON.stringify(v)}`);
        assert.equal(v.online, true, "marked offline while part of the traffic was unheard");
      }
      // Back: the fleet's clock moves again; robot-002's silence counts (positive control),
      // robot-001, which kept talking (its heartbeats queued in replica 3's session too), does not.
      proxy.thaw();
      await c.until("robot-002 offline (missed heartbeats)", async () => {
        const v = await robotView(c.replicas[0].api, "robot-002");
        return v.state === "offline" && v.offlineReason === "missed 3 heartbeats";
      });
      const a = await robotView(c.replicas[1].api, "robot-001");
      assert.equal(a.state, "online");
      assert.equal(a.heartbeats.missing, 0, JSON.stringify(a.heartbeats));
      assert.equal(cut.server.connected(), true, "the frozen connection was dropped meanwhile");
      console.log(`  all replicas said unknown ${unknownMs} ms after one lost the broker`);
    } finally {
      for (const r of robots) await r.close();
      await c.close();
      proxy.close();
    }
  },
});

Deno.test({
  name: "replicas: retained statuses are read although a shared subscription is sent none",
  ...opts,
  async fn() {
    const c = await Cluster.create();
    const robots: ProtoRobot[] = [];
    try {
      // Before any replica exists: robot-001's online is retained, robot-002's is not.
      const r1 = await ProtoRobot.start(c.b, "robot-001");
      robots.push(r1);
      const r2 = await ProtoRobot.start(c.b, "robot-002");
      robots.push(r2);
      await r2.client.publishAsync(upTopic("robot-002", "status"), "", { qos: 1, retain: true });
      for (const n of [1, 2]) await c.start(n);
      await c.until("robot-001 online on both replicas", async () => {
        for (const r of c.replicas) {
          if ((await robotView(r.api, "robot-001")).state !== "online") return false;
        }
        return true;
      });
      // Positive control: what was not retained is not invented.
      for (const r of c.replicas) {
        assert.equal((await web.json(`${r.api}/api/robots/robot-002`)).status, 404);
      }
      assert.ok(
        c.replicas.some((r) => r.log.lines.some((l) => /retained statuses: 1 read/.test(l.msg))),
      );
    } finally {
      for (const r of robots) await r.close();
      await c.close();
    }
  },
});

Deno.test({
  name:
    "replicas: tasks created through every replica while robots re-register: each published once",
  ...opts,
  async fn() {
    const c = await Cluster.create();
    const robots: TaskRobot[] = [];
    try {
      for (const n of [1, 2, 3]) await c.start(n);
      for (const id of ["robot-001", "robot-002"]) robots.push(await TaskRobot.start(c.b, id));
      await c.until("robots online", async () => {
        for (const r of robots) {
          if ((await robotView(c.replicas[0].api, r.robot.id)).state !== "online") return false;
        }
        return true;
      });
      const ids: string[] = [];
      // 60 tasks at once through the three APIs; meanwhile the robots register again and again
      // (each register makes the replica that applies it dispatch the robot's pending tasks).
      const registering = (async () => {
        for (let i = 0; i < 10; i++) {
          for (const r of robots) {
            r.robot.client.publish(upTopic(r.robot.id, "register"), r.robot.register(), { qos: 1 });
          }
          await new Promise((res) => setTimeout(res, 30));
        }
      })();
      await Promise.all(Array.from({ length: 60 }, async (_, i) => {
        const via = c.replicas[i % 3];
        const robot = robots[i % 2].robot.id;
        const r = await web.json(`${via.api}/api/robots/${robot}/tasks`, {
          method: "POST",
          body: enc({ command: ["true"], timeoutSeconds: 30 }),
        });
        assert.equal(r.status, 201, JSON.stringify(r.body));
        ids.push(r.body.id);
      }));
      await registering;
      await c.until("every task done", async () => {
        for (const id of ids) {
          if ((await web.json(`${c.replicas[0].api}/api/tasks/${id}`)).body.state !== "done") {
            return false;
          }
        }
        return true;
      });
      const published = c.replicas.reduce((n, r) => n + r.server.fleet.stats.tasksDispatched, 0);
      const twice = robots.flatMap((r) => [...r.received.entries()]).filter(([, n]) => n > 1);
      console.log(
        `  60 tasks: published ${published} times in all (${
          c.replicas.map((r) => r.server.fleet.stats.tasksDispatched).join(" + ")
        })`,
      );
      assert.deepEqual(twice, [], "a task was delivered twice");
      assert.equal(published, 60);
      // dispatchCount counts PUBACKs recorded before the robot's report (a robot that answers
      // first leaves it at 0): never more than one publish per task.
      for (const id of ids) {
        const n = (await web.json(`${c.replicas[2].api}/api/tasks/${id}`)).body.dispatchCount;
        assert.ok(n === 0 || n === 1, `task ${id}: dispatchCount ${n}`);
      }
      for (const r of robots) {
        for (const [id, n] of r.received) assert.equal(n, 1, `task ${id} delivered ${n} times`);
      }
      assert.equal(robots.reduce((n, r) => n + r.received.size, 0), 60);
    } finally {
      for (const r of robots) await r.robot.close();
      await c.close();
    }
  },
});

Deno.test({
  name:
    "replicas: --shared-subscription on SQLite is refused (one registry per server would split the fleet)",
  ...opts,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "k8s4r-rep-" });
    try {
      await assert.rejects(
        () =>
          FleetServer.start({
            brokerUrl: "mqtt://127.0.0.1:1",
            password: "unused",
            dataDir: dir,
            sharedSubscription: true,
            http: false,
            fleet: { signer: new TaskSigner(web.source) },
          }),
        /--shared-subscription needs the PostgreSQL registry/,
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
