import assert from "node:assert/strict";
import { renderAgentYaml } from "../../agent/enroll.ts";
import { type Enrollment, enrollmentRecord } from "../../fleet/enrollment.ts";
import { robotHostPaths } from "../../fleet/paths.ts";
import { testEnrollment } from "../../fleet/testing/enrollment.ts";
import { TestCa } from "../../spiffe/testing/test_ca.ts";
import type { AgentDataState } from "../../spire/agent_state.ts";
import type { CheckResult, FileInfo, TcpResult, TlsHandshakeResult } from "../check.ts";
import { runChecks } from "../runner.ts";
import { dirChain, fakeContext, type FakeOptions, NOW } from "../testing.ts";
import { detectHost } from "../command.ts";
import { formatSkew, robotChecks } from "./robot.ts";

const TD = "k8s4r.example.org";
const DIR = "/srv/robot";
const P = robotHostPaths(DIR);
const H = 3600_000;
const spire = TestCa.create({
  trustDomain: TD,
  notBefore: new Date(NOW - 24 * H),
  notAfter: new Date(NOW + 24 * H),
});
const byId = (id: string) => robotChecks.find((c) => c.id === id)!;

function enrollment(type: "join_token" | "x509pop" = "join_token"): Enrollment {
  return testEnrollment({
    trustDomain: TD,
    trustBundle: spire.rootPem,
    createdAt: new Date(NOW - 2 * H),
    attestation: type === "join_token"
      ? { type, token: "secret-token-value", expiresAt: new Date(NOW - 2 * H + 600_000) }
      : { type, certificate: "", expiresAt: new Date(NOW + 24 * H) },
  });
}

function agentData(
  o: Partial<AgentDataState> & { from?: number; to?: number } = {},
): AgentDataState {
  const { from = NOW - 10 * 60_000, to = NOW + 50 * 60_000, ...rest } = o;
  return {
    attested: true,
    spiffeId: `spiffe://${TD}/spire/agent/join_token/<redacted>`,
    attestor: "join_token",
    reattestable: false,
    svid: { notBefore: new Date(from), notAfter: new Date(to) },
    bundle: [],
    ...rest,
  };
}

function robot(o: FakeOptions & { e?: Enrollment; state?: AgentDataState } = {}) {
  const e = o.e ?? enrollment();
  const files: Record<string, string> = {
    [P.agentConfig]: renderAgentYaml(undefined, e, P),
    [P.enrollmentRecord]: JSON.stringify(enrollmentRecord(e, new Date(NOW - H)), null, 2),
    [P.trustBundle]: e.trustBundle,
    ...o.files,
  };
  const secret = (extra: Partial<FileInfo> = {}) => ({
    isFile: true,
    mode: 0o600,
    uid: 0,
    ...extra,
  });
  return fakeContext({
    ...o,
    files,
    stats: {
      ...dirChain(P.runtimeDir),
      [DIR]: { isDirectory: true, mode: 0o700, uid: 0 },
      [P.enrollmentRecord]: secret(),
      ...o.stats,
    },
    spire: { agentData: () => Promise.resolve(o.state), ...o.spire },
    robotHost: { paths: P, reason: `--data-dir ${DIR}` },
  });
}

const hintFor = (dir = DIR) =>
  `on the control host run: k8s4r robot add robot-007 --out robot-007.enroll.json; then on this robot: k8s4r agent --enroll robot-007.enroll.json --data-dir ${dir}`;

Deno.test("robot doctor: where it runs (--robot/--control-host, --data-dir, /etc/k8s4r)", async () => {
  const fs = (present: string[]) =>
    fakeContext({ stats: Object.fromEntries(present.map((p) => [p, { isFile: true }])) }).fs;
  assert.deepEqual(await detectHost(fs([]), { robot: false, controlHost: false }), {
    kind: "control-host",
    reason: "no /etc/k8s4r/agent.yaml or enrollment.json",
  });
  assert.deepEqual(
    await detectHost(fs(["/etc/k8s4r/enrollment.json"]), { robot: false, controlHost: false }),
    {
      kind: "robot",
      reason: "/etc/k8s4r/enrollment.json exists",
    },
  );
  assert.equal(
    (await detectHost(fs(["/etc/k8s4r/agent.yaml"]), { robot: false, controlHost: true })).kind,
    "control-host",
  );
  assert.deepEqual(await detectHost(fs([]), { robot: false, controlHost: false, dataDir: DIR }), {
    kind: "robot",
    reason: `--data-dir ${DIR}`,
  });
  assert.equal((await detectHost(fs([]), { robot: true, controlHost: false })).kind, "robot");
});

