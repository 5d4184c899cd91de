/**
 * A robot on its own host (a network namespace of tests/helpers/netns.ts) as the multi-host e2e
 * suites run it: its home (where its commands run), its K8S4R_DATA_DIR, its `k8s4r agent` and the
 * pids that must be gone at the end. One teardown for all of them.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { processStartTime } from "../../src/process/mod.ts";
import type { CliProcess } from "./cli.ts";
import { type RobotHost, TestNetwork } from "./netns.ts";

export interface RemoteRobot {
  id: string;
  host: RobotHost;
  /** Where its commands run (the enrollment file is copied here). */
  home: string;
  /** K8S4R_DATA_DIR: agent.yaml, the SPIRE agent's data, the Workload API socket. */
  data: string;
  agent?: CliProcess;
  pids: number[];
}

/**
 * Stops every robot's agent (only `cutOff`'s may exit non-zero: it was removed), then the stack
 * and the test network, and checks that no process of any robot survived and no namespace is left.
 */
export async function teardownRemoteRobots(
  robots: Iterable<RemoteRobot>,
  stack: { teardown(): Promise<void> },
  net: TestNetwork | undefined,
  cutOff: string,
): Promise<void> {
  const all = [...robots];
  for (const r of all) {
    if (r.agent) {
      r.pids.push(...r.agent.children());
      const code = await r.agent.stop();
      assert.ok(code === 0 || r.id === cutOff, `${r.id} agent exited ${code}`);
    }
  }
  await stack.teardown();
  await net?.close();
  for (const r of all) {
    for (const pid of r.pids) {
      assert.equal(processStartTime(pid), undefined, `process ${pid} of ${r.id} survived`);
    }
    await Deno.remove(join(r.home, ".."), { recursive: true }).catch(() => {});
  }
  assert.deepEqual(await TestNetwork.leftovers(), []);
}

/** Removes the robots' home directories when the test process ends, whatever happened. */
export function removeHomesOnUnload(robots: Map<string, RemoteRobot>): void {
  globalThis.addEventListener("unload", () => {
    for (const r of robots.values()) {
      try {
        Deno.removeSync(join(r.home, ".."), { recursive: true });
      } catch { /* gone */ }
    }
  });
}
