import assert from "node:assert/strict";
import type { Enrollment } from "../fleet/enrollment.ts";
import { robotHostPaths } from "../fleet/paths.ts";
import { testEnrollment } from "../fleet/testing/enrollment.ts";
import { TestCa } from "../spiffe/testing/test_ca.ts";
import { agentConfigFromText } from "./config.ts";
import { renderAgentYaml } from "./enroll.ts";

const TD = "k8s4r.example.org";
const P = robotHostPaths("/srv/robot");
const ca = TestCa.create({ trustDomain: TD });

function enrollment(type: "join_token" | "x509pop"): Enrollment {
  return testEnrollment({
    trustDomain: TD,
    trustBundle: ca.rootPem,
    createdAt: new Date(),
    attestation: type === "join_token"
      ? { type, token: "the-token-0001", expiresAt: new Date(Date.now() + 600_000) }
      : { type, certificate: "x", expiresAt: new Date(Date.now() + 600_000) },
  });
}

const load = (yaml: string) =>
  agentConfigFromText(yaml, {
    cwd: "/",
    env: {},
    flags: {},
    file: P.agentConfig,
    display: P.agentConfig,
  })
    .config;

Deno.test("renderAgentYaml: a new agent.yaml the agent reads back exactly; no token in it", () => {
  const yaml = renderAgentYaml(undefined, enrollment("join_token"), P);
  assert.ok(!yaml.includes("the-token-0001"));
  const c = load(yaml);
  assert.equal(c.robotId, "robot-007");
  assert.equal(c.spire.serverHost, "10.203.0.1");
  assert.equal(c.spire.serverPort, 8081);
  assert.equal(c.spire.socketPath, "/srv/robot/run/agent.sock");
  assert.equal(c.spire.dataDir, "/srv/robot");
  assert.equal(c.spire.trustBundlePath, "/srv/robot/trust-bundle.pem");
  assert.equal(c.spire.joinTokenFile, "/srv/robot/join-token");
  assert.deepEqual(c.spire.nodeAttestor, { type: "join_token" });
  assert.equal(c.mqtt.brokerUrl, "mqtts://10.203.0.1:8883");
  assert.deepEqual(c.tasks.allow, []);
  assert.equal(c.tasks.signerSpiffeId, `spiffe://${TD}/fleet-server`, "the enrollment's signer");
  assert.match(yaml, /# Executables the fleet server may run here/);
});

Deno.test("renderAgentYaml: enrolling again keeps the operator's keys and comments, switches attestation", () => {
  const first = renderAgentYaml(undefined, enrollment("join_token"), P);
  const edited = first.replace("allow: []", 'allow: ["echo", "/usr/bin/uptime"]') +
    "rotation:\n  marginSeconds: 120 # mine\n";
  const again = renderAgentYaml(edited, enrollment("x509pop"), P);
  assert.match(again, /# mine/);
  const c = load(again);
  assert.deepEqual(c.tasks.allow, ["echo", "/usr/bin/uptime"]);
  assert.equal(c.rotation.marginSeconds, 120);
  assert.deepEqual(c.spire.nodeAttestor, {
    type: "x509pop",
    privateKeyPath: "/srv/robot/x509pop/agent.key",
    certificatePath: "/srv/robot/x509pop/agent.crt",
  });
  assert.equal(c.spire.joinTokenFile, undefined);
  // A literal token someone put in the file is removed.
  const withToken = again.replace("spire:\n", "spire:\n  joinToken: leaked\n");
  assert.ok(!renderAgentYaml(withToken, enrollment("join_token"), P).includes("leaked"));
  assert.throws(
    () => renderAgentYaml("- a list\n", enrollment("join_token"), P),
    /expected the agent's YAML config to update/,
  );
});

Deno.test("renderAgentYaml: enrolling as root names the task user; an operator's own is kept", () => {
  const yaml = renderAgentYaml(undefined, enrollment("join_token"), P, P.agentConfig, "k8s4r-task");
  assert.equal(load(yaml).tasks.user, "k8s4r-task");
  assert.match(yaml, /# Tasks run as this user/);
  assert.match(yaml, /An allowed program takes any argv/);
  const mine = yaml.replace("user: k8s4r-task", "user: robot-tasks");
  const again = renderAgentYaml(mine, enrollment("x509pop"), P, P.agentConfig, "k8s4r-task");
  assert.equal(load(again).tasks.user, "robot-tasks");
  // Not as root: no user written (a non-root agent cannot switch to one).
  assert.equal(load(renderAgentYaml(undefined, enrollment("join_token"), P)).tasks.user, undefined);
});
