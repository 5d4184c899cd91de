/**
 * End to end, part 2: faults. One real stack (`devenv start --robots 2`, heartbeats every 1 s)
 * survives, in order: kill -9 of robot-001's spire-agent, SVID rotation with a 20 s TTL, kill -9
 * of Mosquitto, kill -9 of robot-001's agent (its last will: offline within 2 s), kill -9 of
 * the k8s4r server, and the SPIRE server stopped for 60 s. Each case
 * asserts that no message is lost (`heartbeats.missing` stays 0 for every robot, every task result
 * arrives) and that the system recovers, and prints its recovery time as an `E2E-METRIC` line.
 *
 * Sanitizers are off for every case: the stack outlives each case by design, and the gRPC
 * health checks and mqtt.js keep handles. The teardown case asserts that nothing survives.
 */
import assert from "node:assert/strict";
import { grpcHealthCheck } from "../../src/spire/health.ts";
import { processStartTime, stopPidFile, waitFor } from "../../src/process/mod.ts";
import { E2eStack, metric, ROBOTS, timeUntil, TRUST_DOMAIN } from "./stack.ts";

const stack = await E2eStack.create({ heartbeatSeconds: 1 });
const e2e = stack.caseRegistrar("e2e faults: ");

/** Polls the robots' online flags in the background; counts every offline observation. */
class OnlineWatch {
  offline: string[] = [];
  errors = 0;
  polls = 0;
  #stop = false;
  #loop: Promise<void>;
  constructor(robots: string[] = ROBOTS, intervalMs = 250) {
    this.#loop = (async () => {
      while (!this.#stop) {
        try {
          for (const id of robots) {
            const r = await stack.robot(id);
            if (!r.online) this.offline.push(`${new Date().toISOString()} ${id}`);
          }
          this.polls++;
        } catch {
          this.errors++;
        }
        await new Promise((r) => setTimeout(r, intervalMs));
      }
    })();
  }
  async stop(): Promise<void> {
    this.#stop = true;
    await this.#loop;
  }
}

/** The pids of every component, by pid file name. */
function componentPids(): Record<string, number | undefined> {
  const f = stack.files;
  return {
    "spire-server": stack.pid(f.spireServerPid)?.pid,
    "broker-identity": stack.pid(f.brokerIdentityPid)?.pid,
    mosquitto: stack.pid(f.mosquittoPid)?.pid,
    server: stack.pid(f.serverPid)?.pid,
    ...Object.fromEntries(ROBOTS.map((r) => [`agent ${r}`, stack.pid(stack.agentPidFile(r))?.pid])),
  };
}

/** SIGKILL on a pid we recorded (never by name); waits until it is gone. */
async function kill9(pid: number, startTime: number, what: string): Promise<void> {
  assert.equal(processStartTime(pid), startTime, `${what} (pid ${pid}) is not running`);
  Deno.kill(pid, "SIGKILL");
  await waitFor(() => processStartTime(pid) !== startTime, {
    timeoutMs: 10_000,
    what: `${what} to die`,
  });
}

/** Waits until every robot has sent `n` more heartbeats (the flow is back). */
async function heartbeatsFlow(n = 3, timeoutMs = 30_000): Promise<void> {
  await Promise.all(ROBOTS.map((id) => stack.waitHeartbeats(id, n, timeoutMs)));
}

async function agentLog(robotId: string): Promise<string> {
  const f = `${stack.layout.devEnvDir}/${
    robotId === "robot-001" ? "agent.log" : `agent-${robotId}.log`
  }`;
  return await Deno.readTextFile(f).catch(() => "");
}

// ---------------------------------------------------------------------------------------------

e2e("devenv start --robots 2 brings the whole stack up", async () => {
  const t0 = Date.now();
  await stack.start();
  metric("faults.start_ms", Date.now() - t0);
  stack.started = true;
  await stack.waitOnline();
  await heartbeatsFlow(2);
  await stack.assertNoLostHeartbeats("faults.baseline");
});

