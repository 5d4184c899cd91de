/**
 * The real `k8s4r agent` CLI as a child process, killed with SIGKILL, against a REAL Mosquitto
 * (k8s4r's generated config). Its SVID comes from a fake Workload API on a unix socket (the
 * identity is not what is tested here). A client on the password listener plays the fleet
 * server: it sends tasks and records what arrives.
 *
 * - the broker publishes the will of the last connection (same bootId and connection number as
 *   the last `online`), and a rotation cycle publishes none;
 * - tasks die with the agent, and the restarted agent reports them `failed: agent restarted`;
 * - results finished while the broker is down survive agent restarts (the durable queue).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { startTestBroker, TEST_TRUST_DOMAIN, type TestBroker } from "./helpers/broker.ts";
import { FakeWorkloadApi } from "../src/spiffe/testing/fake_workload_api.ts";
import { processStartTime, waitFor } from "../src/process/mod.ts";
import { agentRunArgs, agentV8FlagsEnv } from "../src/agent/runtime_flags.ts";
import {
  decodeUp,
  encode,
  type HeartbeatMessage,
  now,
  PROTOCOL_VERSION,
  type RegisterMessage,
  type StatusMessage,
  type TaskMessage,
  type TaskStatusMessage,
  type UpMessage,
} from "../src/mqtt/messages.ts";
import { downTopic } from "../src/fleet/topics.ts";
import { Outbox, OUTBOX_FILE } from "../src/agent/outbox.ts";
import { killInterrupted, TaskJournal } from "../src/agent/task_journal.ts";

const ROBOT = "robot-001";
const MAIN = new URL("../main.ts", import.meta.url).pathname;
const opts = { sanitizeOps: false, sanitizeResources: false };

/** One `k8s4r agent` process; its stderr is collected in `log`. */
class AgentProcess {
  log = "";
  readonly exited: Promise<Deno.CommandStatus>;
  private constructor(readonly child: Deno.ChildProcess) {
    const pump = (async () => {
      const dec = new TextDecoder();
      for await (const chunk of child.stderr) this.log += dec.decode(chunk, { stream: true });
    })();
    this.exited = child.status.then(async (s) => {
      await pump.catch(() => {});
      return s;
    });
  }

  static spawn(dir: string, broker: TestBroker, fake: FakeWorkloadApi): AgentProcess {
    // The agent's runtime flags, as devenv and the unit of `agent service` run it.
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        ...agentRunArgs(["run", "-A", MAIN]),
        "agent",
        "--robot-id",
        ROBOT,
        "--config",
        "plugins.yaml",
        "--socket",
        fake.socketPath,
        "--no-manage-spire",
        "--broker-url",
        `tls://127.0.0.1:${broker.tlsPort}`,
        "--heartbeat-seconds",
        "1",
      ],
      cwd: dir,
      env: { DENO_V8_FLAGS: agentV8FlagsEnv(Deno.env.get("DENO_V8_FLAGS")) },
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    return new AgentProcess(child);
  }

  get pid() {
    return this.child.pid;
  }

  async kill9() {
    try {
      Deno.kill(this.child.pid, "SIGKILL"); // our own child, by the pid we spawned
    } catch { /* already gone */ }
    await this.exited;
  }

  async stop(): Promise<number> {
    try {
      Deno.kill(this.child.pid, "SIGTERM");
    } catch { /* already gone */ }
    return (await this.exited).code;
  }

  async waitLog(re: RegExp, what: string, timeoutMs = 30_000) {
    await waitFor(() => re.test(this.log), { timeoutMs, what }).catch((err) => {
      throw new Error(`${err.message}; agent log:\n${this.log}`);
    });
  }
}

/** The fleet server's stand-in: records every message on the robot's up topics, in order. */
class Server {
  readonly got: { at: number; m: UpMessage }[] = [];
  private constructor(readonly client: MqttClient) {}

  static async connect(broker: TestBroker): Promise<Server> {
    const client = mqtt.connect(broker.plainUrl, {
      username: broker.server.username,
      password: broker.server.password,
      clientId: `test-server-${crypto.randomUUID().slice(0, 8)}`,
      protocolVersion: 5,
      reconnectPeriod: 100,
    });
    const s = new Server(client);
    client.on("message", (topic, payload) => {
      const d = decodeUp(topic, new Uint8Array(payload));
      // Every message the agent sends must pass the server's own validator.
      if (!d.ok) throw new Error(`${topic}: ${d.reason}: ${d.error}`);
      s.got.push({ at: performance.now(), m: d.message });
    });
    await new Promise<void>((resolve, reject) => {
      client.once(
        "connect",
        () =>
          client.subscribe(
            `k8s4r/robots/${ROBOT}/up/#`,
            { qos: 1 },
            (err) => err ? reject(err) : resolve(),
          ),
      );
      client.once("error", reject);
    });
    return s;
  }

