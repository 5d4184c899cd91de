// Spawns the real CLI in an empty project dir (free ports, private socket dir): nothing runs
// there, so doctor must report failures with hints and exit 1.
import assert from "node:assert/strict";
import { fileURLToPath as fromFileUrl } from "node:url";
import { bufferIo } from "../src/cli/io.ts";
import { defaultLayout, layoutEnv, robotLayout } from "../src/devenv/layout.ts";
import { fetchX509Svids } from "../src/doctor/adapters.ts";
import { processStartTime, realRunner, waitFor } from "../src/process/mod.ts";
import { SpireAgentSupervisor } from "../src/spire/agent.ts";
import type { SpireServerDaemon } from "../src/spire/server.ts";
import { freeMonitoringPorts, freePorts } from "./helpers/ports.ts";
import {
  bootstrapFiles,
  spireBinaries,
  startTmpSpireServer,
  tmpSpireAgent,
} from "./helpers/spire.ts";

const MAIN = fromFileUrl(new URL("../main.ts", import.meta.url));
const CONFIG = fromFileUrl(new URL("../deno.json", import.meta.url));

async function doctor(args: string[]) {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-doctor-cli-" });
  try {
    const [spireServer, mqttPlain, mqttTls, http] = freePorts(4);
    const env: Record<string, string> = {
      NO_COLOR: "1",
      ...layoutEnv(
        { spireServer, mqttPlain, mqttTls, http, ...freeMonitoringPorts(1) },
        { agentSocketDir: `${dir}/sockets` },
      ),
    };
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--config", CONFIG, MAIN, "doctor", ...args],
      cwd: dir,
      env,
      stdout: "piped",
      stderr: "piped",
    }).output();
    const td = new TextDecoder();
    return { code: out.code, stdout: td.decode(out.stdout), stderr: td.decode(out.stderr) };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("doctor --json in an empty project reports failures with hints and exits 1", async () => {
  const r = await doctor(["--json"]);
  assert.equal(r.code, 1, r.stderr);
  const j = JSON.parse(r.stdout);
  assert.deepEqual(Object.keys(j), ["checks", "summary"]);
  const failed = j.checks.filter((c: { status: string }) => c.status === "fail");
  assert.ok(failed.length >= 5, r.stdout);
  for (const c of failed) {
    assert.deepEqual(Object.keys(c), ["id", "group", "title", "status", "detail", "hint", "ms"]);
    assert.equal(typeof c.hint, "string", `${c.id} has no hint`);
    assert.ok(c.hint.length > 0);
  }
  const byId = Object.fromEntries(j.checks.map((c: { id: string }) => [c.id, c]));
  assert.equal(byId["spire-server.port"].status, "fail");
  assert.equal(byId["spire-agent.svid"].status, "skip");
  assert.equal(byId["spire-agent.svid"].detail, "skipped: spire-agent.socket failed");
  assert.equal(j.summary.crash, 0, r.stdout);
});

Deno.test("doctor --only bogus is a usage error (exit 2) listing the groups", async () => {
  const r = await doctor(["--only", "brokr"]);
  assert.equal(r.code, 2);
  assert.match(
    r.stderr,
    /unknown group 'brokr' \(did you mean 'broker'\?\); groups: tools, config/,
  );
  const b = await doctor(["--only", "bogus"]);
  assert.equal(b.code, 2);
});

Deno.test("doctor --only config prints one group in human form", async () => {
  const r = await doctor(["--only", "config"]);
  assert.equal(r.code, 1);
  assert.match(r.stdout, /^\[config\]\n✗ SPIRE server config\n/);
  assert.match(r.stdout, /\d+ ok, \d+ warnings, \d+ failed, \d+ skipped, 0 crashed in \d+ ms\n$/);
});

// ---------------------------------------------------------------------------------------------
// A real spire-agent frozen with SIGSTOP: the checks that talk to it time out, and each says
// which process is stopped and how to resume it. Control: the same checks pass before the
// SIGSTOP and after the SIGCONT.

type Json = { checks: { id: string; status: string; detail: string; hint: string | null }[] };
const FROZEN = ["spire-agent.health", "spire-agent.svid", "ca-bundle.current"];