e2e("spire-agent kill -9: the agent's supervisor restarts it, the robot stays online", async () => {
  const before = stack.spireAgentOf("robot-001");
  assert.ok(before, "robot-001's k8s4r agent has no spire-agent child");
  const agentPid = componentPids()["agent robot-001"];
  const socket = stack.robotSocket("robot-001");
  assert.equal(await grpcHealthCheck(socket, 2000), "SERVING");
  const watch = new OnlineWatch(["robot-001"]);
  try {
    await kill9(before.pid, before.startTime, "robot-001's spire-agent");
    const recoverMs = await timeUntil(
      async () => {
        const now = stack.spireAgentOf("robot-001");
        if (!now || now.pid === before.pid) return false;
        return (await grpcHealthCheck(socket, 1000)) === "SERVING";
      },
      "a new spire-agent serving robot-001's socket",
      60_000,
      100,
    );
    metric("faults.spire_agent_kill.recover_ms", recoverMs);
    const after = stack.spireAgentOf("robot-001")!;
    assert.notEqual(after.pid, before.pid);
    assert.equal(componentPids()["agent robot-001"], agentPid, "the k8s4r agent was restarted");
    stack.remember();
    // The robot works through it: its SVID is still served, a task runs, heartbeats flow.
    const svid = await stack.fetchSvid("robot-001");
    assert.ok(Date.parse(svid.notAfter) > Date.now());
    const id = await stack.createTask("robot-001", ["echo", "after-spire-agent-kill"]);
    const t = await stack.waitTask(id, 30_000);
    assert.equal(t.state, "done");
    assert.equal(t.stdout, "after-spire-agent-kill\n");
    await heartbeatsFlow(2);
  } finally {
    await watch.stop();
  }
  metric("faults.spire_agent_kill.offline_observations", watch.offline.length);
  assert.deepEqual(watch.offline, [], "robot-001 went offline");
  assert.ok(watch.polls > 0);
  await stack.assertNoLostHeartbeats("faults.spire_agent_kill");
});

e2e("SVID rotation with a 20 s TTL: >= 3 rotations, robot online, nothing lost", async () => {
  const cli = stack.spireCli();
  const spiffeId = `spiffe://${TRUST_DOMAIN}/robot/robot-001`;
  const [entry] = (await cli.listEntries({ spiffeId })).filter((e) => e.spiffeId === spiffeId);
  assert.ok(entry, `no entry for ${spiffeId}`);
  const desired = {
    spiffeId,
    parentId: entry.parentId,
    selectors: entry.selectors,
    dnsNames: entry.dnsNames,
  };
  const logStart = (await agentLog("robot-001")).length;
  const original = (await stack.robot("robot-001")).svidExpiresAt;
  const watch = new OnlineWatch(ROBOTS);
  const seen = new Map<string, number>(); // svidExpiresAt -> first seen (ms)
  let restored = false;
  let shortLived = 0;
  try {
    assert.equal(await cli.reconcileEntry({ ...desired, x509SvidTtl: 20 }), "updated");
    const t0 = Date.now();
    await waitFor(async () => {
      const v = (await stack.robot("robot-001")).svidExpiresAt;
      if (v !== original && !seen.has(v)) seen.set(v, Date.now());
      // Only short-lived SVIDs count: the first one (the entry change), then 3 rotations.
      shortLived = [...seen].filter(([e, at]) => Date.parse(e) - at <= 25_000).length;
      return shortLived >= 4;
    }, { timeoutMs: 180_000, intervalMs: 250, what: "3 rotations of robot-001's SVID" });
    metric("faults.rotation.short_lived_svids_seen", shortLived);
    metric("faults.rotation.rotations", shortLived - 1);
    metric("faults.rotation.time_for_3_rotations_ms", Date.now() - t0);
    // Reconnect gaps: from the agent's "rotating_connection" to its next "connected".
    const log = (await agentLog("robot-001")).slice(logStart).split("\n");
    const gaps: number[] = [];
    let rotatingAt: number | undefined;
    for (const line of log) {
      const ts = Date.parse(line.split(" ")[0]);
      if (/ mqtt\.rotating_connection /.test(line)) rotatingAt = ts;
      else if (/ mqtt\.connected/.test(line) && rotatingAt !== undefined) {
        gaps.push(ts - rotatingAt);
        rotatingAt = undefined;
      }
    }
    metric("faults.rotation.reconnects", gaps.length);
    metric("faults.rotation.max_reconnect_gap_ms", gaps.length ? Math.max(...gaps) : "n/a");
    // A task still works on the rotated identity.
    const id = await stack.createTask("robot-001", ["echo", "rotated"]);
    const t = await stack.waitTask(id, 30_000);
    assert.equal(t.state, "done");
    assert.equal(t.stdout, "rotated\n");
    // Restore the TTL; the next SVID is long-lived again.
    await cli.reconcileEntry({ ...desired, x509SvidTtl: entry.x509SvidTtl });
    restored = true;
    await waitFor(
      async () =>
        Date.parse((await stack.robot("robot-001")).svidExpiresAt) - Date.now() > 10 * 60_000,
      { timeoutMs: 90_000, intervalMs: 250, what: "a long-lived SVID after restoring the TTL" },
    );
  } finally {
    if (!restored) {
      await cli.reconcileEntry({ ...desired, x509SvidTtl: entry.x509SvidTtl }).catch(() => {});
    }
    await watch.stop();
  }
  assert.equal(
    (await cli.listEntries({ spiffeId })).find((e) => e.id === entry.id)?.x509SvidTtl,
    entry.x509SvidTtl,
    "the entry's TTL was not restored",
  );
  metric("faults.rotation.offline_observations", watch.offline.length);
  assert.deepEqual(watch.offline, [], "a robot went offline during rotation");
  await heartbeatsFlow(2);
  await stack.assertNoLostHeartbeats("faults.rotation");
});

