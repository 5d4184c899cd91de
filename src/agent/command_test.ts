import assert from "node:assert/strict";
import { join } from "node:path";
import { CliError } from "../cli/errors.ts";
import { bufferIo } from "../cli/io.ts";
import type { ProcessRunner } from "../process/mod.ts";
import { runAgent } from "./command.ts";
import { agentConfigFromText } from "./config.ts";
import { requireTaskUser } from "./task_user.ts";

/** A runner that records every command and runs none. */
function recordingRunner(): ProcessRunner & { calls: string[] } {
  const calls: string[] = [];
  return {
    calls,
    output(cmd, args) {
      calls.push([cmd, ...args].join(" "));
      return Promise.reject(new Error(`not in this test: ${cmd}`));
    },
    spawn(spec) {
      calls.push(spec.cmd);
      return Promise.reject(new Error(`not in this test: ${spec.cmd}`));
    },
  };
}

Deno.test("runAgent as root: tasks allowed without tasks.user refuse to start, naming the file and tasks.user", async () => {
  assert.equal(Deno.uid(), 0, "this test is about a root agent: run it as root (CI does)");
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-agent-cmd-" });
  try {
    const file = join(dir, "agent.yaml");
    const yaml =
      `robot:\n  id: robot-001\nspire:\n  dataDir: ${dir}/data\ntasks:\n  allow: [echo]\n`;
    const { config } = agentConfigFromText(yaml, {
      cwd: dir,
      env: {},
      flags: {},
      file,
      display: file,
    });
    const runner = recordingRunner();
    const logged: string[] = [];
    await assert.rejects(
      runAgent(config, bufferIo({ cwd: dir, runner }), (e) => logged.push(e)),
      (e: Error) => {
        assert.ok(e instanceof CliError, `${e.name}: ${e.message}`);
        assert.equal(e.exitCode, 1);
        assert.ok(!e.message.includes("\n"), "one line");
        assert.match(e.message, new RegExp(`^${file}: tasks\\.user: not set, but tasks\\.allow`));
        assert.match(e.hint!, /user: k8s4r-task/);
        return true;
      },
    );
    assert.deepEqual(runner.calls, [], "nothing was started");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("requireTaskUser: only root with tasks allowed needs one", () => {
  const f = "/etc/k8s4r/agent.yaml";
  assert.throws(() => requireTaskUser({ allow: ["*"] }, f, 0), /tasks\.user: not set/);
  // Positive controls: with a user, with nothing allowed, or not as root, it starts.
  requireTaskUser({ allow: ["*"], user: "k8s4r-task" }, f, 0);
  requireTaskUser({ allow: [] }, f, 0);
  requireTaskUser({ allow: ["*"] }, f, 1000);
});