  statuses(): StatusMessage[] {
    return this.got.map((g) => g.m).filter((m): m is StatusMessage => m.type === "status");
  }

  registers(): RegisterMessage[] {
    return this.got.map((g) => g.m).filter((m): m is RegisterMessage => m.type === "register");
  }

  reports(taskId: string): TaskStatusMessage[] {
    return this.got.map((g) => g.m).filter((m): m is TaskStatusMessage =>
      m.type === "task-status" && m.taskId === taskId
    );
  }

  /** The newest `online` (highest connection) this boot announced. */
  lastOnline(bootId?: string): StatusMessage | undefined {
    return this.statuses().filter((s) =>
      s.status === "online" && (bootId === undefined || s.bootId === bootId)
    ).sort((a, b) => (a.connection ?? 0) - (b.connection ?? 0)).pop();
  }

  async sendTask(id: string, command: string[]) {
    const t: TaskMessage = {
      v: PROTOCOL_VERSION,
      type: "task",
      robotId: ROBOT,
      ts: now(),
      id,
      command,
      env: {},
      timeoutSeconds: 600,
      createdAt: now(),
    };
    await this.client.publishAsync(downTopic(ROBOT, "task"), Buffer.from(encode(t)), { qos: 1 });
  }

  async close() {
    await this.client.endAsync(true).catch(() => {});
  }
}

interface Stack {
  broker: TestBroker;
  fake: FakeWorkloadApi;
  dir: string;
  stateDir: string;
  issue(ttlSeconds: number): void;
}