Deno.test("robot doctor: a healthy join-token robot is all green", async () => {
  const serverLeaf = spire.issue({
    spiffeId: `spiffe://${TD}/spire/server`,
    notBefore: new Date(NOW - H),
    notAfter: new Date(NOW + H),
  });
  const brokerLeaf = spire.issue({
    spiffeId: `spiffe://${TD}/mqtt-broker`,
    dnsNames: ["localhost"],
    notBefore: new Date(NOW - H),
    notAfter: new Date(NOW + H),
  });
  const ctx = robot({
    state: agentData(),
    stats: { [P.socketPath]: { isSocket: true } },
    net: {
      tcpConnect: () => Promise.resolve({ ok: true }),
      tlsHandshake: () =>
        Promise.resolve({
          handshake: true,
          authorized: true,
          peerChain: [new Uint8Array(serverLeaf.certificate.raw)],
        }),
      mqttProbe: () =>
        Promise.resolve({
          ok: false,
          outcome: "closed",
          detail: "closed",
          tls: {
            handshake: true,
            authorized: true,
            peerChain: [new Uint8Array(brokerLeaf.certificate.raw)],
          },
        }),
    },
    spire: {
      health: () => Promise.resolve({ status: "SERVING" }),
      fetchX509Svids: () => Promise.reject(new Error("no identity issued")),
    },
  });
  const report = await runChecks(robotChecks, ctx, { timeoutMs: 2000 });
  const bad = report.checks.filter((c) => c.status === "fail" || c.status === "crash");
  assert.deepEqual(bad.map((c) => `${c.id}: ${c.detail}`), []);
  const by = Object.fromEntries(report.checks.map((c) => [c.id, c]));
  assert.equal(
    by["enrollment.config"].detail,
    `robot-007: join_token, SPIRE 10.203.0.1:8081, broker mqtts://10.203.0.1:8883 (--data-dir ${DIR})`,
  );
  assert.equal(
    by["reachability.spire-server-tls"].detail,
    `10.203.0.1:8081: TLS verified, spiffe://${TD}/spire/server`,
  );
  assert.match(
    by["identity.agent-svid"].detail,
    /valid for 50m.*its used join token cannot bring it back: it must be enrolled again/,
  );
  assert.equal(
    by["enrollment.join-token"].detail,
    "used by the first attestation: a join token works once",
  );
  assert.equal(by["identity.x509pop"].status, "skip");
});

Deno.test("robot doctor: a clock 3 h behind, or in 1970: 'SVIDs are not yet valid: the clock is 3 h behind'", async () => {
  // The agent SVID was issued at NOW (SPIRE backdates 10 s); the board thinks it is 3 h earlier.
  const state = agentData({ from: NOW - 10_000, to: NOW + H });
  for (const [now, words] of [[NOW - 3 * H, "3 h"], [0, "59 years"]] as const) {
    const ctx = robot({ state, now });
    const c = await byId("identity.clock").run(ctx);
    assert.equal(c.status, "fail");
    assert.match(
      c.detail,
      new RegExp(
        `^SVIDs are not yet valid: the clock is ${words} behind \\(this host says ${
          new Date(now).toISOString()
        }, the agent SVID dates from `,
      ),
    );
    assert.match(c.hint!, /timedatectl set-ntp true/);
    const a = await byId("identity.agent-svid").run(ctx);
    assert.equal(a.status, "fail");
    assert.match(a.detail, new RegExp(`SVIDs are not yet valid: the clock is ${words} behind`));
  }
  // Positive control: the right time passes.
  assert.equal((await byId("identity.clock").run(robot({ state }))).status, "ok");
  assert.equal(formatSkew(3 * H - 10_000), "3 h");
  assert.equal(formatSkew(2 * H + 5 * 60_000), "2 h 5 min");
  assert.equal(formatSkew(12 * 60_000), "12 min");
});

