/**
 * End to end across hosts: a control host (`devenv start --advertise ADDR --attestation x509pop
 * --robots 0` in a temp project) and two robot hosts, each a network namespace that reaches the
 * control host only over its own veth link (tests/helpers/netns.ts; ADDR is a test-range address
 * on a dummy interface of the control host, so one robot's cable cuts that robot only).
 *
 * The commands are the README's "Run a robot on another machine" block, read from README.md and
 * run in order (readme_commands.ts), with the test network's address for 10.0.0.1 and each robot
 * host's files under its own temp dir (env K8S4R_DATA_DIR, the stand-in for --data-dir). Before
 * enrolling, each robot's agent.yaml allows the test's task executables and sets 2 s heartbeats
 * (enrolling keeps those keys, as the README says).
 *
 * Cases, in order: (1) enroll robot-007 by join token and robot-008 by x509pop, both online, both
 * run a task; (5) the doctor inside a robot host, green, then a precise failure with its cable
 * pulled; (3) a robot whose clock is 3 h behind (faketime): the doctor names the cause; (2) both
 * cables pulled for 40 s while a task runs on each: both back, no heartbeat and no result lost;
 * (4) robot remove: disconnected within 5 s; its reconnects are accepted at CONNECT and refused
 * everything else, with its still-valid SVID, while robot-008 carries on. Measured: robot add to
 * online, robot remove to disconnected.
 */
import assert from "node:assert/strict";
import { X509Certificate } from "node:crypto";
import { join } from "node:path";
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { decodeAddress } from "../../src/doctor/proc_net.ts";
import { downTopic, upTopic } from "../../src/fleet/topics.ts";
import { parseEnrollment } from "../../src/fleet/enrollment.ts";
import { delay, waitFor } from "../../src/process/mod.ts";
import { parseCertDer } from "../../src/spiffe/x509.ts";
import { cliEnv, type CliProcess, startCli } from "../helpers/cli.ts";
import {
  type RemoteRobot,
  removeHomesOnUnload,
  teardownRemoteRobots,
} from "../helpers/remote_robot.ts";
import { TEST_RANGE, TestNetwork } from "../helpers/netns.ts";
import { type ReadmeStep, readmeSteps } from "../helpers/readme_commands.ts";
import {
  type CmdResult,
  type DoctorReport,
  E2eStack,
  isLoopbackAddress,
  listeningSockets,
  metric,
  SPARE_ROBOT,
  type Svid,
  timeUntil,
  TRUST_DOMAIN,
} from "./stack.ts";

const README_ADDR = "10.0.0.1";
const ROBOTS = ["robot-007", "robot-008"] as const;
type RobotId = typeof ROBOTS[number];

const stack = await E2eStack.create({ robots: 0 });
const e2e = stack.caseRegistrar("e2e remote: ");
stack.env.K8S4R_SERVER_URL = stack.api; // `k8s4r task run` talks to this stack's server

type Robot = RemoteRobot & { id: RobotId };

let net: TestNetwork | undefined;
let addr = "";
const robots = new Map<RobotId, Robot>();
const steps = readmeSteps("remote-robots");
let next = 0;
const addedAt = new Map<RobotId, number>();

function robot(id: RobotId): Robot {
  const r = robots.get(id);
  assert.ok(r, `${id} has no host`);
  return r;
}

function robotEnv(r: Robot, extra: Record<string, string> = {}): Record<string, string> {
  return cliEnv({ K8S4R_DATA_DIR: r.data, ...extra });
}

/** The README's argv with the test network's address. */
function argvOf(s: ReadmeStep): string[] {
  return s.argv.slice(1).map((a) => a.replaceAll(README_ADDR, addr));
}

async function copyHere(s: ReadmeStep): Promise<void> {
  const dest = s.host === "control host" ? stack.dir : robot(s.host as RobotId).home;
  for (const f of s.copy) {
    const from = [stack.dir, ...[...robots.values()].map((r) => r.home)]
      .find((d) => d !== dest && exists(join(d, f)));
    assert.ok(from, `README.md:${s.line}: nobody has ${f} to copy to ${s.host}`);
    await Deno.copyFile(join(from, f), join(dest, f));
    await Deno.chmod(join(dest, f), 0o600);
  }
}

