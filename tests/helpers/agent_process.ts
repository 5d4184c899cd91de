/**
 * The real `k8s4r agent` CLI as a child process for integration tests: `--no-manage-spire`
 * against a Workload API socket (a FakeWorkloadApi or a real SPIRE agent), a real broker's TLS
 * port, heartbeats every second. Its stderr (one line per event) is collected in `log`.
 */
import type { TestBroker } from "./broker.ts";
import { waitFor } from "../../src/process/mod.ts";
import { agentRunArgs, agentV8FlagsEnv } from "../../src/agent/runtime_flags.ts";

const MAIN = new URL("../../main.ts", import.meta.url).pathname;

export class AgentProcess {
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

  static spawn(
    dir: string,
    broker: TestBroker,
    socketPath: string,
    opts: { robotId?: string; config?: string } = {},
  ): AgentProcess {
    // The agent's runtime flags, as devenv and the unit of `agent service` run it.
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        ...agentRunArgs(["run", "-A", MAIN]),
        "agent",
        "--robot-id",
        opts.robotId ?? "robot-001",
        "--config",
        opts.config ?? "plugins.yaml",
        "--socket",
        socketPath,
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
