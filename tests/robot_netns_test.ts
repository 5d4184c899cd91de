/**
 * A robot on another host, over a real link: the robot host is a network namespace
 * (tests/helpers/netns.ts) that reaches the control host only through its veth link. The test
 * binds the SPIRE server's agent API and the broker's mTLS listener to the control host's
 * address on that link (it writes their configs itself; `devenv start --advertise` comes later),
 * enrolls the robot with `k8s4r agent --enroll` run inside the namespace, and runs the doctor
 * there: all green while healthy, a precise failure with the cable pulled, green again after.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { startControlHost } from "./helpers/control_host.ts";
import { startCli } from "./helpers/cli.ts";
import { TestNetwork } from "./helpers/netns.ts";
import { processStartTime } from "../src/process/mod.ts";
import { listeningSockets } from "../src/doctor/proc_net.ts";

const ROBOT = "robot-099";

interface Report {
  checks: { id: string; status: string; detail: string; hint?: string }[];
}

Deno.test({
  name:
    "robot host in a namespace: enroll over the link, doctor green, cable pulled: precise failure",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    const net = await TestNetwork.create();
    const pids: number[] = [];
    let ch: Awaited<ReturnType<typeof startControlHost>> | undefined;
    try {
      const h = await net.addHost();
      ch = await startControlHost({ bindAddress: h.controlAddress });
      const dir = join(ch.dir, "robot");
      const file = join(ch.dir, `${ROBOT}.enroll.json`);
      const e = await ch.addJoinTokenRobot(ROBOT, file);
      assert.equal(e.spireServerAddress, `${h.controlAddress}:${ch.spirePort}`);

      // Nothing of ours listens outside loopback and the test range.
      const socks = listeningSockets();
      for (const port of [ch.spirePort, ch.broker.tlsPort, ch.broker.plainPort]) {
        for (const s of socks.filter((x) => x.port === port)) {
          assert.ok(
            s.address === "127.0.0.1" || s.address === h.controlAddress,
            `port ${port} listens on ${s.address}`,
          );
        }
      }

      const doctor = async (): Promise<Report & { code: number }> => {
        const d = startCli(["doctor", "--data-dir", dir, "--json"], { prefix: h.exec });
        const code = await d.exited;
        try {
          return { code, ...JSON.parse(d.stdout()) };
        } catch {
          throw new Error(`doctor printed no JSON (exit ${code}):\n${d.stdout()}\n${d.stderr()}`);
        }
      };

      const agent = startCli(["agent", "--enroll", file, "--data-dir", dir], { prefix: h.exec });
      pids.push(agent.pid);
      try {
        await t.step("enrolled from the robot host over the link: online", async () => {
          await ch!.waitForRegister(ROBOT, 1);
          pids.push(...agent.children());
        });

        await t.step("doctor inside the robot host: all green", async () => {
          const r = await doctor();
          const bad = r.checks.filter((c) => !["ok", "skip"].includes(c.status));
          assert.deepEqual(bad.map((c) => `${c.id}: ${c.detail}`), []);
          assert.equal(r.code, 0);
        });

        await t.step("cable pulled: the doctor names the unreachable control host", async () => {
          await net.pullCable(h);
          try {
            const r = await doctor();
            assert.equal(r.code, 1);
            const by = Object.fromEntries(r.checks.map((c) => [c.id, c]));
            const spire = by["reachability.spire-server-tcp"];
            console.log(`  cable pulled: ${spire.id}: ${spire.detail}\n    hint: ${spire.hint}`);
            assert.equal(spire.status, "fail", JSON.stringify(spire));
            assert.match(
              spire.detail,
              new RegExp(
                `^the SPIRE server at ${h.controlAddress.replace(/\./g, "\\.")}:${ch!.spirePort}: `,
              ),
            );
            assert.match(
              spire.hint ?? "",
              new RegExp(`ip route get ${h.controlAddress.replace(/\./g, "\\.")}`),
            );
            assert.equal(by["reachability.broker-tcp"].status, "fail");
            // What does not depend on the network still passes.
            assert.equal(by["enrollment.config"].status, "ok");
            assert.equal(by["identity.clock"].status, "ok");
          } finally {
            await net.plugCable(h);
          }
        });

        await t.step("cable plugged back: green again", async () => {
          const r = await doctor();
          const bad = r.checks.filter((c) => !["ok", "skip"].includes(c.status));
          assert.deepEqual(bad.map((c) => `${c.id}: ${c.detail}`), []);
        });
      } finally {
        assert.equal(await agent.stop(), 0, agent.stderr());
      }
    } finally {
      await ch?.stop();
      await net.close();
      for (const pid of pids) {
        assert.equal(processStartTime(pid), undefined, `process ${pid} survived the test`);
      }
    }
    assert.deepEqual(await TestNetwork.leftovers(), []);
  },
});