async function withStack(fn: (s: Stack) => Promise<void>) {
  const broker = await startTestBroker();
  const fake = await FakeWorkloadApi.start();
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-agent-crash-" });
  try {
    const issue = (ttlSeconds: number) => {
      const c = broker.ca.ca.issue({
        spiffeId: `spiffe://${TEST_TRUST_DOMAIN}/robot/${ROBOT}`,
        dnsNames: [ROBOT],
        ttlSeconds,
      });
      fake.setX509Svids([c], { [TEST_TRUST_DOMAIN]: c.bundleDer });
    };
    issue(3600);
    await Deno.writeTextFile(
      join(dir, "plugins.yaml"),
      [
        "spire:",
        `  trustDomain: ${TEST_TRUST_DOMAIN}`,
        `  dataDir: ${join(dir, "data")}`,
        "tasks:",
        '  allow: ["sleep", "sh"]',
        "  killGraceSeconds: 1",
        "",
      ].join("\n"),
    );
    await fn({ broker, fake, dir, stateDir: join(dir, "data", "k8s4r-agent"), issue });
  } finally {
    // Whatever a test got to, no task it started survives it (each checked by its start time).
    const journal = new TaskJournal(join(dir, "data", "k8s4r-agent"));
    for (const rec of await journal.interrupted().catch(() => [])) {
      await killInterrupted(rec, 200).catch(() => {});
    }
    await fake.close();
    await broker.stop();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** Kills a process we caused to exist, only if it still is that process (pid + start time). */
function killIfOurs(pid: number | undefined, startTime: number | undefined) {
  if (pid === undefined || startTime === undefined) return;
  if (processStartTime(pid) !== startTime) return;
  try {
    Deno.kill(pid, "SIGKILL");
  } catch { /* gone */ }
}

Deno.test(
  "kill -9 of the agent: the broker publishes the will of its last connection; rotation does not",
  opts,
  async () => {
    await withStack(async ({ broker, fake, dir, issue }) => {
      let server = await Server.connect(broker);
      let agent: AgentProcess | undefined;
      try {
        agent = AgentProcess.spawn(dir, broker, fake);
        const first = () => server.lastOnline();
        await waitFor(() => first() !== undefined, { timeoutMs: 30_000, what: "online" })
          .catch((e) => {
            throw new Error(`${e.message}; agent log:\n${agent!.log}`);
          });
        const boot = first()!.bootId!;
        assert.equal(typeof boot, "string");
        assert.equal(first()!.connection, 1);

        // A rotation cycle: DISCONNECT, then connection 2. The broker must not publish a will.
        issue(7200);
        await waitFor(() => (server.lastOnline(boot)?.connection ?? 0) >= 2, {
          timeoutMs: 30_000,
          what: "online of connection 2 (after rotation)",
        });
        assert.deepEqual(server.statuses().filter((s) => s.status === "offline"), []);

        // A broker restart: the agent reconnects (one or more attempts, each with its will).
        const before = server.lastOnline(boot)!.connection!;
        await server.close();
        await broker.restart();
        server = await Server.connect(broker);
        await waitFor(() => (server.lastOnline(boot)?.connection ?? 0) > before, {
          timeoutMs: 30_000,
          what: "online after the broker restart",
        }).catch((e) => {
          throw new Error(`${e.message}; agent log:\n${agent!.log}`);
        });

        // On each connection: register first, then online, with the same (bootId, connection).
        const order = server.got.map((g) => g.m).filter((m) =>
          m.type === "register" || (m.type === "status" && m.status === "online")
        ) as (RegisterMessage | StatusMessage)[];
        const last = server.lastOnline(boot)!;
        const reg = order.findIndex((m) =>
          m.type === "register" && m.connection === last.connection
        );
        const onl = order.findIndex((m) => m.type === "status" && m.connection === last.connection);
        assert.ok(reg >= 0 && reg < onl, `register before online: ${reg} < ${onl}`);
        assert.equal((order[reg] as RegisterMessage).bootId, boot);

        const t0 = performance.now();
        await agent.kill9();
        // (A retained status replayed at subscribe time is older than t0: not the will.)
        const willAfterKill = () =>
          server.got.find((g) => g.at >= t0 && g.m.type === "status" && g.m.status === "offline");
        await waitFor(() => willAfterKill() !== undefined, {
          timeoutMs: 30_000,
          what: "the will after kill -9",
        });
        const { at, m } = willAfterKill()!;
        const will = m as StatusMessage;
        console.log(`will published ${Math.round(at - t0)} ms after kill -9`);
        assert.equal(will.reason, "connection lost");
        assert.equal(will.bootId, last.bootId);
        assert.equal(will.connection, last.connection);
        assert.ok(will.connection! >= 3, `connection ${will.connection}`);
      } finally {
        await agent?.kill9();
        await server.close();
      }
    });
  },
);

Deno.test(
  "kill -9 with running tasks: they die with the agent; the restart reports failed: agent restarted",
  opts,
  async () => {
    await withStack(async ({ broker, fake, dir, stateDir }) => {
      const server = await Server.connect(broker);
      let agent: AgentProcess | undefined;
      let direct: { pid: number; startTime: number } | undefined;
      let grandchild: { pid: number; startTime: number } | undefined;
      const pidFile = join(dir, "grandchild.pid");
      try {
        agent = AgentProcess.spawn(dir, broker, fake);
        await waitFor(() => server.lastOnline() !== undefined, {
          timeoutMs: 30_000,
          what: "online",
        });
        await server.sendTask("t-sleep", ["sleep", "600"]);
        // A task whose own child is not its direct process: PDEATHSIG does not reach it.
        await server.sendTask("t-tree", ["sh", "-c", `sleep 600 & echo $! > ${pidFile}; wait`]);
        for (const id of ["t-sleep", "t-tree"]) {
          await waitFor(() => server.reports(id).some((r) => r.state === "running"), {
            timeoutMs: 20_000,
            what: `${id} running`,
          });
        }
        const rec = JSON.parse(await Deno.readTextFile(join(stateDir, "running", "t-sleep.json")));
        direct = { pid: rec.pid, startTime: rec.startTime };
        assert.equal(processStartTime(direct.pid), direct.startTime, "the task runs");
        await waitFor(async () => (await Deno.readTextFile(pidFile).catch(() => "")) !== "", {
          timeoutMs: 10_000,
          what: "grandchild pid",
        });
        const gpid = Number((await Deno.readTextFile(pidFile)).trim());
        grandchild = { pid: gpid, startTime: processStartTime(gpid)! };

        await agent.kill9();
        // The task's process dies with the agent (PR_SET_PDEATHSIG), at once.
        await waitFor(() => processStartTime(direct!.pid) !== direct!.startTime, {
          timeoutMs: 5000,
          what: "the sleep task to die with its agent",
        });
        // Positive control for the restart: the grandchild is still there.
        assert.equal(processStartTime(grandchild.pid), grandchild.startTime);

        agent = AgentProcess.spawn(dir, broker, fake);
        for (const id of ["t-sleep", "t-tree"]) {
          await waitFor(
            () => server.reports(id).some((r) => r.state === "failed"),
            { timeoutMs: 30_000, what: `${id} failed after the restart` },
          ).catch((e) => {
            throw new Error(`${e.message}; agent log:\n${agent!.log}`);
          });
          const f = server.reports(id).find((r) => r.state === "failed")!;
          assert.equal(f.error, "agent restarted");
        }
        // The restarted agent stopped what the crash left (after checking its start time).
        assert.notEqual(processStartTime(grandchild.pid), grandchild.startTime);
        assert.match(agent.log, /task\.interrupted task=t-tree/);
        // At most once: a re-delivery of an interrupted task does not run it again.
        await server.sendTask("t-sleep", ["sleep", "600"]);
        await agent.waitLog(/task\.duplicate task=t-sleep/, "duplicate");
        assert.equal(server.reports("t-sleep").filter((r) => r.state === "accepted").length, 1);
        assert.equal(await agent.stop(), 0);
      } finally {
        await agent?.kill9();
        killIfOurs(direct?.pid, direct?.startTime);
        killIfOurs(grandchild?.pid, grandchild?.startTime);
        await server.close();
      }
    });
  },
);

Deno.test(
  "results finished while the broker is down survive agent restarts (durable queue)",
  opts,
  async () => {
    await withStack(async ({ broker, fake, dir, stateDir }) => {
      let server = await Server.connect(broker);
      let agent: AgentProcess | undefined;
      try {
        agent = AgentProcess.spawn(dir, broker, fake);
        await waitFor(() => server.lastOnline() !== undefined, {
          timeoutMs: 30_000,
          what: "online",
        });
        const boot1 = server.lastOnline()!.bootId!;
        const gate = join(dir, "gate");
        // Finishes only once the test allows it, i.e. while the broker is down.
        await server.sendTask("t-late", [
          "sh",
          "-c",
          `while [ ! -e ${gate} ]; do sleep 0.05; done; echo result-42`,
        ]);
        await waitFor(() => server.reports("t-late").some((r) => r.state === "running"), {
          timeoutMs: 20_000,
          what: "t-late running",
        });
        await server.close();
        await broker.kill9();
        await agent.waitLog(/mqtt\.disconnected/, "the agent to notice the broker is gone");
        await Deno.writeTextFile(gate, "");
        await agent.waitLog(/task\.report task=t-late state=done/, "t-late done");
        // Restart 1, graceful, broker down.
        assert.equal(await agent.stop(), 0);
        const outbox = () => Deno.readTextFile(join(stateDir, OUTBOX_FILE)).catch(() => "");
        assert.match(await outbox(), /result-42/);
        // Restart 2, broker still down: this boot queues heartbeats, then is killed.
        agent = AgentProcess.spawn(dir, broker, fake);
        await agent.waitLog(/outbox\.recovered/, "the queue read back");
        await waitFor(
          async () =>
            (await outbox()).split("\n").some((l) =>
              l.includes('"kind":"heartbeat"') && !l.includes(boot1)
            ),
          { timeoutMs: 20_000, what: "a heartbeat of the second boot queued" },
        );
        await agent.kill9();
        // Broker back; restart 3 delivers what the two earlier runs left.
        await broker.start();
        server = await Server.connect(broker);
        agent = AgentProcess.spawn(dir, broker, fake);
        await waitFor(() => server.reports("t-late").some((r) => r.state === "done"), {
          timeoutMs: 30_000,
          what: "the queued result",
        }).catch((e) => {
          throw new Error(`${e.message}; agent log:\n${agent!.log}`);
        });
        const done = server.reports("t-late").find((r) => r.state === "done")!;
        assert.equal(done.stdout, "result-42\n");
        assert.equal(done.exitCode, 0);
        // The heartbeats the second boot queued arrive too, under that boot's id.
        const boots = new Set(
          server.got.map((g) => g.m).filter((m): m is HeartbeatMessage => m.type === "heartbeat")
            .map((h) => h.bootId),
        );
        const boot3 = server.lastOnline()?.bootId;
        assert.ok(
          [...boots].some((b) => b !== boot1 && b !== boot3),
          `heartbeats of the offline boot: ${[...boots].join(", ")}`,
        );
        assert.equal(await agent.stop(), 0);
        // Acknowledged entries were removed: nothing of this is left to send.
        const left = await Outbox.open({
          stateDir,
          robotId: ROBOT,
          maxMessages: 1000,
          maxBytes: 1 << 20,
        });
        await left.close();
        assert.deepEqual(
          left.recovered.filter((e) => e.kind === "result").map((e) => e.message),
          [],
        );
      } finally {
        await agent?.kill9();
        await server.close();
      }
    });
  },
);
