import assert from "node:assert/strict";
import { fakeContext } from "../testing.ts";
import { allChecks } from "./mod.ts";

/** Something the user can run: a k8s4r command or a shell tool. */
const COMMAND =
  /\b(k8s4r [a-z]|ps -o|kill -CONT|ls -l|cat |tail |ss -|systemctl|docker (info|ps|logs|restart)|openssl|spire-(server|agent) [a-z-]+|mosquitto -h|uptime)/;

Deno.test("every check declares a timeout hint: what the hang means and what to run", () => {
  const checks = [...allChecks("native"), ...allChecks("docker")];
  const ids = new Set(checks.map((c) => c.id));
  assert.ok(ids.size >= 24, `only ${ids.size} checks`);
  for (const broker of ["native", "docker"] as const) {
    const ctx = fakeContext({ options: { broker } });
    for (const c of allChecks(broker)) {
      assert.equal(typeof c.timeout?.hint, "function", `${c.id} declares no timeout hint`);
      const hint = c.timeout.hint(ctx);
      assert.ok(hint.length > 30, `${c.id}: timeout hint too short: ${hint}`);
      assert.match(hint, COMMAND, `${c.id}: timeout hint names no command: ${hint}`);
      assert.match(hint, /: /, `${c.id}: timeout hint does not say what the hang means: ${hint}`);
    }
  }
});

Deno.test("the checks that talk to a process name it as their timeout peer", () => {
  const ctx = fakeContext();
  const peers = Object.fromEntries(
    allChecks("native").filter((c) => c.timeout.peer).map((c) => [c.id, c.timeout.peer!(ctx)]),
  );
  assert.deepEqual(peers["spire-agent.health"], {
    name: "spire-agent",
    unixSocket: "/tmp/spire-agent/agent.sock",
  });
  assert.deepEqual(peers["spire-agent.svid"], peers["spire-agent.health"]);
  assert.deepEqual(peers["ca-bundle.current"], peers["spire-agent.health"]);
  assert.deepEqual(peers["spire-server.health"], {
    name: "spire-server",
    unixSocket: "/proj/.spire-data/server/api.sock",
  });
  assert.deepEqual(peers["broker.plain"], { name: "mosquitto", tcpPort: 1883 });
  assert.deepEqual(peers["broker.mtls-native"], { name: "mosquitto", tcpPort: 8883 });
  assert.deepEqual(peers["server.healthz"], { name: "k8s4r server", tcpPort: 8090 });
});
