/**
 * Tasks run without the robot's identity, against REAL SPIRE v1.13.3: a spire-server and a
 * join-token spire-agent in a temp dir, and a registration entry for the robot that selects the
 * agent's uid (as devenv's does). A task asks that agent's Workload API for an X.509 SVID with
 * SPIRE's own client (`spire-agent api fetch x509`), through the agent's task runner (the code
 * `k8s4r agent` runs tasks with):
 *
 * - control: run as the agent's uid (no `tasks.user`), the task gets the robot's SVID and key;
 *   this is the hole issue 11 closes;
 * - as a dedicated task user (created here with `ensureTaskUser`, removed afterwards), the same
 *   task gets PermissionDenied: no entry selects its uid.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { freePort } from "./helpers/ports.ts";
import {
  bootstrapFiles,
  spireBinaries,
  startTmpSpireServer,
  tmpSpireAgent,
} from "./helpers/spire.ts";
import { bufferIo } from "../src/cli/io.ts";
import { processStartTime, realRunner } from "../src/process/mod.ts";
import { X509Source } from "../src/spiffe/mod.ts";
import { SpireAgentSupervisor } from "../src/spire/agent.ts";
import { SpireServerCli, startSpireServer } from "../src/spire/server.ts";
import { type TaskReport, TaskRunner } from "../src/agent/task_runner.ts";
import { ensureTaskUser, removeTaskUser, resolveTaskUser } from "../src/agent/task_user.ts";

const TD = "k8s4r.example.org";

Deno.test({
  name:
    "real SPIRE: a task calling the Workload API gets PermissionDenied as tasks.user (the robot's SVID as the agent's uid)",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    assert.equal(Deno.uid(), 0, "this test creates a system user: run it as root (CI does)");
    const bins = await spireBinaries();
    const tmp = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-ti-" });
    // The task user must reach the socket and the client binary (never anything else of ours).
    await Deno.chmod(tmp, 0o755);
    const io = bufferIo({ env: Deno.env.toObject(), runner: realRunner, cwd: tmp });
    const port = freePort();
    const nodeId = `spiffe://${TD}/k8s4r/node/robot-001`;
    const robotId = `spiffe://${TD}/robot/robot-001`;
    const userName = `k8s4r-ti${crypto.randomUUID().slice(0, 6)}`;
    let server: Awaited<ReturnType<typeof startSpireServer>> | undefined;
    let agent: SpireAgentSupervisor | undefined;
    const pids: number[] = [];
    const runners: TaskRunner[] = [];
    try {
      let cli: SpireServerCli;
      ({ server, cli } = await startTmpSpireServer(io, bins, tmp, port));
      pids.push(server.pid);
      await bootstrapFiles(cli, tmp, nodeId);
      // The robot's entry selects the agent's uid, as devenv's does.
      await cli.reconcileEntry({
        spiffeId: robotId,
        parentId: nodeId,
        selectors: [`unix:uid:${Deno.uid()}`],
        dnsNames: ["robot-001"],
        x509SvidTtl: 3600,
      });
      const socketPath = `${tmp}/a/agent.sock`;
      agent = tmpSpireAgent(bins, tmp, { trustDomain: TD, serverPort: port });
      await agent.start();
      pids.push(agent.pid!);
      // The entry is live once the agent's own uid gets the SVID.
      const src = await X509Source.create({
        address: `unix://${socketPath}`,
        spiffeId: robotId,
        timeoutMs: 45_000,
      });
      await src.close();

      // SPIRE's own Workload API client, where the task user can run it.
      const client = join(tmp, "bin", "spire-agent");
      await Deno.mkdir(join(tmp, "bin"), { mode: 0o755 });
      await Deno.chmod(join(tmp, "bin"), 0o755);
      await Deno.copyFile(bins.agent, client);
      await Deno.chmod(client, 0o755);
      const fetch = ["api", "fetch", "x509", "-socketPath", socketPath, "-timeout", "5s"];

      const runTask = async (runner: TaskRunner, id: string) => {
        const reports: TaskReport[] = [];
        await runner.handle(
          { id, command: [client, ...fetch], env: {}, timeoutSeconds: 60 },
          (r) => reports.push(r),
        );
        return reports[reports.length - 1];
      };
      const runnerFor = (state: string, user?: Awaited<ReturnType<typeof resolveTaskUser>>) => {
        const r = new TaskRunner({
          allow: [client],
          stateDir: join(tmp, state),
          defaultCwd: "/",
          killGraceMs: 1000,
          user,
        });
        runners.push(r);
        return r;
      };

      await t.step("control: as the agent's uid, the task receives the robot's SVID", async () => {
        const f = await runTask(runnerFor("state-agent"), "as-agent");
        assert.equal(f.state, "done", JSON.stringify(f));
        assert.equal(f.exitCode, 0, f.stderr ?? "");
        assert.match(f.stdout!, new RegExp(`SPIFFE ID:\\s+${robotId}`));
      });

      await t.step("as tasks.user, the same task gets PermissionDenied", async () => {
        await ensureTaskUser(realRunner, userName);
        const user = await resolveTaskUser(realRunner, userName);
        const f = await runTask(runnerFor("state-user", user), "as-task-user");
        assert.equal(f.state, "done", JSON.stringify(f));
        assert.notEqual(f.exitCode, 0);
        const out = `${f.stdout}\n${f.stderr}`;
        assert.match(out, /PermissionDenied/);
        assert.match(out, /no identity issued/);
        assert.doesNotMatch(out, /SPIFFE ID:/);
      });
    } finally {
      for (const r of runners) await r.ids.close().catch(() => {});
      await agent?.stop().catch(() => {});
      await server?.stop().catch(() => {});
      await removeTaskUser(realRunner, userName); // fails the test if the user stays
      for (const pid of pids) {
        assert.equal(processStartTime(pid), undefined, `process ${pid} survived the test`);
      }
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
    }
  },
});
