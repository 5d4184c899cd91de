/**
 * End to end, part 1: the guide's `make test-spire-e2e` (every component up and healthy, SPIRE
 * attestation, CA bundle export, robots online over MQTT), a task round trip, `doctor`, and the
 * security matrix, against ONE real stack (`devenv start --robots 2 --broker native`) in a temp
 * project on free ports. Tests run in order: the first starts the stack, the last tears it down.
 *
 * Sanitizers are off for every case: the stack's processes outlive each case by design, mqtt.js
 * keeps timers past end(), and commands run under AbortSignal.timeout. The teardown case asserts
 * that no process of the stack and no port survives.
 */
import assert from "node:assert/strict";
import { X509Certificate } from "node:crypto";
import type mqtt from "mqtt";
import {
  encode,
  PROTOCOL_VERSION,
  type RegisterMessage,
  type TaskMessage,
} from "../../src/mqtt/messages.ts";
import { TestCa } from "../../src/spiffe/testing/test_ca.ts";
import { waitFor } from "../../src/process/mod.ts";
import {
  E2eStack,
  isLoopbackAddress,
  listeningSockets,
  metric,
  mqttConnect,
  refused,
  ROBOTS,
  SPARE_ROBOT,
  type Svid,
  TRUST_DOMAIN,
  walkFiles,
} from "./stack.ts";

const stack = await E2eStack.create({ heartbeatSeconds: 1 });
const e2e = stack.caseRegistrar("e2e: ");

const nonce = () => crypto.randomUUID().slice(0, 8);

/** robot-001's real SVID (from its Workload API socket), fetched once. */
let robot001: Svid | undefined;
async function robot1Svid(): Promise<Svid> {
  return robot001 ??= await stack.fetchSvid("robot-001");
}

/**
 * An SVID of the stack's SPIRE for SPARE_ROBOT, which no agent runs as: the broker makes a
 * certificate's CN the client id, so connecting with robot-001's own SVID would take its
 * running agent's session over.
 */
let spare: Svid | undefined;
async function spareSvid(): Promise<Svid> {
  return spare ??= await stack.spareRobotSvid();
}
const R = SPARE_ROBOT;

/** Collects (topic, payload) pairs a client receives. */
function collect(c: mqtt.MqttClient): { topic: string; payload: string }[] {
  const got: { topic: string; payload: string }[] = [];
  c.on("message", (topic, payload) => got.push({ topic, payload: payload.toString() }));
  return got;
}

// ---------------------------------------------------------------------------------------------
// Behaviour

e2e("devenv start --robots 2 brings the whole stack up", async () => {
  const t0 = Date.now();
  const r = await stack.start();
  metric("behaviour.start_ms", Date.now() - t0);
  assert.match(r.stdout, /Stack ready in/);
  stack.started = true;
});

e2e("status --json: every component running and healthy", async () => {
  const r = await stack.mustDevenv("status", "--json");
  const s = JSON.parse(r.stdout) as {
    components: { name: string; running: boolean; healthy: boolean; detail: string }[];
  };
  const names = s.components.map((c) => c.name);
  for (
    const n of [
      "spire-server",
      "ca-bundle",
      "broker-identity",
      "mosquitto",
      "server",
      "agent",
      "agent-robot-002",
    ]
  ) {
    assert.ok(names.includes(n), `status lists no ${n} (got ${names.join(", ")})`);
  }
  for (const c of s.components) {
    assert.equal(c.running, true, `${c.name} not running: ${c.detail}`);
    assert.equal(c.healthy, true, `${c.name} not healthy: ${c.detail}`);
  }
});

e2e("SPIRE attestation: each robot's Workload API hands out its own SPIFFE ID", async () => {
  for (const id of ROBOTS) {
    const r = await stack.k8s4r(["identity", "fetch", "--socket", stack.robotSocket(id), "--json"]);
    assert.equal(r.code, 0, `identity fetch for ${id}: ${r.stdout}\n${r.stderr}`);
    const j = JSON.parse(r.stdout) as {
      svids: { spiffeId: string; dnsNames: string[]; secondsLeft: number }[];
    };
    const ids = j.svids.map((s) => s.spiffeId);
    assert.deepEqual(ids, [`spiffe://${TRUST_DOMAIN}/robot/${id}`], `${id}'s socket gave ${ids}`);
    assert.equal(j.svids[0].dnsNames[0], id, "the first DNS name (the certificate CN) is the id");
    assert.ok(j.svids[0].secondsLeft > 60, "the SVID is valid");
  }
});

