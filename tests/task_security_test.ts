/**
 * Signed tasks and cancels, end to end on the robot side: the real `k8s4r agent` CLI, a REAL
 * Mosquitto (k8s4r's generated config), the robot's SVID and bundle from a fake Workload API.
 * A client on the broker's password listener (127.0.0.1, the fleet server's login) plays both
 * the fleet server (it signs with a fleet-server SVID of the test CA) and the attacker who holds
 * that password (it publishes whatever it likes on the robot's down topics).
 *
 * Every attack has its positive control on the same path: the correctly signed task runs.
 * Whether a task ran is told by a file it appends to, not by its report.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
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
import { downTopic } from "../src/fleet/topics.ts";
import { fleetServerSpiffeId, robotSpiffeId } from "../src/fleet/ids.ts";
import {
  type CancelMessage,
  encode,
  now,
  PROTOCOL_VERSION,
  type TaskMessage,
  type TaskStatusMessage,
} from "../src/mqtt/messages.ts";
import { TaskSigner } from "../src/mqtt/signed.ts";
import { TaskJournal } from "../src/agent/task_journal.ts";
import { DEFAULT_TASK_USER, ensureTaskUser, removeTaskUser } from "../src/agent/task_user.ts";

const ROBOT = "robot-001";
const opts = { sanitizeOps: false, sanitizeResources: false };

/** The password-listener client: the fleet server's stand-in, and the attacker. */
class Fleet {
  readonly got: TaskStatusMessage[] = [];
  private client!: MqttClient;

  static async connect(broker: TestBroker): Promise<Fleet> {
    const f = new Fleet();
    f.client = await connectUpListener(broker, ROBOT, "test-fleet", (m) => {
      if (m.type === "task-status") f.got.push(m);
    });
    return f;
  }

  async publish(kind: "task" | "cancel", payload: Uint8Array, robotId = ROBOT) {
    await this.client.publishAsync(downTopic(robotId, kind), Buffer.from(payload), { qos: 1 });
  }

  reports(taskId: string) {
    return this.got.filter((m) => m.taskId === taskId);
  }

  async waitFinal(taskId: string, agent: AgentProcess, timeoutMs = 20_000) {
    const final = ["done", "failed", "refused", "cancelled"];
    await waitFor(() => this.reports(taskId).some((m) => final.includes(m.state)), {
      timeoutMs,
      what: `a final report of ${taskId}`,
    }).catch((err) => {
      throw new Error(
        `${err.message}; reports: ${
          JSON.stringify(this.reports(taskId))
        }; agent log:\n${agent.log}`,
      );
    });
    return this.reports(taskId).find((m) => final.includes(m.state))!;
  }

  async close() {
    await this.client.endAsync(true).catch(() => {});
  }
}

function task(id: string, command: string[], more: Partial<TaskMessage> = {}): TaskMessage {
  const t = Date.now();
  return {
    v: PROTOCOL_VERSION,
    type: "task",
    robotId: ROBOT,
    ts: now(),
    id,
    command,
    env: {},
    timeoutSeconds: 60,
    createdAt: new Date(t).toISOString(),
    expiresAt: new Date(t + 300_000).toISOString(),
    ...more,
  };
}

function cancel(taskId: string): CancelMessage {
  return { v: PROTOCOL_VERSION, type: "cancel", robotId: ROBOT, ts: now(), taskId, reason: "test" };
}

interface Rig {
  broker: TestBroker;
  dir: string;
  stateDir: string;
  fleet: Fleet;
  agent: AgentProcess;
  /** Signs as the fleet server. */
  server: TaskSigner;
  /** Signs with robot-002's SVID (a valid SVID of the same trust domain, not the server's). */
  robot2: TaskSigner;
  ranLog: string;
  ran(): Promise<string[]>;
}

/**
 * The agent CLI with its `tasks:` keys: allow sh, sleep, id, touch; FOO may be set; tasks run as
 * k8s4r-task (created when missing, kept like devenv keeps it) unless `tasksYaml` names a user
 * or `o.noUser` (a root agent then refuses to start).
 */