function exists(p: string): boolean {
  try {
    Deno.statSync(p);
    return true;
  } catch {
    return false;
  }
}

/**
 * Runs the next README step, which must be on `host` and start with `prefix`. A robot's
 * `agent --enroll` keeps running: it is returned as a process.
 */
async function step(host: string, prefix: string): Promise<CmdResult | CliProcess> {
  const s = steps[next];
  assert.ok(s, `the README block ended; expected '${prefix}' on ${host}`);
  assert.equal(s.host, host, `README.md:${s.line}: expected a step on ${host}, got ${s.host}`);
  assert.ok(
    s.text.startsWith(`k8s4r ${prefix}`),
    `README.md:${s.line}: expected 'k8s4r ${prefix}...', got '${s.text}'`,
  );
  next++;
  await copyHere(s);
  const argv = argvOf(s);
  if (host === "control host") return await stack.k8s4r(argv);
  const r = robot(host as RobotId);
  const p = startCli(argv, { prefix: r.host.exec, env: robotEnv(r), cwd: r.home });
  r.pids.push(p.pid);
  if (argv[0] === "agent" && argv.includes("--enroll")) return p;
  const code = await p.exited;
  return { code, stdout: p.stdout(), stderr: p.stderr() };
}

async function mustStep(host: string, prefix: string): Promise<CmdResult> {
  const r = await step(host, prefix) as CmdResult;
  assert.equal(r.code, 0, `${host}: k8s4r ${prefix}: exit ${r.code}\n${r.stdout}\n${r.stderr}`);
  return r;
}

async function doctorIn(r: Robot, prefix: string[] = []): Promise<DoctorReport & { code: number }> {
  const p = startCli(["doctor", "--json"], {
    prefix: [...r.host.exec, ...prefix],
    env: robotEnv(r),
    cwd: r.home,
  });
  r.pids.push(p.pid);
  const code = await p.exited;
  try {
    return { code, ...JSON.parse(p.stdout()) };
  } catch {
    throw new Error(`doctor printed no JSON (exit ${code}):\n${p.stdout()}\n${p.stderr()}`);
  }
}

function notGreen(rep: DoctorReport): string[] {
  return rep.checks.filter((c) => !["ok", "skip"].includes(c.status))
    .map((c) => `${c.id}: ${c.status}: ${c.detail}`);
}