e2e("CA bundle export: the exported file equals `spire-server bundle show`", async () => {
  const r = await stack.spireServer("bundle", "show", "-format", "pem");
  assert.equal(r.code, 0, r.stderr);
  const file = await Deno.readTextFile(stack.layout.caBundleFile);
  const certs = (pem: string) =>
    [...pem.matchAll(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g)]
      .map((m) => new X509Certificate(m[0]).fingerprint256);
  assert.ok(certs(r.stdout).length >= 1, "spire-server printed no certificate");
  assert.deepEqual(certs(file), certs(r.stdout));
  assert.equal(file.trim(), r.stdout.trim());
});

e2e("MQTT: both robots are online at the server with their SPIFFE IDs", async () => {
  await stack.waitOnline();
  const robots = await stack.robots();
  assert.deepEqual(robots.map((r) => r.id).sort(), ROBOTS);
  for (const r of robots) {
    assert.equal(r.online, true);
    assert.equal(r.spiffeId, `spiffe://${TRUST_DOMAIN}/robot/${r.id}`);
    assert.equal(r.heartbeatIntervalSeconds, 1, "the test's heartbeatSeconds reached the agent");
  }
  const v = await stack.waitHeartbeats("robot-002", 2);
  assert.ok(v.heartbeats.received >= 2);
  await stack.assertNoLostHeartbeats("behaviour.online");
});

e2e("a task sent to robot-001 through the HTTP API comes back with its result", async () => {
  const t0 = Date.now();
  const id = await stack.createTask("robot-001", ["echo", "hi"]);
  const t = await stack.waitTask(id, 30_000);
  metric("behaviour.task_roundtrip_ms", Date.now() - t0);
  assert.equal(t.state, "done", JSON.stringify(t));
  assert.equal(t.exitCode, 0);
  assert.equal(t.stdout, "hi\n");
  assert.equal(t.robotId, "robot-001");
});

e2e("doctor --json: every check ok, exit 0", async () => {
  const d = await stack.doctor();
  const bad = d.report.checks.filter((c) => c.status !== "ok");
  assert.deepEqual(
    bad.map((c) => `${c.id}: ${c.status}: ${c.detail}`),
    [],
    "checks not ok",
  );
  assert.ok(d.report.checks.length >= 10, `only ${d.report.checks.length} checks ran`);
  assert.equal(d.code, 0, d.raw.stderr);
  metric("behaviour.doctor_checks_ok", d.report.summary.ok);
});

// ---------------------------------------------------------------------------------------------
// Security matrix

e2e("security: a client without a certificate is refused on the mTLS port", async () => {
  const svid = await robot1Svid();
  const url = `mqtts://127.0.0.1:${stack.ports.tls}`;
  const why = await refused(url, {
    ca: svid.ca,
    servername: "localhost",
    clientId: `e2e-${nonce()}`,
  });
  console.log(`refused: ${why}`);
  assert.ok(why, "a client without a certificate was accepted");
  // Control: the same client with a real SVID of the fleet's SPIRE gets in.
  const c = await stack.tlsClient(await spareSvid(), `e2e-ok-${nonce()}`);
  await c.endAsync(true);
});

e2e(
  "security: a certificate from another CA (CN and SPIFFE ID of robot-001) is refused",
  async () => {
    const svid = await robot1Svid();
    const foreign = TestCa.create({ trustDomain: TRUST_DOMAIN }).issue({
      spiffeId: `spiffe://${TRUST_DOMAIN}/robot/robot-001`,
      dnsNames: ["robot-001"],
    });
    assert.equal(foreign.certificate.subject, "CN=robot-001");
    // The client trusts the real broker (SPIRE's bundle), so a refusal can only be the broker's.
    const why = await refused(`mqtts://127.0.0.1:${stack.ports.tls}`, {
      ca: svid.ca,
      cert: foreign.chainPem,
      key: foreign.keyPem,
      servername: "localhost",
      clientId: `e2e-${nonce()}`,
    });
    console.log(`refused: ${why}`);
    assert.ok(why, "a certificate from a foreign CA was accepted");
  },
);

