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
import type { MqttClient } from "mqtt";
import { startTestBroker, TEST_TRUST_DOMAIN, type TestBroker } from "./helpers/broker.ts";
import { AgentProcess } from "./helpers/agent_process.ts";
import {
  connectUpListener,
  issueRobotSvid,
  killJournalTasks,
  testSigner,
  writeAgentPlugins,
} from "./helpers/agent_rig.ts";
import { FakeWorkloadApi } from "../src/spiffe/testing/fake_workload_api.ts";
import { processStartTime, realRunner, waitFor } from "../src/process/mod.ts";
import {
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
import { fleetServerSpiffeId } from "../src/fleet/ids.ts";
import { TaskSigner } from "../src/mqtt/signed.ts";
import { Outbox, OUTBOX_FILE } from "../src/agent/outbox.ts";
import { DEFAULT_TASK_USER, ensureTaskUser } from "../src/agent/task_user.ts";

const ROBOT = "robot-001";
const opts = { sanitizeOps: false, sanitizeResources: false };

/**
 * The fleet server's stand-in: records every message on the robot's up topics, in order, and
 * sends tasks signed with a fleet-server SVID of the test CA (robots run only signed tasks).
 */
class Server {
  readonly got: { at: number; m: UpMessage }[] = [];
  private readonly signer: TaskSigner;
  private client!: MqttClient;
  private constructor(broker: TestBroker) {
    this.signer = testSigner(broker, fleetServerSpiffeId(TEST_TRUST_DOMAIN));
  }

  static async connect(broker: TestBroker): Promise<Server> {
    const s = new Server(broker);
    // Every message the agent sends must pass the server's own validator.
    s.client = await connectUpListener(broker, ROBOT, "test-server", (m) => {
      s.got.push({ at: performance.now(), m });
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
    await this.client.publishAsync(downTopic(ROBOT, "task"), Buffer.from(this.signer.sign(t)), {
      qos: 1,
    });
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
  assert.equal(Deno.uid(), 0, "the agent runs tasks as a task user here: run it as root (CI does)");
  await ensureTaskUser(realRunner, DEFAULT_TASK_USER); // kept, as devenv keeps it
  const broker = await startTestBroker();
  const fake = await FakeWorkloadApi.start();
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-agent-crash-" });
  await Deno.chmod(dir, 0o755); // the task user writes pid files here
  try {
    const issue = (ttlSeconds: number) => issueRobotSvid(broker, fake, ROBOT, ttlSeconds);
    issue(3600);
    await writeAgentPlugins(dir, {
      tasks: [
        '  allow: ["sleep", "sh"]',
        "  killGraceSeconds: 1",
        `  user: ${DEFAULT_TASK_USER}`,
      ],
    });
    await fn({ broker, fake, dir, stateDir: join(dir, "data", "k8s4r-agent"), issue });
  } finally {
    await killJournalTasks(join(dir, "data", "k8s4r-agent"));
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
        agent = AgentProcess.spawn(dir, broker, fake.socketPath);
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
      let escaped: { pid: number; startTime: number } | undefined;
      const pidFile = join(dir, "grandchild.pid");
      const escapedFile = join(dir, "escaped.pid");
      for (const f of [pidFile, escapedFile]) {
        await Deno.writeTextFile(f, "");
        await Deno.chmod(f, 0o666);
      }
      try {
        agent = AgentProcess.spawn(dir, broker, fake.socketPath);
        await waitFor(() => server.lastOnline() !== undefined, {
          timeoutMs: 30_000,
          what: "online",
        });
        await server.sendTask("t-sleep", ["sleep", "600"]);
        // A task whose own child is not its direct process: PDEATHSIG does not reach it; and
        // one it moved to a session of its own (setsid): no process group reaches it.
        await server.sendTask("t-tree", [
          "sh",
          "-c",
          `sleep 600 & echo $! > ${pidFile}; ` +
          `setsid sh -c 'echo $$ > ${escapedFile}; exec sleep 600' & wait`,
        ]);
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
        await waitFor(async () => (await Deno.readTextFile(escapedFile).catch(() => "")) !== "", {
          timeoutMs: 10_000,
          what: "the setsid'd grandchild's pid",
        });
        const epid = Number((await Deno.readTextFile(escapedFile)).trim());
        escaped = { pid: epid, startTime: processStartTime(epid)! };
        const tree = JSON.parse(await Deno.readTextFile(join(stateDir, "running", "t-tree.json")));
        assert.notEqual(
          Deno.readTextFileSync(`/proc/${epid}/stat`).split(") ")[1].split(" ")[3],
          String(tree.pid),
          "it left the task's session",
        );

        await agent.kill9();
        // The task's process dies with the agent (PR_SET_PDEATHSIG), at once.
        await waitFor(() => processStartTime(direct!.pid) !== direct!.startTime, {
          timeoutMs: 5000,
          what: "the sleep task to die with its agent",
        });
        // Positive control for the restart: the grandchildren are still there.
        assert.equal(processStartTime(grandchild.pid), grandchild.startTime);
        assert.equal(processStartTime(escaped.pid), escaped.startTime);

        agent = AgentProcess.spawn(dir, broker, fake.socketPath);
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
        // The restarted agent stopped what the crash left (its cgroup: all of it, the setsid'd
        // one too).
        assert.notEqual(processStartTime(grandchild.pid), grandchild.startTime);
        assert.notEqual(processStartTime(escaped.pid), escaped.startTime);
        assert.match(agent.log, /task\.interrupted task=t-tree/);
        // At most once: a re-delivery of an interrupted task does not run it again; it is
        // answered `refused` / `replay`, after its final report (the server keeps `failed`).
        await server.sendTask("t-sleep", ["sleep", "600"]);
        await waitFor(() => server.reports("t-sleep").some((r) => r.reason === "replay"), {
          timeoutMs: 30_000,
          what: "the redelivery answered replay",
        });
        const states = server.reports("t-sleep").map((r) => r.state);
        assert.deepEqual(states.slice(-2), ["failed", "refused"]);
        assert.equal(server.reports("t-sleep").filter((r) => r.state === "accepted").length, 1);
        assert.equal(await agent.stop(), 0);
      } finally {
        await agent?.kill9();
        killIfOurs(direct?.pid, direct?.startTime);
        killIfOurs(grandchild?.pid, grandchild?.startTime);
        killIfOurs(escaped?.pid, escaped?.startTime);
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
        agent = AgentProcess.spawn(dir, broker, fake.socketPath);
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
        agent = AgentProcess.spawn(dir, broker, fake.socketPath);
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
        agent = AgentProcess.spawn(dir, broker, fake.socketPath);
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
