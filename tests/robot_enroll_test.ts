/**
 * A robot host enrolled for real: the test plays the control host by hand (a real spire-server
 * and a real Mosquitto whose certificate is an SVID of that server; token generate, entry create
 * with `-dns <robotId>`, bundle show, the enrollment file), then runs the real CLI on the robot
 * side: `k8s4r agent --enroll FILE --data-dir DIR`, and after that `k8s4r agent --data-dir DIR`
 * alone. "Connected" is seen on the broker: the robot's register message arrives on the fleet
 * server's listener, under the robot's own topic (the ACL lets a CN publish only there).
 *
 * The agent SVID's lifetime is short here (agent_ttl 20 s) so that the lockout of an idle
 * join-token robot is real: the robot is stopped, its agent SVID expires, and on restart the
 * agent refuses to go on with its used token and says what to run on the control host.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { startControlHost } from "./helpers/control_host.ts";
import { startCli } from "./helpers/cli.ts";
import { processStartTime, waitFor } from "../src/process/mod.ts";
import { isAttested } from "../src/spire/agent.ts";
import { readAgentData } from "../src/spire/agent_state.ts";
import { AGENT_DENO_RUN_FLAGS, agentV8FlagsEnv } from "../src/agent/runtime_flags.ts";

const ROBOT = "robot-077";
const opts = { sanitizeOps: false, sanitizeResources: false };

Deno.test({
  name:
    "join token: agent --enroll connects; --data-dir alone reconnects without the token; an idle robot past its SVID is locked out, and says what to run",
  ...opts,
  fn: async (t) => {
    const ch = await startControlHost({ agentTtl: "20s" });
    const dir = join(ch.dir, "robot");
    const file = join(ch.dir, `${ROBOT}.enroll.json`);
    const pids: number[] = [];
    try {
      const e = await ch.addJoinTokenRobot(ROBOT, file);
      assert.equal((await Deno.stat(file)).mode! & 0o777, 0o600);
      const token = e.attestation.type === "join_token" ? e.attestation.token! : "";

      await t.step("agent --enroll: attests, connects, registers", async () => {
        const agent = startCli(["agent", "--enroll", file, "--data-dir", dir]);
        pids.push(agent.pid);
        try {
          await ch.waitForRegister(ROBOT, 1);
          pids.push(...agent.children()); // spire-agent: it must die with the agent
          const reg = ch.registers.get(ROBOT)![0];
          assert.equal(
            reg.type === "register" && reg.spiffeId,
            `spiffe://k8s4r.example.org/robot/${ROBOT}`,
          );
          // The token is on no command line and in no log.
          for (const pid of [agent.pid, ...agent.children()]) {
            const cmd = await Deno.readTextFile(`/proc/${pid}/cmdline`).catch(() => "");
            assert.ok(!cmd.includes(token), `pid ${pid} has the token on its command line`);
          }
          // The agent runs with its runtime flags (src/agent/runtime_flags.ts), as the unit of
          // `agent service` and devenv run it.
          const argv = (await Deno.readTextFile(`/proc/${agent.pid}/cmdline`)).split("\0");
          for (const f of AGENT_DENO_RUN_FLAGS) assert.ok(argv.includes(f), `no ${f}: ${argv}`);
          const environ = (await Deno.readTextFile(`/proc/${agent.pid}/environ`)).split("\0");
          assert.ok(
            environ.includes(`DENO_V8_FLAGS=${agentV8FlagsEnv(Deno.env.get("DENO_V8_FLAGS"))}`),
          );
          // The files the robot keeps, with their modes.
          const mode = async (p: string) => (await Deno.stat(join(dir, p))).mode! & 0o777;
          assert.equal(await mode("."), 0o700);
          assert.equal(await mode("join-token"), 0o600);
          assert.equal(await mode("enrollment.json"), 0o600);
          assert.equal(await mode("agent.yaml"), 0o600);
          assert.equal(await Deno.readTextFile(join(dir, "join-token")), token);
          const record = await Deno.readTextFile(join(dir, "enrollment.json"));
          assert.ok(!record.includes(token), "the token is in enrollment.json");
          const yaml = await Deno.readTextFile(join(dir, "agent.yaml"));
          assert.match(yaml, new RegExp(`id: ${ROBOT}`));
          assert.match(yaml, /nodeAttestor: join_token/);
          assert.ok(!yaml.includes(token), "the token is in agent.yaml");
          assert.equal(await isAttested(dir), true);
          const state = (await readAgentData(dir))!;
          assert.equal(state.attestor, "join_token");
          assert.equal(state.reattestable, false);
        } finally {
          assert.equal(await agent.stop(), 0, `agent exit:\n${agent.stderr()}`);
        }
        assert.ok(!agent.stderr().includes(token), "the token is in the agent's output");
        assert.match(agent.stderr(), new RegExp(`enrolled ${ROBOT} \\(join_token\\)`));
      });

      await t.step("agent --data-dir alone: reconnects without the token", async () => {
        await Deno.remove(join(dir, "join-token"));
        const agent = startCli(["agent", "--data-dir", dir]);
        pids.push(agent.pid);
        try {
          await ch.waitForRegister(ROBOT, 2);
          // The doctor on the robot host, against the real thing: all green.
          const doc = startCli(["doctor", "--data-dir", dir, "--json"]);
          assert.equal(await doc.exited, 0, doc.stdout() + doc.stderr());
          const report = JSON.parse(doc.stdout());
          const byId = Object.fromEntries(
            report.checks.map((c: { id: string }) => [c.id, c]),
          ) as Record<string, { status: string; detail: string }>;
          for (const [id, c] of Object.entries(byId)) {
            assert.ok(["ok", "skip"].includes(c.status), `${id}: ${c.status}: ${c.detail}`);
          }
          assert.match(
            byId["reachability.broker-tls"].detail,
            /identified by the broker \(CONNACK 0x8c .*the agent's session is not touched\)/,
          );
          // The broker makes a certificate's CN its client id: the doctor's probe with the
          // robot's own SVID reached the broker and did not take the running agent's session.
          const brokerLog = await Deno.readTextFile(ch.broker.files.logFile);
          assert.match(
            brokerLog,
            /bad AUTH method/,
            "the doctor's CONNECT never reached the broker",
          );
          assert.doesNotMatch(
            brokerLog,
            new RegExp(`Client ${ROBOT} already connected, closing old connection`),
            "k8s4r doctor took the running agent's session over",
          );
          assert.match(
            byId["reachability.spire-server-tls"].detail,
            /TLS verified, spiffe:\/\/k8s4r\.example\.org\/spire\/server/,
          );
          assert.match(byId["identity.agent"].detail, /SERVING/);
          assert.equal(
            byId["enrollment.join-token"].detail,
            "used by the first attestation: a join token works once",
          );
        } finally {
          assert.equal(await agent.stop(), 0, `agent exit:\n${agent.stderr()}`);
        }
        assert.match(agent.stderr(), /spire_agent\.starting attempt=0 withToken=false/);
      });

      await t.step(
        "off past its agent SVID's lifetime: locked out, with the command to run",
        async () => {
          // Stopped: nothing renews the agent SVID. Wait (on the file, not a timer) until it expired.
          await waitFor(async () => !(await isAttested(dir)), {
            timeoutMs: 60_000,
            intervalMs: 500,
            what: "the stopped robot's agent SVID to expire",
          });
          // With the used token back in place, spire-agent tries it and SPIRE refuses it.
          await Deno.writeTextFile(join(dir, "join-token"), token, { mode: 0o600 });
          const withUsed = startCli(["agent", "--data-dir", dir]);
          pids.push(withUsed.pid);
          assert.equal(await withUsed.exited, 1, withUsed.stderr());
          const hint =
            `hint: on the control host run: k8s4r robot add ${ROBOT} --out ${ROBOT}.enroll.json; then on this robot: k8s4r agent --enroll ${ROBOT}.enroll.json --data-dir ${dir}`;
          assert.match(
            withUsed.stderr(),
            new RegExp(
              `k8s4r: the agent SVID of ${ROBOT} expired at \\S+ \\(\\d+s ago\\): the robot was off longer than the SVID's lifetime, and a join-token robot cannot attest again with its used token \\(spire-agent could not attest to the SPIRE server: .*join token does not exist or has already been used`,
            ),
          );
          assert.ok(withUsed.stderr().includes(hint), withUsed.stderr());
          assert.ok(!withUsed.stderr().includes(token), "the token is in the agent's output");
          // Without any token: the same verdict before spire-agent is even started.
          await Deno.remove(join(dir, "join-token"));
          const none = startCli(["agent", "--data-dir", dir]);
          pids.push(none.pid);
          assert.equal(await none.exited, 1, none.stderr());
          assert.match(
            none.stderr(),
            /a join-token robot cannot attest again with its used token\n/,
          );
          assert.ok(none.stderr().includes(hint), none.stderr());
          assert.doesNotMatch(none.stderr(), /spire_agent\.starting/);
          // The doctor says the same, with the same command to run.
          const doc = startCli(["doctor", "--data-dir", dir, "--json", "--only", "identity"]);
          assert.equal(await doc.exited, 1);
          const svid = JSON.parse(doc.stdout()).checks.find((c: { id: string }) =>
            c.id === "identity.agent-svid"
          );
          assert.equal(svid.status, "fail");
          assert.match(svid.detail, /a join-token robot cannot attest again with its used token$/);
          assert.equal(`hint: ${svid.hint}`, hint);
        },
      );

      await t.step(
        "a bad or expired enrollment file: one line, what to run on the control host",
        async () => {
          const expired = join(ch.dir, "expired.json");
          await ch.addJoinTokenRobot("robot-078", expired, 1);
          await waitFor(() =>
            Date.now() >
              Date.parse(JSON.parse(Deno.readTextFileSync(expired)).attestation.expiresAt), {
            timeoutMs: 5000,
            intervalMs: 100,
            what: "the 1 s token to expire",
          });
          const r = startCli(["agent", "--enroll", expired, "--data-dir", join(ch.dir, "r78")]);
          pids.push(r.pid);
          assert.equal(await r.exited, 2, r.stderr());
          const lines = r.stderr().trim().split("\n");
          assert.equal(lines.length, 2, r.stderr());
          assert.match(
            lines[0],
            /^k8s4r: .*expired\.json:15: attestation\.expiresAt: the join token expired at .* ago\); join tokens are single use and short-lived; on the control host run: k8s4r robot add robot-078 --out robot-078\.enroll\.json$/,
          );
          assert.equal(
            lines[1],
            "hint: then, on this robot: k8s4r agent --enroll robot-078.enroll.json",
          );
          await Deno.writeTextFile(
            join(ch.dir, "bad.json"),
            '{"format": "k8s4r-enrollment", "version": 1}',
          );
          const b = startCli([
            "agent",
            "--enroll",
            join(ch.dir, "bad.json"),
            "--data-dir",
            join(ch.dir, "r78"),
          ]);
          pids.push(b.pid);
          assert.equal(await b.exited, 2);
          assert.match(
            b.stderr(),
            /bad\.json: robotId: expected a robot id like robot-007, got nothing; on the control host run: k8s4r robot add ROBOT_ID --out ROBOT_ID\.enroll\.json\n/,
          );
        },
      );
    } finally {
      await ch.stop();
      for (const pid of pids) {
        assert.equal(processStartTime(pid), undefined, `process ${pid} survived the test`);
      }
    }
  },
});