e2e("security: an expired certificate from the real SPIRE CA is refused", async () => {
  const svid = await robot1Svid();
  const minted = await stack.spireCli().mintX509({
    spiffeId: `spiffe://${TRUST_DOMAIN}/robot/robot-001`,
    dnsNames: ["robot-001"],
    // Not 1 s: SPIRE checks the new SVID after signing it, with notAfter cut to the second, so
    // under load a 1 s SVID can be "already expired" before the mint returns (seen in CI).
    ttlSeconds: 3,
  });
  const leaf = new X509Certificate(minted.certPem);
  const notAfter = Date.parse(leaf.validTo);
  assert.ok(
    leaf.checkIssued(new X509Certificate(svid.ca)) ||
      leaf.verify(new X509Certificate(svid.ca).publicKey),
    "the minted certificate is not from SPIRE's CA",
  );
  // SPIRE backdates notBefore only: wait on the clock until notAfter (second precision) is past.
  await waitFor(() => Date.now() > notAfter + 1000, {
    timeoutMs: 30_000,
    intervalMs: 100,
    what: "the minted certificate to expire",
  });
  const why = await refused(`mqtts://127.0.0.1:${stack.ports.tls}`, {
    ca: svid.ca,
    cert: minted.certPem,
    key: minted.keyPem,
    servername: "localhost",
    clientId: `e2e-${nonce()}`,
  });
  console.log(`refused: ${why}`);
  assert.ok(why, "an expired certificate was accepted");
});

e2e(`security: a robot (${R}) can neither write nor read robot-002's topics`, async () => {
  const svid = await spareSvid();
  const n = nonce();
  const server = await stack.serverClient(`e2e-srv-${n}`);
  const r1 = await stack.tlsClient(svid, `e2e-r1-${n}`);
  try {
    const serverGot = collect(server);
    const r1Got = collect(r1);
    await server.subscribeAsync("k8s4r/robots/#", { qos: 1 });
    // Each subscription may be refused (SUBACK 0x80) or granted; neither may deliver anything.
    for (
      const t of [
        "k8s4r/robots/robot-002/down/#",
        "k8s4r/robots/robot-002/up/#",
        "k8s4r/robots/#",
        "#",
      ]
    ) {
      await r1.subscribeAsync(t, { qos: 1 }).catch(() => {});
    }
    // Attacks: it writes robot-002's up and down topics, at QoS 0 and 1.
    for (const qos of [0, 1] as const) {
      for (const kind of ["up/heartbeat", "up/status", "up/task", "down/task"]) {
        await r1.publishAsync(`k8s4r/robots/robot-002/${kind}`, `attack-${n}`, { qos })
          .catch(() => {});
      }
    }
    // robot-002's own down messages (sent by the server) must not reach its client.
    await server.publishAsync("k8s4r/robots/robot-002/down/x-e2e", `for-002-${n}`, { qos: 1 });
    // Positive controls, sent last on the same connections: once they arrive, the denied
    // messages would have too.
    await r1.publishAsync(`k8s4r/robots/${R}/up/heartbeat`, `ctl-up-${n}`, { qos: 1 });
    await server.publishAsync(`k8s4r/robots/${R}/down/x-e2e`, `ctl-down-${n}`, { qos: 1 });
    await waitFor(
      () =>
        serverGot.some((m) => m.payload === `ctl-up-${n}`) &&
        r1Got.some((m) => m.payload === `ctl-down-${n}`) &&
        // robot-002's real heartbeats flow to the server meanwhile (and never to the client).
        serverGot.filter((m) => m.topic === "k8s4r/robots/robot-002/up/heartbeat").length >= 2,
      { timeoutMs: 15_000, intervalMs: 50, what: "the positive controls" },
    );
    const leakedUp = serverGot.filter((m) => m.payload === `attack-${n}`);
    assert.deepEqual(leakedUp, [], `${R} wrote robot-002's topics`);
    const r1Foreign = r1Got.filter((m) => !m.topic.startsWith(`k8s4r/robots/${R}/`));
    assert.deepEqual(r1Foreign, [], `${R} read another robot's messages`);
    assert.ok(!r1Got.some((m) => m.payload === `for-002-${n}`), `${R} read robot-002's down`);
    metric("security.cross_robot_leaks", leakedUp.length + r1Foreign.length);
  } finally {
    await r1.endAsync(true);
    await server.endAsync(true);
  }
});