e2e(
  "mosquitto kill -9: devenv start restarts only it; QoS 1 heartbeats and a task result arrive",
  async () => {
    const before = componentPids();
    const mq = stack.pid(stack.files.mosquittoPid);
    assert.ok(mq, "mosquitto is not running");
    const id = await stack.createTask("robot-001", ["sh", "-c", "sleep 3; echo late"], 30);
    await waitFor(async () => ["accepted", "running"].includes((await stack.task(id)).state), {
      timeoutMs: 10_000,
      intervalMs: 50,
      what: "the task to be running on robot-001",
    });
    const hbBefore = await Promise.all(ROBOTS.map(async (r) => (await stack.robot(r)).heartbeats));
    stack.remember();
    await kill9(mq.pid, mq.startTime, "mosquitto");
    const killedAt = Date.now();
    // The task finishes on the robot while the broker is down: its result waits in the agent.
    await waitFor(
      async () =>
        new RegExp(`task\\.report task=${id} state=done`).test(await agentLog("robot-001")),
      { timeoutMs: 30_000, intervalMs: 100, what: "the agent to finish the task offline" },
    );
    assert.notEqual((await stack.task(id)).state, "done", "the result arrived without a broker");
    // Let heartbeats pile up in the agents during the outage too (>= 2 intervals).
    await waitFor(() => Date.now() - killedAt >= 2500, { timeoutMs: 5000, intervalMs: 100 });
    metric("faults.mosquitto_kill.outage_ms", Date.now() - killedAt);
    const t0 = Date.now();
    const r = await stack.mustDevenv("start", "--robots", "2", "--broker", "native");
    metric("faults.mosquitto_kill.devenv_start_ms", Date.now() - t0);
    stack.remember();
    const after = componentPids();
    assert.ok(after.mosquitto && after.mosquitto !== before.mosquitto, "mosquitto not restarted");
    assert.deepEqual(
      { ...after, mosquitto: 0 },
      { ...before, mosquitto: 0 },
      `devenv start restarted more than mosquitto:\n${r.stdout}`,
    );
    const t = await stack.waitTask(id, 60_000);
    metric("faults.mosquitto_kill.task_result_after_restart_ms", Date.now() - t0);
    assert.equal(t.state, "done", JSON.stringify(t));
    assert.equal(t.stdout, "late\n");
    assert.equal(t.exitCode, 0);
    await waitFor(
      async () => (await stack.http<{ ok: boolean }>("/healthz")).body.ok === true,
      { timeoutMs: 60_000, intervalMs: 100, what: "the server to reconnect to the broker" },
    );
    await stack.waitOnline(ROBOTS, 60_000);
    metric("faults.mosquitto_kill.recover_ms", Date.now() - t0);
    await heartbeatsFlow(3);
    const hbAfter = await Promise.all(ROBOTS.map(async (r) => (await stack.robot(r)).heartbeats));
    ROBOTS.forEach((r, i) =>
      assert.ok(hbAfter[i].received > hbBefore[i].received + 3, `${r}: heartbeats did not resume`)
    );
    await stack.assertNoLostHeartbeats("faults.mosquitto_kill");
  },
);