async function withRig(
  tasksYaml: string[],
  fn: (r: Rig) => Promise<void>,
  o: { waitStart?: boolean; noUser?: boolean } = {},
) {
  assert.equal(Deno.uid(), 0, "the agent runs tasks as a task user here: run it as root (CI does)");
  if (!o.noUser && !tasksYaml.some((l) => /^\s*user:/.test(l))) {
    await ensureTaskUser(realRunner, DEFAULT_TASK_USER);
    tasksYaml = [...tasksYaml, `  user: ${DEFAULT_TASK_USER}`];
  }
  const broker = await startTestBroker();
  const fake = await FakeWorkloadApi.start();
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-tasksec-" });
  await Deno.chmod(dir, 0o755); // a task user must reach its working directory
  let fleet: Fleet | undefined;
  let agent: AgentProcess | undefined;
  const stateDir = join(dir, "data", "k8s4r-agent");
  try {
    issueRobotSvid(broker, fake, ROBOT);
    await writeAgentPlugins(dir, {
      tasks: [
        '  allow: ["sh", "sleep", "id", "touch"]',
        '  allowEnv: ["FOO", "LANG"]',
        "  killGraceSeconds: 1",
        ...tasksYaml,
      ],
    });
    // Tasks append to it as the task user.
    await Deno.writeTextFile(join(dir, "ran.log"), "");
    await Deno.chmod(join(dir, "ran.log"), 0o666);
    fleet = await Fleet.connect(broker);
    agent = AgentProcess.spawn(dir, broker, fake.socketPath);
    if (o.waitStart ?? true) await agent.waitLog(/mqtt\.connected/, "the agent's MQTT session");
    const ranLog = join(dir, "ran.log");
    await fn({
      broker,
      dir,
      stateDir,
      fleet,
      agent,
      server: testSigner(broker, fleetServerSpiffeId(TEST_TRUST_DOMAIN)),
      robot2: testSigner(broker, robotSpiffeId(TEST_TRUST_DOMAIN, "robot-002"), "robot-002"),
      ranLog,
      ran: async () => {
        try {
          return (await Deno.readTextFile(ranLog)).split("\n").filter((l) => l !== "");
        } catch (err) {
          if (err instanceof Deno.errors.NotFound) return [];
          throw err;
        }
      },
    });
  } finally {
    if (agent) await agent.stop();
    await killJournalTasks(stateDir);
    await fleet?.close();
    await fake.close();
    await broker.stop();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

const append = (r: Rig, word: string) => ["sh", "-c", `echo ${word} >> ${r.ranLog}`];

Deno.test(
  "signed tasks: forged, robot-signed, replayed, expired, misaddressed are refused; the server's runs",
  opts,
  async (t) => {
    await withRig([], async (r) => {
      let control!: Uint8Array;
      await t.step("control: a task signed by the fleet server runs", async () => {
        control = r.server.sign(task("ok-1", append(r, "ok-1")));
        await r.fleet.publish("task", control);
        const f = await r.fleet.waitFinal("ok-1", r.agent);
        assert.equal(f.state, "done", JSON.stringify(f));
        assert.deepEqual(await r.ran(), ["ok-1"]);
      });

      const refused = async (id: string, reason: string) => {
        const f = await r.fleet.waitFinal(id, r.agent);
        assert.equal(f.state, "refused", JSON.stringify(f));
        assert.equal(f.reason, reason, JSON.stringify(f));
        return f;
      };

      await t.step(
        "a task forged through 1883 with the broker password: bad-signature",
        async () => {
          await r.fleet.publish("task", encode(task("forged", append(r, "forged"))));
          const f = await refused("forged", "bad-signature");
          assert.match(
            f.error!,
            /unsigned task: this robot runs only what the fleet server spiffe:\/\/k8s4r\.test\/fleet-server signed/,
          );
        },
      );

      await t.step("a task signed by robot-002's SVID: bad-signature", async () => {
        await r.fleet.publish("task", r.robot2.sign(task("by-robot2", append(r, "by-robot2"))));
        const f = await refused("by-robot2", "bad-signature");
        assert.match(
          f.error!,
          /signed by spiffe:\/\/k8s4r\.test\/robot\/robot-002, expected the fleet server/,
        );
      });

      await t.step("the control task replayed byte for byte: replay", async () => {
        const before = r.fleet.reports("ok-1").length;
        await r.fleet.publish("task", control);
        await waitFor(() => r.fleet.reports("ok-1").length > before, {
          timeoutMs: 20_000,
          what: "the answer to the replay",
        });
        const f = r.fleet.reports("ok-1").slice(before)[0];
        assert.equal(f.state, "refused");
        assert.equal(f.reason, "replay");
        assert.match(f.error!, /task id seen before/);
      });

      await t.step("an expired signed task: expired", async () => {
        const at = Date.now() - 120_000;
        await r.fleet.publish(
          "task",
          r.server.sign(task("late", append(r, "late"), {
            createdAt: new Date(at).toISOString(),
            expiresAt: new Date(at + 60_000).toISOString(),
          })),
        );
        await refused("late", "expired");
      });

      await t.step("a signed task for robot-002 on robot-001's topic: wrong-robot", async () => {
        await r.fleet.publish(
          "task",
          r.server.sign(task("other", append(r, "other"), { robotId: "robot-002" })),
        );
        const f = await refused("other", "wrong-robot");
        assert.equal(f.error, "wrong-robot: addressed to robot-002, this is robot-001");
      });

      await t.step("a signed task created in the future (beyond the skew): replay", async () => {
        await r.fleet.publish(
          "task",
          r.server.sign(task("future", append(r, "future"), {
            createdAt: new Date(Date.now() + 3600_000).toISOString(),
            expiresAt: new Date(Date.now() + 7200_000).toISOString(),
          })),
        );
        await refused("future", "replay");
      });

      await t.step(
        "PATH, LD_PRELOAD or TAR_OPTIONS in a signed task's env: refused, not run; FOO runs",
        async () => {
          for (
            const [id, env] of [["env-path", { PATH: r.dir }], ["env-preload", {
              LD_PRELOAD: join(r.dir, "x.so"),
            }], ["env-tar", {
              TAR_OPTIONS: `--checkpoint=1 --checkpoint-action=exec=touch\\ ${r.dir}/pwned`,
            }]] as const
          ) {
            await r.fleet.publish("task", r.server.sign(task(id, append(r, id), { env })));
            const f = await r.fleet.waitFinal(id, r.agent);
            assert.equal(f.state, "refused");
            assert.equal(
              f.reason,
              undefined,
              "an authentic task refused by policy carries no reason",
            );
            assert.match(f.error!, new RegExp(`^environment variable ${Object.keys(env)[0]}[: ]`));
          }
          await r.fleet.publish(
            "task",
            r.server.sign(
              task("env-ok", ["sh", "-c", `echo $FOO >> ${r.ranLog}`], { env: { FOO: "env-ok" } }),
            ),
          );
          assert.equal((await r.fleet.waitFinal("env-ok", r.agent)).state, "done");
        },
      );

      await t.step("only the two controls ran; the refusals are counted", async () => {
        assert.deepEqual(await r.ran(), ["ok-1", "env-ok"]);
        await assert.rejects(Deno.stat(join(r.dir, "pwned")), Deno.errors.NotFound);
        await r.agent.stop();
        const stopped = r.agent.log.split("\n").find((l) => l.includes("agent.stopped"));
        assert.ok(stopped, r.agent.log);
        // The logger quotes JSON values: refused="{\"bad-signature\":2,...}".
        const value = / refused=("(?:[^"\\]|\\.)*")/.exec(stopped!)?.[1];
        assert.ok(value, stopped);
        assert.deepEqual(JSON.parse(JSON.parse(value!)), {
          "bad-signature": 2,
          "wrong-robot": 1,
          "expired": 1,
          "replay": 2,
        });
      });
    });
  },
);

Deno.test(
  "cancel: a signed cancel stops a running sleep 600 (gone within 2 s); forged cancels do not",
  opts,
  async (t) => {
    await withRig([], async (r) => {
      let pid = 0;
      let startTime = 0;
      const alive = () =>
        processStartTime(pid) === startTime &&
        !/^\d+ \(.*\) Z/.test(Deno.readTextFileSync(`/proc/${pid}/stat`));
      await t.step("a signed sleep 600 runs", async () => {
        await r.fleet.publish(
          "task",
          r.server.sign(task("long", ["sleep", "600"], { timeoutSeconds: 900 })),
        );
        await waitFor(() => r.fleet.reports("long").some((m) => m.state === "running"), {
          timeoutMs: 20_000,
          what: "long running",
        });
        const [rec] = await new TaskJournal(r.stateDir).interrupted();
        assert.equal(rec.taskId, "long");
        pid = rec.pid!;
        startTime = rec.startTime!;
        assert.ok(alive());
      });

      await t.step(
        "an unsigned cancel and one signed by robot-002 are refused; sleep lives",
        async () => {
          await r.fleet.publish("cancel", encode(cancel("long")));
          await r.fleet.publish("cancel", r.robot2.sign(cancel("long")));
          await r.agent.waitLog(
            /cancel\.refused .*reason=bad-signature[\s\S]*cancel\.refused .*reason=bad-signature/,
            "both cancels refused",
          );
          assert.ok(alive(), "a forged cancel killed the task");
          assert.ok(!r.fleet.reports("long").some((m) => m.state === "cancelled"));
        },
      );

      await t.step(
        "the fleet server's cancel: cancelled, the process gone within 2 s",
        async () => {
          const t0 = performance.now();
          await r.fleet.publish("cancel", r.server.sign(cancel("long")));
          await waitFor(() => {
            try {
              return !alive();
            } catch {
              return true; // /proc/PID is gone
            }
          }, { timeoutMs: 2000, intervalMs: 10, what: "sleep 600 to be gone after the cancel" });
          const goneMs = performance.now() - t0;
          const f = await r.fleet.waitFinal("long", r.agent);
          console.log(`cancel -> process gone in ${goneMs.toFixed(0)} ms`);
          assert.equal(f.state, "cancelled");
          assert.equal(f.exitCode, null);
          assert.equal(f.error, "cancelled by the fleet server: test; stopped with SIGTERM");
        },
      );

      await t.step(
        "a cancel for a finished task does nothing; one before arrival blocks the task",
        async () => {
          await r.fleet.publish("cancel", r.server.sign(cancel("long")));
          await r.agent.waitLog(
            /task\.cancel task=long outcome=not-running/,
            "the late cancel answered",
          );
          await r.fleet.publish("cancel", r.server.sign(cancel("early")));
          const c = await r.fleet.waitFinal("early", r.agent);
          assert.equal(c.state, "cancelled");
          assert.match(c.error!, /before the task arrived; it will not run/);
          const before = r.fleet.reports("early").length;
          await r.fleet.publish("task", r.server.sign(task("early", append(r, "early"))));
          await waitFor(() => r.fleet.reports("early").length > before, {
            timeoutMs: 20_000,
            what: "early answered",
          });
          assert.equal(r.fleet.reports("early")[before].reason, "replay");
          assert.deepEqual(await r.ran(), []);
        },
      );
    });
  },
);

Deno.test(
  "tasks.user: the CLI runs tasks as that user; a user it cannot use stops it from starting",
  opts,
  async () => {
    assert.equal(Deno.uid(), 0, "this test creates a system user: run it as root (CI does)");
    const name = `k8s4r-it${crypto.randomUUID().slice(0, 6)}`;
    const user = await ensureTaskUser(realRunner, name);
    try {
      await withRig([`  user: ${name}`], async (r) => {
        await r.fleet.publish("task", r.server.sign(task("whoami", ["id", "-u"])));
        const f = await r.fleet.waitFinal("whoami", r.agent);
        assert.equal(f.state, "done", JSON.stringify(f));
        assert.equal(f.stdout, `${user.uid}\n`);
        await r.agent.waitLog(
          new RegExp(`tasks\\.user user=${name} uid=${user.uid}`),
          "the task user logged",
        );
      });
      // No tasks.user at all, as root with tasks allowed: the agent refuses to start, naming it.
      await withRig([], async (r) => {
        const st = await r.agent.exited;
        assert.equal(st.code, 1, r.agent.log);
        assert.match(
          r.agent.log,
          /plugins\.yaml: tasks\.user: not set, but tasks\.allow lets tasks run/,
        );
        assert.doesNotMatch(r.agent.log, /mqtt\.connected/);
      }, { waitStart: false, noUser: true });
      // Positive control above; now a user that does not exist: the agent refuses to start.
      await withRig([`  user: ${name}-missing`], async (r) => {
        const st = await r.agent.exited;
        assert.equal(st.code, 1, r.agent.log);
        assert.match(r.agent.log, new RegExp(`tasks.user "${name}-missing": no such user`));
        assert.doesNotMatch(r.agent.log, /mqtt\.connected/);
      }, { waitStart: false });
    } finally {
      await removeTaskUser(realRunner, name);
    }
  },
);

Deno.test(
  "a flood of forged tasks: refusal reports are rate limited and the rest counted; the queue stays empty",
  opts,
  async () => {
    await withRig([], async (r) => {
      const N = 60;
      for (let i = 0; i < N; i++) {
        await r.fleet.publish("task", encode(task(`flood-${i}`, append(r, `flood-${i}`))));
      }
      // A signed task after the flood: by its final report, every forged one was handled and
      // every refusal report published before it has arrived (one connection, in order).
      await r.fleet.publish("task", r.server.sign(task("after-flood", append(r, "after-flood"))));
      assert.equal((await r.fleet.waitFinal("after-flood", r.agent)).state, "done");
      const reports = r.fleet.got.filter((m) => m.taskId.startsWith("flood-"));
      console.log(`${N} forged tasks: ${reports.length} refusal reports`);
      assert.ok(reports.length >= 20 && reports.length < N, `${reports.length} reports`);
      assert.ok(reports.every((m) => m.state === "refused" && m.reason === "bad-signature"));
      assert.deepEqual(await r.ran(), ["after-flood"]);
      await r.agent.stop();
      const stopped = r.agent.log.split("\n").find((l) => l.includes("agent.stopped"))!;
      assert.match(stopped, new RegExp(`refusalReports=${reports.length} `));
      assert.match(stopped, new RegExp(`refusalReportsSuppressed=${N - reports.length} `));
      assert.match(stopped, / queued=0/, "nothing of the flood went to the durable queue");
    });
  },
);