e2e(
  "security: a robot publishing on a down topic (own or another's) delivers nothing",
  async () => {
    const svid = await spareSvid();
    const n = nonce();
    const markers = `${stack.dir}/markers-${n}`;
    await Deno.mkdir(markers);
    // The control tasks run as devenv's task user: it must be able to leave its marks.
    await Deno.chmod(markers, 0o777);
    const task = (robotId: string, file: string): Buffer =>
      Buffer.from(encode(
        {
          v: PROTOCOL_VERSION,
          type: "task",
          robotId,
          ts: new Date().toISOString(),
          id: `e2e-${file}-${n}`,
          command: ["touch", `${markers}/${file}`],
          env: {},
          timeoutSeconds: 10,
          createdAt: new Date().toISOString(),
        } satisfies TaskMessage,
      ));
    /** The message inside a signed payload (the server's), or the payload itself. */
    const inner = (payload: string): string => {
      try {
        const j = JSON.parse(payload);
        if (typeof j.payload === "string") {
          return atob(j.payload.replace(/-/g, "+").replace(/_/g, "/"));
        }
      } catch { /* not JSON */ }
      return payload;
    };
    const server = await stack.serverClient(`e2e-srv-${n}`);
    const r1 = await stack.tlsClient(svid, `e2e-r1-${n}`);
    try {
      const serverGot = collect(server);
      const r1Got = collect(r1);
      await server.subscribeAsync("k8s4r/robots/+/down/#", { qos: 1 });
      await r1.subscribeAsync(`k8s4r/robots/${R}/down/#`, { qos: 1 });
      // Attacks: valid task messages that, if delivered, the real agents would run (and its
      // own down topic, which its own subscription must not get back).
      for (const qos of [0, 1] as const) {
        await r1.publishAsync(`k8s4r/robots/${R}/down/task`, task(R, "pwned-own"), { qos })
          .catch(() => {});
        await r1.publishAsync("k8s4r/robots/robot-001/down/task", task("robot-001", "pwned-001"), {
          qos,
        }).catch(() => {});
        await r1.publishAsync("k8s4r/robots/robot-002/down/task", task("robot-002", "pwned-002"), {
          qos,
        }).catch(() => {});
      }
      // Controls: the same tasks from the server (signed by it: robots run nothing else) are
      // delivered and run on both robots.
      await stack.createTask("robot-001", ["touch", `${markers}/ok-001`], 10);
      await stack.createTask("robot-002", ["touch", `${markers}/ok-002`], 10);
      const exists = (f: string) => {
        try {
          Deno.statSync(`${markers}/${f}`);
          return true;
        } catch {
          return false;
        }
      };
      await waitFor(() => exists("ok-001") && exists("ok-002"), {
        timeoutMs: 15_000,
        intervalMs: 50,
        what: "the server's control tasks to run on both robots",
      });
      // Control: the server's own publications are what the subscribers see; nothing from r1.
      const fromRobot = serverGot.filter((m) => /pwned/.test(m.payload));
      assert.deepEqual(
        fromRobot.map((m) => m.topic),
        [],
        "a robot's down publication was delivered",
      );
      assert.ok(
        serverGot.some((m) => /ok-001/.test(inner(m.payload))),
        "control not seen by subscriber",
      );
      assert.ok(!r1Got.some((m) => /pwned/.test(m.payload)), `${R} got its own injected task`);
      assert.ok(!exists("pwned-001"), "robot-001 ran a task injected by a robot");
      assert.ok(!exists("pwned-002"), "robot-002 ran a task injected by a robot");
    } finally {
      await r1.endAsync(true);
      await server.endAsync(true);
    }
  },
);