e2e(
  "mosquitto crash: broker-identity's watchdog restarts it on its own; nothing is lost",
  async () => {
    const before = componentPids();
    const mq = stack.pid(stack.files.mosquittoPid);
    assert.ok(mq, "mosquitto is not running");
    const hbBefore = await Promise.all(ROBOTS.map(async (r) => (await stack.robot(r)).heartbeats));
    stack.remember();
    await kill9(mq.pid, mq.startTime, "mosquitto");
    const killedAt = Date.now();
    // No `devenv start`: the broker must come back by itself (grace 5 s, then a restart).
    await waitFor(() => {
      const rec = stack.pid(stack.files.mosquittoPid);
      return rec !== undefined && rec.pid !== mq.pid;
    }, { timeoutMs: 30_000, intervalMs: 100, what: "the watchdog to restart mosquitto" });
    metric("faults.mosquitto_crash.revived_after_ms", Date.now() - killedAt);
    stack.remember();
    const after = componentPids();
    assert.deepEqual(
      { ...after, mosquitto: 0 },
      { ...before, mosquitto: 0 },
      "more than mosquitto was restarted",
    );
    await waitFor(
      async () => (await stack.http<{ ok: boolean }>("/healthz")).body.ok === true,
      { timeoutMs: 60_000, intervalMs: 100, what: "the server to reconnect to the broker" },
    );
    await stack.waitOnline(ROBOTS, 60_000);
    metric("faults.mosquitto_crash.recover_ms", Date.now() - killedAt);
    await heartbeatsFlow(3);
    const hbAfter = await Promise.all(ROBOTS.map(async (r) => (await stack.robot(r)).heartbeats));
    ROBOTS.forEach((r, i) =>
      assert.ok(hbAfter[i].received > hbBefore[i].received + 3, `${r}: heartbeats did not resume`)
    );
    await stack.assertNoLostHeartbeats("faults.mosquitto_crash");
  },
);

e2e(
  "agent kill -9: the last will shows the robot offline within 2 s (connection lost)",
  async () => {
    const rec = stack.pid(stack.agentPidFile("robot-001"));
    assert.ok(rec, "robot-001's agent is not running");
    assert.equal((await stack.robot("robot-001")).online, true, "robot-001 must start online");
    stack.remember();
    Deno.kill(rec.pid, "SIGKILL");
    const killedAt = Date.now();
    let seen: { online: boolean; offlineReason: string | null } | undefined;
    await waitFor(async () => {
      const r = await stack.robot("robot-001");
      if (!r.online) seen = r;
      return !r.online;
    }, { timeoutMs: 15_000, intervalMs: 20, what: "robot-001 offline after kill -9 of its agent" });
    const ms = Date.now() - killedAt;
    metric("faults.agent_kill.offline_ms", ms);
    assert.equal(seen?.offlineReason, "connection lost", "not the last will's reason");
    assert.ok(ms <= 2000, `offline seen ${ms} ms after kill -9 (the promise is 2 s)`);
    // robot-002 never noticed.
    assert.equal((await stack.robot("robot-002")).online, true);
    const t0 = Date.now();
    await stack.mustDevenv("start", "--robots", "2", "--broker", "native");
    stack.remember();
    await stack.waitOnline(ROBOTS, 60_000);
    metric("faults.agent_kill.recover_ms", Date.now() - t0);
    const id = await stack.createTask("robot-001", ["echo", "after-kill"]);
    const t = await stack.waitTask(id, 30_000);
    assert.equal(t.state, "done", JSON.stringify(t));
    await heartbeatsFlow(2);
    await stack.assertNoLostHeartbeats("faults.agent_kill");
  },
);

e2e("k8s4r server kill -9: registry and a pending task survive the restart", async () => {
  const robotsBefore = (await stack.robots()).map((r) => ({ id: r.id, firstSeen: r.firstSeen }));
  // robot-002 goes away gracefully, so its task stays pending.
  const how = await stopPidFile(stack.agentPidFile("robot-002"), 15_000);
  assert.equal(how, "stopped", "robot-002's agent did not stop on SIGTERM");
  await waitFor(async () => !(await stack.robot("robot-002")).online, {
    timeoutMs: 15_000,
    intervalMs: 100,
    what: "robot-002 offline at the server",
  });
  const id = await stack.createTask("robot-002", ["echo", "pending"], 30);
  assert.equal((await stack.task(id)).state, "pending");
  const before = componentPids();
  const srv = stack.pid(stack.files.serverPid);
  assert.ok(srv, "the server is not running");
  stack.remember();
  await kill9(srv.pid, srv.startTime, "the k8s4r server");
  await assert.rejects(stack.robot("robot-001"), "the HTTP API still answers after kill -9");
  const t0 = Date.now();
  const r = await stack.mustDevenv("start", "--robots", "2", "--broker", "native");
  metric("faults.server_kill.devenv_start_ms", Date.now() - t0);
  stack.remember();
  const after = componentPids();
  assert.ok(after.server && after.server !== before.server, "server not restarted");
  assert.ok(after["agent robot-002"], "robot-002's agent not started again");
  for (const k of ["spire-server", "broker-identity", "mosquitto", "agent robot-001"]) {
    assert.equal(after[k], before[k], `${k} was restarted:\n${r.stdout}`);
  }
  const t = await stack.waitTask(id, 60_000);
  metric("faults.server_kill.pending_task_done_ms", Date.now() - t0);
  assert.equal(t.state, "done", JSON.stringify(t));
  assert.equal(t.stdout, "pending\n");
  const robotsAfter = (await stack.robots()).map((r) => ({ id: r.id, firstSeen: r.firstSeen }));
  assert.deepEqual(robotsAfter, robotsBefore, "the robot registry changed");
  await stack.waitOnline(ROBOTS, 60_000);
  metric("faults.server_kill.recover_ms", Date.now() - t0);
  await heartbeatsFlow(3);
  await stack.assertNoLostHeartbeats("faults.server_kill");
});