Deno.test("robot doctor: an expired agent SVID: join token locked out (what to run), x509pop re-attests", async () => {
  const expired = agentData({ from: NOW - 5 * H, to: NOW - 4 * H });
  const r = await byId("identity.agent-svid").run(robot({ state: expired }));
  assert.equal(r.status, "fail");
  assert.equal(
    r.detail,
    "the agent SVID of robot-007 expired at 2029-12-31T20:00:00.000Z (4h ago): the robot was off longer than the SVID's lifetime, and a join-token robot cannot attest again with its used token",
  );
  assert.equal(r.hint, hintFor());

  const popState = agentData({
    from: NOW - 5 * H,
    to: NOW - 4 * H,
    attestor: "x509pop",
    reattestable: true,
  });
  const pop = await byId("identity.agent-svid").run(
    robot({ e: enrollmentX509pop(), state: popState, files: x509popFiles() }),
  );
  assert.equal(pop.status, "ok");
  assert.match(pop.detail, /x509pop re-attests on its own with the robot's key and certificate/);
});

const factory = TestCa.create({
  trustDomain: "factory.invalid",
  notBefore: new Date(NOW - 48 * H),
  notAfter: new Date(NOW + 48 * H),
});
const popCert = factory.issue({
  commonName: "robot-007",
  keyUsage: ["digitalSignature"],
  notBefore: new Date(NOW - H),
  notAfter: new Date(NOW + 24 * H),
});
function enrollmentX509pop(): Enrollment {
  const e = enrollment("x509pop");
  return {
    ...e,
    attestation: {
      type: "x509pop",
      certificate: popCert.chainPem,
      expiresAt: new Date(popCert.certificate.validTo),
    },
  };
}
function x509popFiles(key = popCert.keyPem): Record<string, string> {
  return { [P.x509popCert]: popCert.chainPem, [P.x509popKey]: key };
}

Deno.test("robot doctor: the x509pop certificate against its key, mode and expiry", async () => {
  const e = enrollmentX509pop();
  const stats = { [P.x509popKey]: { isFile: true, mode: 0o600, uid: 0 } };
  const good = await byId("identity.x509pop").run(robot({ e, files: x509popFiles(), stats }));
  assert.equal(good.status, "ok", good.detail);
  assert.match(good.detail, /^CN=robot-007, key 0600, valid for 24h/);
  const other = factory.issue({ commonName: "robot-007" }).keyPem;
  const wrong = await byId("identity.x509pop").run(robot({ e, files: x509popFiles(other), stats }));
  assert.match(wrong.detail, /is not for the key/);
  const open = await byId("identity.x509pop").run(
    robot({ e, files: x509popFiles(), stats: { [P.x509popKey]: { isFile: true, mode: 0o644 } } }),
  );
  assert.deepEqual([open.status, open.hint], ["fail", `chmod 600 ${P.x509popKey}`]);
  const late = await byId("identity.x509pop").run(
    robot({ e, files: x509popFiles(), stats, now: NOW + 48 * H }),
  );
  assert.match(late.detail, /the x509pop certificate expired at .*: SPIRE refuses it/);
  assert.match(late.hint!, /k8s4r robot add robot-007 --attestation x509pop --csr robot-007\.csr/);
});

Deno.test("robot doctor: join token unused, expired before use, missing; data dir modes", async () => {
  const tok = { [P.joinTokenFile]: { isFile: true, mode: 0o600, uid: 0 } };
  const e = enrollment();
  const fresh = {
    ...e,
    attestation: { ...e.attestation, expiresAt: new Date(NOW + 300_000) },
  } as Enrollment;
  const unused = await byId("enrollment.join-token").run(robot({ e: fresh, stats: tok }));
  assert.equal(unused.detail, `unused, expires in 5m (${P.joinTokenFile}, 0600)`);
  const late = await byId("enrollment.join-token").run(robot({ stats: tok }));
  assert.equal(late.status, "fail");
  assert.match(
    late.detail,
    /^the join token expired at 2029-12-31T22:10:00\.000Z \(1h 50m ago\) before the agent attested$/,
  );
  assert.equal(late.hint, hintFor());
  const none = await byId("enrollment.join-token").run(robot({}));
  assert.match(none.detail, /never attested and has no join token/);

  const modes = await byId("enrollment.data-dir").run(
    robot({
      stats: {
        [DIR]: { isDirectory: true, mode: 0o755, uid: 0 },
        [P.joinTokenFile]: { isFile: true, mode: 0o644, uid: 1000 },
      },
    }),
  );
  assert.equal(modes.status, "fail");
  assert.equal(
    modes.detail,
    `${DIR} is mode 755, expected 0700; ${P.joinTokenFile} is mode 644, expected 0600; ${P.joinTokenFile} belongs to uid 1000`,
  );
  assert.equal(
    modes.hint,
    `chmod 700 ${DIR}; chmod 600 ${P.joinTokenFile}; chown 0 ${P.joinTokenFile}`,
  );
  assert.equal((await byId("enrollment.data-dir").run(robot({}))).status, "ok");
  // The socket directory by the agent's own rule: another user's (squatted) or group-writable.
  const squat = await byId("enrollment.data-dir").run(
    robot({ stats: { [P.runtimeDir]: { isDirectory: true, mode: 0o755, uid: 1000 } } }),
  );
  assert.equal(squat.status, "fail");
  assert.match(squat.detail, /directory \/srv\/robot\/run belongs to uid 1000, not to this user/);
  const gw = await byId("enrollment.data-dir").run(
    robot({ stats: { [P.runtimeDir]: { isDirectory: true, mode: 0o775, uid: 0 } } }),
  );
  assert.match(gw.detail, /\/srv\/robot\/run is writable by its group \(mode 0775\)/);
  assert.equal(gw.hint, "chmod go-w /srv/robot/run");
});

Deno.test("robot doctor: the control host unreachable, refused, or not who it says", async () => {
  const tcp = (r: TcpResult) => ({ tcpConnect: () => Promise.resolve(r) });
  const refused = await byId("reachability.spire-server-tcp").run(
    robot({ net: tcp({ ok: false, code: "ECONNREFUSED" }) }),
  );
  assert.equal(
    refused.detail,
    "the SPIRE server at 10.203.0.1:8081: connection refused (the host answers, nothing listens on port 8081)",
  );
  assert.match(refused.hint!, /must listen on 10\.203\.0\.1, not only 127\.0\.0\.1/);
  const dropped = await byId("reachability.broker-tcp").run(
    robot({ net: tcp({ ok: false, code: "ETIMEDOUT", error: "no answer in 2000 ms" }) }),
  );
  assert.equal(dropped.detail, "the broker at 10.203.0.1:8883: no answer in 2000 ms");
  assert.match(dropped.hint!, /packets are dropped .*ip route get 10\.203\.0\.1/);

  const tls = (r: Partial<TlsHandshakeResult>) => ({
    tlsHandshake: () =>
      Promise.resolve({ handshake: true, authorized: false, peerChain: [], ...r }),
  });
  const early = await byId("reachability.spire-server-tls").run(
    robot({ net: tls({ authorizationError: "CERT_NOT_YET_VALID" }) }),
  );
  assert.match(early.detail, /does not verify .*: not yet valid: this host's clock is behind/);
  assert.match(early.hint!, /timedatectl set-ntp true/);
  const other = spire.issue({ spiffeId: `spiffe://${TD}/something-else` });
  const wrong = await byId("reachability.spire-server-tls").run(
    robot({ net: tls({ authorized: true, peerChain: [new Uint8Array(other.certificate.raw)] }) }),
  );
  assert.match(
    wrong.detail,
    /presented spiffe:\/\/k8s4r\.example\.org\/something-else, expected spiffe:\/\/k8s4r\.example\.org\/spire\/server/,
  );
});

Deno.test("robot doctor: not enrolled says what to run on both hosts", async () => {
  const ctx = fakeContext({ robotHost: { paths: P, reason: "--robot" } });
  const r: CheckResult = await byId("enrollment.config").run(ctx);
  assert.equal(r.status, "fail");
  assert.equal(r.detail, `not enrolled: ${P.agentConfig} does not exist`);
  assert.equal(
    r.hint,
    `on the control host run: k8s4r robot add ROBOT_ID --out ROBOT_ID.enroll.json; then on this robot: k8s4r agent --enroll ROBOT_ID.enroll.json --data-dir ${DIR}`,
  );
  // Everything else depends on it: skipped, not failed twice.
  const report = await runChecks(robotChecks, ctx, { timeoutMs: 1000 });
  assert.deepEqual(
    [...new Set(report.checks.filter((c) => c.id !== "enrollment.config").map((c) => c.status))],
    ["skip"],
  );
});

Deno.test("robot doctor: tasks allowed without tasks.user as root fail (the agent refuses to start)", async () => {
  const yaml = renderAgentYaml(undefined, enrollment(), P);
  const run = (text: string, uid = 0) =>
    byId("enrollment.task-user").run({ ...robot({ files: { [P.agentConfig]: text } }), uid });
  const none = await run(yaml);
  assert.equal(none.status, "ok");
  assert.equal(none.detail, "tasks.allow is empty: no task runs");
  const allowed = yaml.replace("allow: []", 'allow: ["echo"]');
  const bad = await run(allowed);
  assert.equal(bad.status, "fail");
  assert.equal(
    bad.detail,
    `${P.agentConfig}: tasks.allow is set and tasks.user is not: the agent (root) refuses to start`,
  );
  assert.match(bad.hint!, /user: k8s4r-task/);
  // Positive control: with the user enroll writes as root.
  const good = await run(
    renderAgentYaml(undefined, enrollment(), P, P.agentConfig, "k8s4r-task")
      .replace("allow: []", 'allow: ["echo"]'),
  );
  assert.equal(good.status, "ok", good.detail);
  assert.equal(good.detail, "tasks run as k8s4r-task, with no capability (tasks.allow: echo)");
  // Not root and no unit: tasks run as the agent's own uid, said as a warning.
  const user = await run(allowed, 1000);
  assert.equal(user.status, "warn");
  assert.match(user.detail, /tasks run as the agent's own uid 1000/);
});