e2e("security: 1883 refuses a missing or wrong password and listens on loopback only", async () => {
  const url = `mqtt://127.0.0.1:${stack.ports.plain}`;
  const creds = await stack.serverCreds();
  assert.ok(await refused(url, { clientId: `e2e-${nonce()}` }), "accepted without a password");
  assert.ok(
    await refused(url, { clientId: `e2e-${nonce()}`, username: creds.username, password: "wrong" }),
    "accepted a wrong password",
  );
  assert.ok(
    await refused(url, {
      clientId: `e2e-${nonce()}`,
      username: "robot-001",
      password: creds.password,
    }),
    "accepted the server's password for another user",
  );
  // Control: the right password gets in.
  const ok = await mqttConnect(url, { ...creds, clientId: `e2e-${nonce()}` });
  await ok.endAsync(true);
  const socks = listeningSockets().filter((s) => s.port === stack.ports.plain);
  assert.ok(socks.length >= 1, `nothing listens on ${stack.ports.plain}`);
  const exposed = socks.filter((s) => !isLoopbackAddress(s.address));
  assert.deepEqual(exposed, [], `port ${stack.ports.plain} listens beyond loopback`);
});

e2e(
  "security: a payload whose robotId differs from the topic's is dropped and counted",
  async () => {
    const svid = await spareSvid();
    const n = nonce();
    const stable = (r: Awaited<ReturnType<typeof stack.robot>>) => ({
      id: r.id,
      spiffeId: r.spiffeId,
      firstSeen: r.firstSeen,
      agentVersion: r.agentVersion,
      online: r.online,
      offlineReason: r.offlineReason,
      hostname: r.device?.hostname,
      heartbeatIntervalSeconds: r.heartbeatIntervalSeconds,
      missing: r.heartbeats.missing,
    });
    const before = await stack.stats();
    const rowsBefore = await Promise.all(ROBOTS.map(async (id) => stable(await stack.robot(id))));
    const r1 = await stack.tlsClient(svid, `e2e-r1-${n}`);
    try {
      const forged: RegisterMessage = {
        v: PROTOCOL_VERSION,
        type: "register",
        robotId: "robot-002",
        ts: new Date().toISOString(),
        spiffeId: `spiffe://${TRUST_DOMAIN}/robot/robot-002`,
        agentVersion: `forged-${n}`,
        heartbeatIntervalSeconds: 7,
        svidExpiresAt: new Date(Date.now() + 86_400_000).toISOString(),
        device: {
          hostname: `forged-${n}`,
          os: "x",
          arch: "x",
          cpus: 1,
          memoryBytes: 1,
          load: [0, 0, 0],
          uptimeSeconds: 1,
        },
      };
      await r1.publishAsync(`k8s4r/robots/${R}/up/register`, Buffer.from(encode(forged)), {
        qos: 1,
      });
      const key = "robot-id-mismatch";
      await waitFor(
        async () => (await stack.stats()).messages.dropped[key] > before.messages.dropped[key],
        {
          timeoutMs: 10_000,
          intervalMs: 100,
          what: `the server to count a ${key} drop`,
        },
      );
      // A later message on the same connection (not JSON) proves the first was fully handled.
      // (A made-up topic would not do: the broker's ACL refuses every up kind but the
      // protocol's, so the server would never see it.)
      await r1.publishAsync(`k8s4r/robots/${R}/up/heartbeat`, `sync-${n}`, { qos: 1 });
      await waitFor(
        async () =>
          ((await stack.stats()).messages.dropped["bad-json"] ?? 0) >
            (before.messages.dropped["bad-json"] ?? 0),
        { timeoutMs: 10_000, intervalMs: 100, what: "the sync message to be counted" },
      );
      const after = await stack.stats();
      assert.equal(after.messages.dropped[key], before.messages.dropped[key] + 1);
      assert.equal(after.messages.received.register, before.messages.received.register);
      const rowsAfter = await Promise.all(ROBOTS.map(async (id) => stable(await stack.robot(id))));
      assert.deepEqual(rowsAfter, rowsBefore, "a registry row changed");
      metric(
        "security.robot_id_mismatch_dropped",
        after.messages.dropped[key] - before.messages.dropped[key],
      );
    } finally {
      await r1.endAsync(true);
    }
  },
);