e2e(
  "SPIRE server stopped for 60 s: robots stay connected, doctor fails, then all green",
  async () => {
    const rec = stack.pid(stack.files.spireServerPid);
    assert.ok(rec, "spire-server is not running");
    stack.remember();
    const hbBefore = await Promise.all(ROBOTS.map(async (r) => (await stack.robot(r)).heartbeats));
    const watch = new OnlineWatch(ROBOTS, 500);
    const stoppedAt = Date.now();
    try {
      assert.equal(await stopPidFile(stack.files.spireServerPid, 15_000), "stopped");
      await waitFor(async () => !(await stack.spireCli().healthy()), {
        timeoutMs: 15_000,
        what: "the SPIRE server to be down",
      });
      const d = await stack.doctor();
      const failed = d.report.checks.filter((c) => c.status === "fail");
      const spireFailed = failed.filter((c) =>
        c.group === "spire-server" || /^spire-server\./.test(c.id)
      );
      console.log(`doctor while SPIRE is down: ${failed.map((c) => c.id).join(", ")}`);
      assert.equal(d.code, 1, "doctor must exit 1 while the SPIRE server is down");
      assert.ok(
        spireFailed.length >= 1,
        `no spire-server check failed: ${failed.map((c) => c.id)}`,
      );
      for (const c of spireFailed) assert.ok(c.hint, `${c.id} failed without a hint`);
      // Tasks keep working without SPIRE: the robots hold their SVIDs.
      const id = await stack.createTask("robot-002", ["echo", "no-spire"]);
      const t = await stack.waitTask(id, 30_000);
      assert.equal(t.state, "done");
      assert.equal(t.stdout, "no-spire\n");
      // Keep it down for 60 s; heartbeats keep arriving all along.
      await waitFor(() => Date.now() - stoppedAt >= 60_000, { timeoutMs: 70_000, intervalMs: 500 });
      const hbMid = await Promise.all(ROBOTS.map(async (r) => (await stack.robot(r)).heartbeats));
      ROBOTS.forEach((r, i) =>
        assert.ok(
          hbMid[i].received >= hbBefore[i].received + 30,
          `${r}: only ${hbMid[i].received - hbBefore[i].received} heartbeats in 60 s`,
        )
      );
    } finally {
      await watch.stop();
    }
    metric("faults.spire_server_stop.down_ms", Date.now() - stoppedAt);
    metric("faults.spire_server_stop.offline_observations", watch.offline.length);
    assert.deepEqual(watch.offline, [], "a robot went offline while SPIRE was down");
    assert.equal(watch.errors, 0, "the server's API failed while SPIRE was down");
    const t0 = Date.now();
    await stack.mustDevenv("start", "--robots", "2", "--broker", "native");
    stack.remember();
    let last = "";
    await waitFor(async () => {
      const d = await stack.doctor();
      last = d.report.checks.filter((c) => c.status !== "ok").map((c) => `${c.id}: ${c.detail}`)
        .join("; ");
      return d.code === 0 && last === "";
    }, { timeoutMs: 60_000, intervalMs: 1000, what: "doctor to be all green" }).catch((err) => {
      throw new Error(`${(err as Error).message}: ${last}`);
    });
    metric("faults.spire_server_stop.recover_ms", Date.now() - t0);
    await stack.waitOnline();
    await heartbeatsFlow(2);
    await stack.assertNoLostHeartbeats("faults.spire_server_stop");
  },
);

Deno.test({
  name: "e2e faults: teardown: stop and clean leave no process and no listening port",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await stack.teardown();
  },
});
