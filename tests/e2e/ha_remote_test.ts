/**
 * The two control-host features together: the scale-out stack (`devenv start --ha`: PostgreSQL,
 * two SPIRE servers behind haproxy, under the root CA, three fleet servers with a shared
 * subscription) serving robots on other hosts (`--advertise ADDR --attestation x509pop --robots
 * 0`). Robot hosts are network namespaces (tests/helpers/netns.ts), as in remote_robots_test.ts.
 *
 * What must hold: haproxy's frontend (the SPIRE port every agent dials) is on ADDR and the two
 * SPIRE servers behind it only on loopback; the broker runs the global auth settings of
 * Mosquitto 2.0.21 (no per_listener_settings, the dynamic-security plugin) with an mTLS listener
 * on ADDR; a join-token robot and an x509pop robot enrolled by `robot add` come online through
 * haproxy and run a task; both SPIRE servers know the x509pop agent (one datastore) and run the
 * attestor; `devenv status` is green (it probes haproxy at ADDR); `robot remove` cuts the
 * join-token robot off while the x509pop robot (the control) keeps reporting.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { parseEnrollment } from "../../src/fleet/enrollment.ts";
import { brokerFiles } from "../../src/mqtt/broker_config.ts";
import { realRunner, waitFor } from "../../src/process/mod.ts";
import { SpireServerCli } from "../../src/spire/server.ts";
import { cliEnv, type CliProcess, startCli } from "../helpers/cli.ts";
import {
  type RemoteRobot,
  removeHomesOnUnload,
  teardownRemoteRobots,
} from "../helpers/remote_robot.ts";
import { TestNetwork } from "../helpers/netns.ts";
import { E2eStack, listeningSockets, metric, SPIRE_SERVER } from "./stack.ts";

const ROBOTS = ["robot-007", "robot-008"] as const;
type RobotId = typeof ROBOTS[number];

const stack = await E2eStack.create({ ha: true, robots: 0 });
const test = stack.caseRegistrar("ha remote: ");
stack.env.K8S4R_SERVER_URL = stack.api;

type Robot = RemoteRobot & { id: RobotId };

let net: TestNetwork | undefined;
let addr = "";
const robots = new Map<RobotId, Robot>();

function robot(id: RobotId): Robot {
  const r = robots.get(id);
  assert.ok(r, `${id} has no host`);
  return r;
}

async function control(args: string[]): Promise<string> {
  const r = await stack.k8s4r(args);
  stack.remember();
  assert.equal(r.code, 0, `k8s4r ${args.join(" ")}: exit ${r.code}\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

/** A command on a robot host; `agent --enroll` keeps running and is returned as a process. */
async function onRobot(r: Robot, args: string[]): Promise<CliProcess | string> {
  const p = startCli(args, {
    prefix: r.host.exec,
    env: cliEnv({ K8S4R_DATA_DIR: r.data }),
    cwd: r.home,
  });
  r.pids.push(p.pid);
  if (args.includes("--enroll")) return p;
  const code = await p.exited;
  assert.equal(code, 0, `${r.id}: k8s4r ${args.join(" ")}: exit ${code}\n${p.stderr()}`);
  return p.stdout();
}

async function enroll(r: Robot): Promise<void> {
  await Deno.copyFile(join(stack.dir, `${r.id}.enroll.json`), join(r.home, `${r.id}.enroll.json`));
  await Deno.chmod(join(r.home, `${r.id}.enroll.json`), 0o600);
  const t0 = Date.now();
  r.agent = await onRobot(r, ["agent", "--enroll", `${r.id}.enroll.json`]) as CliProcess;
  await stack.waitOnline([r.id], 90_000).catch((err) => {
    throw new Error(`${err.message}\nagent:\n${r.agent!.stderr().slice(-3000)}`);
  });
  metric(`ha_remote.robot_add_to_online_ms.${r.id}`, Date.now() - t0);
  r.pids.push(...r.agent.children());
}