e2e("security: the join tokens appear in no ps output and no log file", async () => {
  const r = await stack.spireServer("agent", "list", "-output", "json");
  assert.equal(r.code, 0, `spire-server agent list failed: ${r.stderr}`);
  const agents = (JSON.parse(r.stdout).agents ?? []) as { id: { path: string } }[];
  const tokens = agents.map((a) => /^\/spire\/agent\/join_token\/(.+)$/.exec(a.id.path)?.[1])
    .filter((t): t is string => !!t && t.length >= 8);
  // Two robots and the broker's own agent.
  assert.ok(tokens.length >= 3, `expected >= 3 join-token agents, found ${tokens.length}`);
  for (const args of [["-eo", "args"], ["eww", "-eo", "args"]]) {
    const out = await new Deno.Command("ps", { args, stdout: "piped", stderr: "piped" }).output();
    assert.equal(out.code, 0);
    const text = new TextDecoder().decode(out.stdout);
    assert.ok(text.includes("spire-agent"), `ps ${args.join(" ")} shows no spire-agent`);
    tokens.forEach((t, i) => assert.ok(!text.includes(t), `token #${i} in ps ${args.join(" ")}`));
  }
  const logs = [
    ...walkFiles(stack.layout.devEnvDir, (n) => n.endsWith(".log")),
    ...walkFiles(stack.layout.spireDataDir, (n) => n.endsWith(".log")),
  ];
  for (const must of ["spire-server.log", "agent.log", "spire-agent.log", "mosquitto.log"]) {
    assert.ok(logs.some((l) => l.endsWith(`/${must}`)), `no ${must} was scanned`);
  }
  for (const log of logs) {
    const text = await Deno.readTextFile(log);
    tokens.forEach((t, i) => assert.ok(!text.includes(t), `token #${i} leaked into ${log}`));
  }
  metric("security.logs_scanned", logs.length);
});

e2e("security: key and token files are 0600, socket directories not world-writable", async () => {
  const secrets = new Set<string>([
    stack.files.brokerKeyFile,
    stack.layout.serverCredentialsFile,
    `${stack.layout.mosquittoDir}/passwd`,
    ...walkFiles(stack.files.tokensDir, () => true),
    ...walkFiles(stack.layout.spireDataDir, (n) => n === "keys.json" || n.endsWith(".key")),
    ...walkFiles(stack.layout.devEnvDir, (n) => n.endsWith(".key") || n.endsWith(".token")),
  ]);
  const keysJson = [...secrets].filter((p) => p.endsWith("/keys.json"));
  // The server, two robots' agents and the broker's agent each keep keys.json.
  assert.ok(keysJson.length >= 4, `expected >= 4 keys.json files, found ${keysJson.join(", ")}`);
  assert.ok([...secrets].some((p) => p.endsWith(".token")), "no token file found");
  for (const p of secrets) {
    const st = await Deno.stat(p);
    assert.equal(
      (st.mode! & 0o777).toString(8),
      "600",
      `${p} has mode ${(st.mode! & 0o777).toString(8)}`,
    );
  }
  const dirs = [
    stack.sockDir,
    ...ROBOTS.map((r) => `${stack.sockDir}/${r}`),
    `${stack.sockDir}/broker`,
    `${stack.layout.spireServerDataDir}`,
    stack.layout.devEnvDir,
    stack.files.tokensDir,
  ];
  for (const d of dirs) {
    const st = await Deno.stat(d);
    assert.ok(st.isDirectory, `${d} is not a directory`);
    assert.equal(st.mode! & 0o002, 0, `${d} is world-writable (${(st.mode! & 0o777).toString(8)})`);
  }
  metric("security.secret_files_checked", secrets.size);
});

// ---------------------------------------------------------------------------------------------

Deno.test({
  name: "e2e: teardown: stop and clean leave no process and no listening port",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await stack.teardown();
  },
});