Deno.test({
  name: "doctor: a SIGSTOPped spire-agent fails health, svid and ca-bundle with hints naming it",
  // grpc-js keeps timers briefly after close; every process is stopped and checked in finally.
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    const bins = await spireBinaries();
    // Short: the agent socket path must stay under 107 bytes.
    const tmp = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-dr-" });
    const [spireServer, mqttPlain, mqttTls, http] = freePorts(4);
    const env: Record<string, string> = {
      NO_COLOR: "1",
      PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
      HOME: Deno.env.get("HOME") ?? tmp,
      ...layoutEnv(
        { spireServer, mqttPlain, mqttTls, http, ...freeMonitoringPorts(1) },
        { agentSocketDir: `${tmp}/s` },
      ),
    };
    const layout = defaultLayout(tmp, env);
    const robot = robotLayout(layout, "robot-001", env);
    const io = bufferIo({ env: Deno.env.toObject(), runner: realRunner, cwd: tmp });
    let server: SpireServerDaemon | undefined;
    let agent: SpireAgentSupervisor | undefined;
    let frozen: number | undefined;
    const pids: number[] = [];
    const doctor = async () => {
      const out = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          "--config",
          CONFIG,
          MAIN,
          "doctor",
          "--json",
          "--only",
          "spire-agent",
          "--only",
          "ca-bundle",
        ],
        cwd: tmp,
        env,
        clearEnv: true,
        stdout: "piped",
        stderr: "piped",
      }).output();
      const text = new TextDecoder().decode(out.stdout);
      const j = JSON.parse(text) as Json;
      return { code: out.code, text, byId: Object.fromEntries(j.checks.map((c) => [c.id, c])) };
    };
    try {
      const started = await startTmpSpireServer(io, bins, tmp, spireServer, {
        socketPath: layout.spireServerSocket,
      });
      server = started.server;
      const cli = started.cli;
      pids.push(server.pid);
      await Deno.mkdir(`${tmp}/config/mosquitto/certs`, { recursive: true });
      await Deno.mkdir(`${tmp}/.dev-env/tokens`, { recursive: true, mode: 0o700 });
      await bootstrapFiles(cli, tmp, robot.nodeSpiffeId, {
        bundleFile: layout.caBundleFile,
        tokenFile: robot.joinTokenFile,
      });
      await cli.reconcileEntry({
        spiffeId: robot.spiffeId,
        parentId: robot.nodeSpiffeId,
        selectors: [`unix:uid:${Deno.uid()}`],
        dnsNames: ["robot-001"],
        x509SvidTtl: 3600,
      });
      // The agent on the devenv layout's paths, where doctor looks.
      agent = tmpSpireAgent(bins, tmp, {
        trustDomain: layout.trustDomain,
        serverPort: spireServer,
        dataDir: robot.agentDataDir,
        socketPath: robot.agentSocket,
        logFile: robot.logFile,
        trustBundlePath: layout.caBundleFile,
        joinTokenFile: robot.joinTokenFile,
      });
      await agent.start();
      const pid = agent.pid!;
      pids.push(pid);
      await waitFor(
        async () =>
          (await fetchX509Svids(robot.agentSocket, 1000).catch(() => [])).some((s) =>
            s.spiffeId === robot.spiffeId
          ),
        { timeoutMs: 30_000, intervalMs: 200, what: "robot-001's SVID from the Workload API" },
      );

      await t.step("control: every check passes while spire-agent runs", async () => {
        const r = await doctor();
        for (const id of FROZEN) assert.equal(r.byId[id]?.status, "ok", `${id}: ${r.text}`);
        assert.equal(r.code, 0, r.text);
      });

      await t.step("SIGSTOP: the three checks fail, naming the stopped process", async () => {
        Deno.kill(pid, "SIGSTOP");
        frozen = pid;
        await waitFor(
          () => Deno.readTextFileSync(`/proc/${pid}/stat`).split(") ")[1]?.startsWith("T"),
          { timeoutMs: 5000, what: "spire-agent in state T" },
        );
        const r = await doctor();
        assert.equal(r.code, 1, r.text);
        for (const id of FROZEN) {
          const c = r.byId[id];
          assert.equal(c?.status, "fail", `${id}: ${r.text}`);
          // The budget is 2000 ms, less what a slow dependency took on a busy machine.
          const cut = c.detail.indexOf(": ");
          assert.match(c.detail.slice(0, cut), /^timed out after \d+ ms$/, `${id}: ${c.detail}`);
          assert.equal(
            c.detail.slice(cut + 2),
            `spire-agent (pid ${pid}) serving ${robot.agentSocket} is stopped (state T in /proc/${pid}/stat)`,
            id,
          );
          assert.equal(
            c.hint,
            `spire-agent (pid ${pid}) is stopped (SIGSTOP or Ctrl-Z): kill -CONT ${pid}, then rerun k8s4r doctor`,
            id,
          );
        }
        assert.equal(r.byId["spire-agent.socket"]?.status, "ok", r.text);
      });

      await t.step("control: after SIGCONT the same checks pass again", async () => {
        Deno.kill(pid, "SIGCONT");
        frozen = undefined;
        const r = await doctor();
        for (const id of FROZEN) assert.equal(r.byId[id]?.status, "ok", `${id}: ${r.text}`);
        assert.equal(agent!.pid, pid, "the agent was restarted: the SIGCONT proof is void");
      });
    } finally {
      if (frozen !== undefined) Deno.kill(frozen, "SIGCONT");
      await agent?.stop().catch(() => {});
      await server?.stop().catch(() => {});
      for (const p of pids) assert.equal(processStartTime(p), undefined, `pid ${p} survived`);
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
    }
  },
});