test("--ha --advertise ADDR --attestation x509pop: haproxy on ADDR, SPIRE servers on loopback, global broker auth", async () => {
  net = await TestNetwork.create();
  addr = await net.addControlAddress();
  for (const id of ROBOTS) {
    const host = await net.addHost();
    const root = await Deno.makeTempDir({ dir: "/tmp", prefix: `k8s4r-h${id.slice(-3)}-` });
    const r: Robot = { id, host, home: join(root, "home"), data: join(root, "data"), pids: [] };
    await Deno.mkdir(r.home, { recursive: true });
    await Deno.mkdir(r.data, { recursive: true, mode: 0o700 });
    await Deno.writeTextFile(
      join(r.data, "agent.yaml"),
      'mqtt:\n  heartbeatSeconds: 2\ntasks:\n  allow: ["/bin/echo"]\n',
    );
    robots.set(id, r);
  }
  const t0 = Date.now();
  const out = await control([
    "devenv",
    "start",
    "--ha",
    "--advertise",
    addr,
    "--attestation",
    "x509pop",
    "--robots",
    "0",
    "--broker",
    "native",
  ]);
  metric("ha_remote.devenv_start_ms", Date.now() - t0);
  stack.started = true;
  assert.match(out, /HA: PostgreSQL, 2 SPIRE servers behind haproxy/);
  assert.match(out, new RegExp(`serving robots on other hosts at ${addr.replaceAll(".", "\\.")}`));
  assert.match(out, /x509pop attestation with a dev factory CA/);

  const socks = listeningSockets();
  const on = (p: number) => socks.filter((x) => x.port === p).map((x) => x.address).sort();
  assert.deepEqual(on(stack.ports.spire), [addr], "haproxy's frontend");
  assert.deepEqual(on(stack.ports.spire1!), ["127.0.0.1"], "SPIRE server 1");
  assert.deepEqual(on(stack.ports.spire2!), ["127.0.0.1"], "SPIRE server 2");
  assert.deepEqual(on(stack.ports.tls), [addr, "127.0.0.1"].sort());
  assert.deepEqual(on(stack.ports.plain), ["127.0.0.1"]);
  for (const p of [stack.ports.http, stack.ports.http2!, stack.ports.http3!]) {
    assert.deepEqual(on(p), ["127.0.0.1"], `fleet server API ${p}`);
  }
  // One auth config for both listeners (2.0.21), the deny-list plugin loaded.
  const conf = await Deno.readTextFile(brokerFiles(stack.layout.mosquittoDir).config);
  assert.doesNotMatch(conf, /^per_listener_settings/m);
  assert.match(conf, /^plugin .*mosquitto_dynamic_security\.so$/m);
  assert.match(
    conf,
    new RegExp(`^listener ${stack.ports.tls} ${addr.replaceAll(".", "\\.")}$`, "m"),
  );
  // Both SPIRE servers run the x509pop attestor with the factory CA.
  for (const dir of [stack.layout.spireServerDataDir, stack.layout.ha.spireServer2DataDir]) {
    const cfg = await Deno.readTextFile(join(dir, "server.generated.conf"));
    assert.match(cfg, /NodeAttestor "x509pop"/, dir);
    assert.match(cfg, /database_type = "postgres"/, dir);
  }
  // status probes haproxy where it listens: every component healthy.
  const st = await stack.devenv("status", "--json");
  assert.equal(st.code, 0, st.stdout + st.stderr);
  const rows = JSON.parse(st.stdout).components as { name: string; healthy: boolean }[];
  assert.deepEqual(rows.filter((c) => !c.healthy).map((c) => c.name), []);
  assert.ok(rows.some((c) => c.name === "haproxy"));
});

test("a join-token robot and an x509pop robot on other hosts: online through haproxy, a task each", async () => {
  const add7 = await control(["robot", "add", "robot-007", "--out", "robot-007.enroll.json"]);
  assert.match(add7, /k8s4r agent --enroll robot-007\.enroll\.json/);
  const f7 = join(stack.dir, "robot-007.enroll.json");
  const e7 = parseEnrollment(await Deno.readTextFile(f7), f7);
  assert.equal(e7.spireServerAddress, `${addr}:${stack.ports.spire}`);
  assert.equal(e7.brokerUrl, `ssl://${addr}:${stack.ports.tls}`);
  await enroll(robot("robot-007"));

  const r8 = robot("robot-008");
  await onRobot(r8, ["agent", "csr", "--robot-id", "robot-008", "--out", "robot-008.csr"]);
  await Deno.copyFile(join(r8.home, "robot-008.csr"), join(stack.dir, "robot-008.csr"));
  const add8 = await control([
    "robot",
    "add",
    "robot-008",
    "--attestation",
    "x509pop",
    "--csr",
    "robot-008.csr",
    "--out",
    "robot-008.enroll.json",
  ]);
  assert.match(add8, /x509pop certificate valid until/);
  await enroll(r8);

  // One datastore: both SPIRE servers know the x509pop agent, whichever it attested through.
  for (const socket of [stack.layout.spireServerSocket, stack.layout.ha.spireServer2Socket]) {
    const agents = await new SpireServerCli(realRunner, SPIRE_SERVER, socket).listAgents();
    assert.ok(
      agents.some((a) => a.attestationType === "x509pop" && !a.banned),
      `${socket}: ${agents.map((a) => `${a.id} ${a.attestationType}`).join(", ")}`,
    );
  }
  const list = await control(["robot", "list"]);
  assert.match(list, /^robot-007\s+join-token\s+enrolled\s/m);
  assert.match(list, /^robot-008\s+x509pop\s+enrolled\s/m);
  for (const id of ROBOTS) {
    const out = await control(["task", "run", id, "--", "/bin/echo", `hello from ${id}`]);
    assert.equal(out, `hello from ${id}\n`);
  }
});

test("robot remove on the HA stack: robot-007 cut off, robot-008 (the control) keeps reporting", async () => {
  const r7 = robot("robot-007");
  await control(["robot", "remove", "robot-007"]);
  await waitFor(() => /mqtt\.publish_denied .*reasonCode=135/.test(r7.agent!.stderr()), {
    timeoutMs: 15_000,
    intervalMs: 100,
    what: "robot-007's agent refused after robot remove",
  });
  const hb7 = (await stack.robot("robot-007")).heartbeats.received;
  await stack.waitHeartbeats("robot-008", 3);
  assert.equal((await stack.robot("robot-007")).heartbeats.received, hb7);
  assert.equal((await stack.robot("robot-008")).online, true);
  const list = await control(["robot", "list"]);
  assert.match(list, /^robot-007\s+join-token\s+removed\s.*cut off$/m);
  assert.match(list, /^robot-008\s+x509pop\s+enrolled\s.*allowed$/m);
});

test("teardown: robots, stack and test network gone", async () => {
  await teardownRemoteRobots(robots.values(), stack, net, "robot-007");
});

removeHomesOnUnload(robots);