/** The robot's X.509 SVID from its own Workload API socket. */
async function svidOf(r: Robot): Promise<Svid & { notAfter: string }> {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-e2e-svid-" });
  try {
    const out = await stack.k8s4r([
      "identity",
      "fetch",
      "--socket",
      join(r.data, "run", "agent.sock"),
      "--spiffe-id",
      `spiffe://${TRUST_DOMAIN}/robot/${r.id}`,
      "--write",
      dir,
      "--json",
    ]);
    assert.equal(out.code, 0, `identity fetch ${r.id}: ${out.stdout}\n${out.stderr}`);
    return {
      cert: await Deno.readTextFile(`${dir}/svid.pem`),
      key: await Deno.readTextFile(`${dir}/svid.key`),
      ca: await Deno.readTextFile(`${dir}/bundle.pem`),
      notAfter: JSON.parse(out.stdout).svids[0].notAfter,
    };
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** Established TCP connections to the broker's advertised listener, by the robot's address. */
function brokerConnections(robotAddress: string): string[] {
  const out: string[] = [];
  const text = Deno.readTextFileSync("/proc/net/tcp");
  for (const line of text.split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 4 || f[3] !== "01") continue; // ESTABLISHED
    const [la, lp] = f[1].split(":");
    const [ra, rp] = f[2].split(":");
    if (
      decodeAddress(la) === addr && parseInt(lp, 16) === stack.ports.tls &&
      decodeAddress(ra) === robotAddress
    ) out.push(`${decodeAddress(ra)}:${parseInt(rp, 16)}`);
  }
  return out;
}

function tlsClient(svid: Svid, id: string): Promise<MqttClient> {
  return mqtt.connectAsync(`mqtts://${addr}:${stack.ports.tls}`, {
    ca: svid.ca,
    cert: svid.cert,
    key: svid.key,
    // The agent checks the broker by its SPIFFE ID; this probe by the SVID's DNS name.
    servername: "localhost",
    clientId: `e2e-probe-${id}-${crypto.randomUUID().slice(0, 6)}`,
    protocolVersion: 5,
    reconnectPeriod: 0,
    connectTimeout: 5000,
  });
}

async function subackCode(c: MqttClient, topic: string): Promise<number> {
  try {
    return Number((await c.subscribeAsync(topic, { qos: 1 }))[0].qos);
  } catch (err) {
    const g = (err as { packet?: { granted?: number[] } }).packet?.granted;
    if (g?.length) return g[0];
    throw err;
  }
}

async function pubackCode(c: MqttClient, topic: string): Promise<number> {
  try {
    const p = await c.publishAsync(topic, "{}", { qos: 1 });
    return (p as { reasonCode?: number } | undefined)?.reasonCode ?? 0;
  } catch (err) {
    const code = (err as { code?: number }).code;
    if (typeof code === "number") return code;
    throw err;
  }
}

// ---------------------------------------------------------------------------------------------

e2e(
  "(1) two robots on two hosts, join token and x509pop: online, a task round trip each",
  async () => {
    net = await TestNetwork.create();
    addr = await net.addControlAddress();
    for (const id of ROBOTS) {
      const host = await net.addHost();
      const root = await Deno.makeTempDir({ dir: "/tmp", prefix: `k8s4r-${id.slice(-3)}-` });
      const r: Robot = { id, host, home: join(root, "home"), data: join(root, "data"), pids: [] };
      await Deno.mkdir(r.home, { recursive: true });
      await Deno.mkdir(r.data, { recursive: true, mode: 0o700 });
      // The operator's keys, kept by --enroll: tasks this test runs, 2 s heartbeats.
      await Deno.writeTextFile(
        join(r.data, "agent.yaml"),
        'mqtt:\n  heartbeatSeconds: 2\ntasks:\n  allow: ["/bin/echo", "/bin/sh"]\n',
      );
      robots.set(id, r);
    }

    // control host
    const t0 = Date.now();
    const start = await mustStep("control host", "devenv start");
    metric("remote.devenv_start_ms", Date.now() - t0);
    stack.remember();
    stack.started = true;
    assert.match(start.stdout, new RegExp(`serving robots on other hosts at ${addr}`));
    // Nothing listens outside loopback and the test range; the plain listener and the HTTP API
    // only on loopback; the SPIRE agent port and one mTLS listener on the advertised address.
    const socks = listeningSockets();
    const range = new RegExp(`^${TEST_RANGE.split(".").slice(0, 2).join("\\.")}\\.`);
    for (const p of Object.values(stack.ports)) {
      for (const s of socks.filter((x) => x.port === p)) {
        assert.ok(isLoopbackAddress(s.address) || range.test(s.address), `${p} on ${s.address}`);
      }
    }
    const on = (p: number) => socks.filter((x) => x.port === p).map((x) => x.address).sort();
    assert.deepEqual(on(stack.ports.spire), [addr]);
    assert.deepEqual(on(stack.ports.tls), [addr, "127.0.0.1"].sort());
    assert.deepEqual(on(stack.ports.plain), ["127.0.0.1"]);
    assert.deepEqual(on(stack.ports.http), ["127.0.0.1"]);
    // The broker's SVID names the advertised address (SPIRE writes it as a DNS SAN).
    const brokerCert = new X509Certificate(await Deno.readTextFile(stack.files.brokerCertFile));
    assert.deepEqual(
      parseCertDer(new Uint8Array(brokerCert.raw)).dnsNames.includes(addr),
      true,
      `broker SANs: ${brokerCert.subjectAltName}`,
    );
    assert.match(brokerCert.subjectAltName ?? "", new RegExp(`DNS:${addr.replaceAll(".", "\\.")}`));

    // robot-007: a join token
    addedAt.set("robot-007", Date.now());
    const add7 = await mustStep("control host", "robot add robot-007");
    assert.match(add7.stdout, /k8s4r agent --enroll robot-007\.enroll\.json/);
    const file7 = join(stack.dir, "robot-007.enroll.json");
    assert.equal((await Deno.stat(file7)).mode! & 0o777, 0o600);
    const e7 = parseEnrollment(await Deno.readTextFile(file7), file7);
    assert.equal(e7.spireServerAddress, `${addr}:${stack.ports.spire}`);
    assert.equal(e7.brokerUrl, `ssl://${addr}:${stack.ports.tls}`);
    assert.equal(e7.attestation.type, "join_token");
    const r7 = robot("robot-007");
    r7.agent = await step("robot-007", "agent --enroll") as CliProcess;
    await stack.waitOnline(["robot-007"], 90_000).catch((err) => {
      throw new Error(`${err.message}\nagent:\n${r7.agent!.stderr().slice(-3000)}`);
    });
    metric("remote.robot_add_to_online_ms.join_token", Date.now() - addedAt.get("robot-007")!);
    r7.pids.push(...r7.agent.children());

    // robot-008: x509pop, the key made on the robot
    const r8 = robot("robot-008");
    const csr = await mustStep("robot-008", "agent csr");
    assert.match(csr.stdout, /BEGIN CERTIFICATE REQUEST/);
    assert.equal((await Deno.stat(join(r8.data, "x509pop", "agent.key"))).mode! & 0o777, 0o600);
    addedAt.set("robot-008", Date.now());
    const add8 = await mustStep("control host", "robot add robot-008");
    assert.match(add8.stdout, /x509pop certificate valid until/);
    const text8 = await Deno.readTextFile(join(stack.dir, "robot-008.enroll.json"));
    assert.doesNotMatch(text8, /PRIVATE KEY/);
    r8.agent = await step("robot-008", "agent --enroll") as CliProcess;
    await stack.waitOnline(["robot-008"], 90_000).catch((err) => {
      throw new Error(`${err.message}\nagent:\n${r8.agent!.stderr().slice(-3000)}`);
    });
    metric("remote.robot_add_to_online_ms.x509pop", Date.now() - addedAt.get("robot-008")!);
    console.log(
      `  robot-008 added at ${new Date(addedAt.get("robot-008")!).toISOString()}:\n${
        r8.agent.stderr().split("\n").filter((l) =>
          /spire_agent|svid\.ready|mqtt\.connected|enrolled/.test(l)
        )
          .join("\n")
      }`,
    );
    r8.pids.push(...r8.agent.children());

    const list = await mustStep("control host", "robot list");
    assert.match(list.stdout, /^robot-007\s+join-token\s+enrolled\s+used\s/m);
    assert.match(list.stdout, /^robot-008\s+x509pop\s+enrolled\s+20\d\d-/m);
    assert.match(list.stdout, /sources: SPIRE entries and agents/);
    assert.doesNotMatch(list.stdout, /join_token\/[0-9a-f-]{36}/, "a token in robot list");

    for (const id of ROBOTS) {
      const t = await mustStep("control host", `task run ${id}`);
      assert.equal(t.stdout, `hello from ${id}\n`);
    }
  },
);

e2e(
  "(5) doctor inside a robot host: green; the control host unreachable: a precise failure",
  async () => {
    const r8 = robot("robot-008");
    const s = steps[next];
    assert.equal(s?.text, "k8s4r doctor");
    const d = await step("robot-008", "doctor") as CmdResult;
    assert.equal(d.code, 0, d.stdout);
    assert.match(d.stdout, /\d+ ok, 0 warnings, 0 failed, \d+ skipped, 0 crashed/);
    assert.match(d.stdout, /^\[enrollment\]$/m, "the doctor knows it runs on a robot");
    assert.deepEqual(notGreen(await doctorIn(r8)), []);
    await net!.pullCable(r8.host);
    try {
      const bad = await doctorIn(r8);
      assert.equal(bad.code, 1);
      const by = Object.fromEntries(bad.checks.map((c) => [c.id, c]));
      const spire = by["reachability.spire-server-tcp"];
      console.log(`  cable pulled: ${spire.detail}\n    hint: ${spire.hint}`);
      assert.equal(spire.status, "fail");
      assert.match(
        spire.detail,
        new RegExp(`^the SPIRE server at ${addr.replaceAll(".", "\\.")}:${stack.ports.spire}: `),
      );
      assert.match(spire.hint ?? "", new RegExp(`ip route get ${addr.replaceAll(".", "\\.")}`));
      assert.equal(by["reachability.broker-tcp"].status, "fail");
      assert.equal(by["identity.clock"].status, "ok", "what does not need the network passes");
      // The other robot is not affected by this cable.
      await stack.waitHeartbeats("robot-007", 2);
    } finally {
      await net!.plugCable(r8.host);
    }
    // Back: its heartbeats flow again (the server may not even have marked it offline).
    await stack.waitHeartbeats("robot-008", 2, 60_000);
    assert.deepEqual(notGreen(await doctorIn(r8)), []);
  },
);

e2e("(3) a robot whose clock is 3 h behind: the doctor names the cause", async () => {
  const r7 = robot("robot-007");
  const skewed = await doctorIn(r7, ["faketime", "-f", "-3h"]);
  const clock = skewed.checks.find((c) => c.id === "identity.clock")!;
  console.log(`  faketime -3h: ${clock.status}: ${clock.detail}\n    hint: ${clock.hint}`);
  assert.equal(clock.status, "fail");
  assert.match(clock.detail, /SVIDs are not yet valid: the clock is 3 ?h behind/);
  assert.match(clock.hint ?? "", /timedatectl|chrony|ntp/i);
  // The same robot with its real clock: green (the skew is the cause, nothing else).
  const real = await doctorIn(r7);
  assert.equal(real.checks.find((c) => c.id === "identity.clock")!.status, "ok");
});

e2e(
  "(2) both cables pulled for 40 s: both come back, no heartbeat and no task result lost",
  async () => {
    const tasks = new Map<RobotId, string>();
    for (const id of ROBOTS) {
      tasks.set(id, await stack.createTask(id, ["/bin/sh", "-c", "sleep 4; echo after-the-cable"]));
    }
    for (const [id, t] of tasks) {
      await waitFor(async () => (await stack.task(t)).state === "running", {
        timeoutMs: 30_000,
        intervalMs: 100,
        what: `the task on ${id} running`,
      });
    }
    const before = new Map<RobotId, number>();
    for (const id of ROBOTS) before.set(id, (await stack.robot(id)).heartbeats.received);
    for (const id of ROBOTS) await net!.pullCable(robot(id).host);
    const pulledAt = Date.now();
    try {
      // The server notices (missed heartbeats) while the cables are out.
      await waitFor(async () => {
        for (const id of ROBOTS) if ((await stack.robot(id)).online) return false;
        return true;
      }, { timeoutMs: 35_000, intervalMs: 250, what: "both robots offline at the server" });
      // The fault lasts 40 s: a stimulus of fixed length, not a wait for a condition.
      await delay(Math.max(0, 40_000 - (Date.now() - pulledAt)));
    } finally {
      for (const id of ROBOTS) await net!.plugCable(robot(id).host);
    }
    const back = await timeUntil(
      async () => {
        for (const id of ROBOTS) if (!(await stack.robot(id)).online) return false;
        return true;
      },
      "both robots back online",
      90_000,
      200,
    );
    metric("remote.cable_40s.back_online_ms", back);
    for (const [id, t] of tasks) {
      const done = await stack.waitTask(t, 60_000);
      assert.equal(done.state, "done", `${id}: ${JSON.stringify(done)}`);
      assert.equal(done.stdout, "after-the-cable\n");
    }
    for (const id of ROBOTS) {
      const v = await stack.waitHeartbeats(id, 2);
      const during = v.heartbeats.received - before.get(id)!;
      metric(`remote.cable_40s.${id}.heartbeats_delivered`, during);
      metric(`remote.cable_40s.${id}.heartbeats_missing`, v.heartbeats.missing);
      // 2 s heartbeats: ~20 were queued on the robot during the 40 s and delivered afterwards.
      assert.ok(during >= 18, `${id}: only ${during} heartbeats arrived across the outage`);
      assert.equal(
        v.heartbeats.missing,
        0,
        `${id} lost heartbeats: ${JSON.stringify(v.heartbeats)}`,
      );
    }
  },
);

e2e(
  "(4) robot remove: disconnected within 5 s; reconnects refused (valid SVID); robot-008 unaffected",
  async () => {
    const r7 = robot("robot-007");
    const svid7 = await svidOf(r7);
    await waitFor(() => brokerConnections(r7.host.address).length === 1, {
      timeoutMs: 10_000,
      intervalMs: 50,
      what: "robot-007's one connection to the broker",
    });
    const [conn] = brokerConnections(r7.host.address);
    const t0 = Date.now();
    const rm = await mustStep("control host", "robot remove robot-007");
    assert.match(rm.stdout, /broker: robot-007 disconnected and denied every topic/);
    assert.match(rm.stdout, /SPIRE: evicted its agent/);
    // Disconnected: the connection it had is gone (it reconnects at once; that is a new one).
    const gone = await timeUntil(
      () => !brokerConnections(r7.host.address).includes(conn),
      "robot-007's connection closed by the broker",
      5000,
      10,
    );
    metric("remote.robot_remove_to_disconnected_ms", Date.now() - t0);
    metric("remote.robot_remove_disconnected_after_command_ms", gone);

    // Its SVID is still valid, and it still completes TLS and CONNECT: then every subscribe and
    // publish is refused.
    assert.ok(Date.parse(svid7.notAfter) > Date.now() + 60_000, `SVID ${svid7.notAfter}`);
    // (Its client id is its CN: this takes over the cut-off agent's session, which the agent
    // takes back on its next reconnect, a second or more later; the checks take a few ms.)
    const removed = await tlsClient(svid7, "robot-007");
    try {
      assert.equal(removed.connected, true, "CONNECT of a removed robot (CONNACK 0)");
      assert.equal(await subackCode(removed, downTopic("robot-007", "task")), 0x87);
      assert.equal(await pubackCode(removed, upTopic("robot-007", "heartbeat")), 0x87);
    } finally {
      removed.end(true);
    }
    // The control: an SVID of a robot that was not removed, on the same listener, is granted
    // (a spare id: robot-008's own SVID would take its running agent's session over, since the
    // broker makes a certificate's CN its client id).
    const control = await tlsClient(await stack.spareRobotSvid(), SPARE_ROBOT);
    try {
      assert.equal(await subackCode(control, `k8s4r/robots/${SPARE_ROBOT}/down/e2e-probe`), 1);
    } finally {
      control.end(true);
    }
    // The real agent of robot-007 reconnected and is refused everything.
    await waitFor(() => /mqtt\.publish_denied .*reasonCode=135/.test(r7.agent!.stderr()), {
      timeoutMs: 15_000,
      intervalMs: 100,
      what: "robot-007's agent refused on its reconnect",
    });
    // Nothing of robot-007 reaches the server any more; robot-008 keeps reporting.
    const hb7 = (await stack.robot("robot-007")).heartbeats.received;
    await stack.waitHeartbeats("robot-008", 3);
    assert.equal((await stack.robot("robot-007")).heartbeats.received, hb7);
    assert.equal((await stack.robot("robot-008")).online, true);
    // SPIRE and the records agree.
    const list = await stack.k8s4r(["robot", "list"]);
    assert.match(list.stdout, /^robot-007\s+join-token\s+removed\s.*cut off$/m);
    assert.match(list.stdout, /^robot-008\s+x509pop\s+enrolled\s.*allowed$/m);
    const entries = await stack.spireServer("entry", "show", "-output", "json");
    assert.doesNotMatch(entries.stdout, /robot-007/);
    assert.equal(next, steps.length, "every README step ran");
  },
);

e2e("teardown: robots, stack and test network gone", async () => {
  await teardownRemoteRobots(robots.values(), stack, net, "robot-007");
});

removeHomesOnUnload(robots);
