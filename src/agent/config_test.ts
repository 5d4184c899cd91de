import assert from "node:assert/strict";
import { join } from "node:path";
import { ConfigError, UsageError } from "../cli/errors.ts";
import { type AgentFlags, interpolate, loadAgentConfig, parseBrokerUrl } from "./config.ts";

async function withFile<T>(text: string, fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-agent-config-" });
  try {
    await Deno.writeTextFile(join(dir, "p.yaml"), text);
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function load(
  text: string,
  env: Record<string, string> = {},
  flags: AgentFlags = {},
) {
  return withFile(text, (dir) =>
    loadAgentConfig({
      cwd: dir,
      env: { ROBOT_ID: "robot-001", ...env },
      flags: { config: "p.yaml", ...flags },
    }));
}

Deno.test("the committed plugins.yaml gives the guide's defaults", async () => {
  const cwd = new URL("../../", import.meta.url).pathname;
  const c = await loadAgentConfig({ cwd, env: { ROBOT_ID: "robot-001" }, flags: {} });
  assert.equal(c.robotId, "robot-001");
  assert.equal(c.spiffeId, "spiffe://k8s4r.example.org/robot/robot-001");
  assert.equal(c.spire.socketPath, "/tmp/spire-agent/agent.sock");
  assert.equal(c.spire.serverHost, "localhost");
  assert.equal(c.spire.serverPort, 8081);
  assert.equal(c.spire.dataDir, join(cwd, ".spire-data/agent"));
  assert.equal(c.spire.trustBundlePath, join(cwd, "config/mosquitto/certs/spire-ca.crt"));
  assert.equal(c.spire.logLevel, "DEBUG");
  assert.equal(c.spire.manage, true);
  assert.equal(c.spire.joinToken, undefined);
  assert.equal(c.mqtt.brokerUrl, "mqtts://localhost:8883");
  assert.equal(c.mqtt.brokerSpiffeId, "spiffe://k8s4r.example.org/mqtt-broker");
  assert.equal(c.mqtt.heartbeatSeconds, 10);
  assert.deepEqual(c.tasks.allow, ["*"]);
});

Deno.test("task defaults: signatures required, the fleet server signs, the window, the limits", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const c = await loadAgentConfig({ cwd: dir, env: { ROBOT_ID: "robot-001" }, flags: {} });
    assert.equal(c.spire.socketPath, "/run/k8s4r/agent.sock");
    assert.deepEqual(c.tasks, {
      allow: [],
      allowEnv: ["LANG", "LANGUAGE", "LC_*", "TZ"],
      killGraceSeconds: 5,
      user: undefined,
      group: undefined,
      signerSpiffeId: "spiffe://k8s4r.example.org/fleet-server",
      clockSkewSeconds: 300,
      maxAgeSeconds: 7 * 24 * 3600,
      maxConcurrent: 4,
      cpuSeconds: 3600,
      memoryBytes: 1024 ** 3,
      openFiles: 1024,
      maxProcesses: 256,
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  const set = await load(
    "spire:\n  trustDomain: td.test\ntasks:\n  user: k8s4r-task\n  group: k8s4r-task\n" +
      "  maxConcurrent: 2\n  openFiles: 64\n",
  );
  assert.equal(set.tasks.user, "k8s4r-task");
  assert.equal(set.tasks.group, "k8s4r-task");
  assert.equal(set.tasks.signerSpiffeId, "spiffe://td.test/fleet-server");
  assert.equal(set.tasks.maxConcurrent, 2);
  assert.equal(set.tasks.openFiles, 64);
});

Deno.test("env overrides the file, flags override env", async () => {
  const yaml = 'spire:\n  joinToken: "${SPIRE_JOIN_TOKEN:-}"\nmqtt:\n  brokerUrl: ssl://file:1\n' +
    "  heartbeatSeconds: 7\n";
  const fromFile = await load(yaml);
  assert.equal(fromFile.mqtt.brokerUrl, "mqtts://file:1");
  assert.equal(fromFile.mqtt.heartbeatSeconds, 7);
  const fromEnv = await load(yaml, { MQTT_BROKER_URL: "tls://env:2", SPIRE_JOIN_TOKEN: "tok" });
  assert.equal(fromEnv.mqtt.brokerUrl, "mqtts://env:2");
  assert.equal(fromEnv.spire.joinToken, "tok");
  const fromFlags = await load(yaml, { MQTT_BROKER_URL: "tls://env:2", ROBOT_ID: "robot-009" }, {
    brokerUrl: "mqtts://flag:3",
    robotId: "robot-002",
    heartbeatSeconds: 3,
    socket: "/tmp/x.sock",
    dataDir: "data",
    joinTokenFile: "tok.txt",
    noManageSpire: true,
  });
  assert.equal(fromFlags.mqtt.brokerUrl, "mqtts://flag:3");
  assert.equal(fromFlags.robotId, "robot-002");
  assert.equal(fromFlags.mqtt.heartbeatSeconds, 3);
  assert.equal(fromFlags.spire.socketPath, "/tmp/x.sock");
  assert.ok(fromFlags.spire.dataDir.endsWith("/data"));
  assert.ok(fromFlags.spire.joinTokenFile!.endsWith("/tok.txt"));
  assert.equal(fromFlags.spire.manage, false);
  const viaEnvId = await load(yaml, { ROBOT_ID: "robot-009" });
  assert.equal(viaEnvId.robotId, "robot-009");
});

Deno.test("an absent default file is fine; an absent --config file is an error", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const c = await loadAgentConfig({ cwd: dir, env: { ROBOT_ID: "robot-001" }, flags: {} });
    assert.equal(c.file, undefined);
    assert.deepEqual(c.tasks.allow, []); // no allow-list: no task runs
    await assert.rejects(
      loadAgentConfig({ cwd: dir, env: { ROBOT_ID: "r1" }, flags: { config: "nope.yaml" } }),
      (e: Error) => e instanceof ConfigError && e.message === "nope.yaml: file not found",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

const BAD: [string, string][] = [
  [
    "spire:\n  sockPath: x\n",
    "p.yaml:2: spire.sockPath: unknown key; expected one of socketPath, trustDomain, serverAddr, joinToken, joinTokenFile, dataDir, logLevel, trustBundlePath, manage, nodeAttestor, x509popKeyPath, x509popCertPath",
  ],
  ["spire:\n  manage: yes\n", 'p.yaml:2: spire.manage: expected true or false, got "yes"'],
  ["spire:\n  manage: 1\n", "p.yaml:2: spire.manage: expected true or false, got 1"],
  [
    "mqtt:\n  heartbeatSeconds: 0\n",
    "p.yaml:2: mqtt.heartbeatSeconds: expected an integer in 1..3600, got 0",
  ],
  [
    "mqtt:\n  heartbeatSeconds: ten\n",
    'p.yaml:2: mqtt.heartbeatSeconds: expected an integer in 1..3600, got "ten"',
  ],
  [
    "spire:\n  logLevel: LOUD\n",
    'p.yaml:2: spire.logLevel: expected one of DEBUG, INFO, WARN, ERROR, got "LOUD"',
  ],
  [
    'spire:\n  joinToken: "${SPIRE_TOKEN}"\n',
    "p.yaml:2: spire.joinToken: environment variable SPIRE_TOKEN is not set (use ${SPIRE_TOKEN:-default} for a default)",
  ],
  [
    'spire:\n  joinToken: "${1BAD}"\n',
    "p.yaml:2: spire.joinToken: expected ${NAME} or ${NAME:-default} with NAME like SPIRE_JOIN_TOKEN, got ${1BAD}",
  ],
  ['spire:\n  joinToken: "${OPEN"\n', 'p.yaml:2: spire.joinToken: unterminated ${ in "${OPEN"'],
  ["tasks:\n  allow: echo\n", 'p.yaml:2: tasks.allow: expected a list of strings, got "echo"'],
  [
    "tasks:\n  allow:\n    - echo\n    - 3\n",
    "p.yaml:4: tasks.allow: expected a list of non-empty strings, got an item 3",
  ],
  [
    "foo: 1\n",
    "p.yaml:1: foo: unknown section; expected one of spire, mqtt, tasks, rotation, queue, robot, metrics",
  ],
  [
    "- a\n",
    "p.yaml:1: expected a mapping with sections spire, mqtt, tasks, rotation, queue, robot, metrics, got a list",
  ],
  [
    "queue:\n  maxMessages: 5\n",
    "p.yaml:2: queue.maxMessages: expected an integer in 10..1000000, got 5",
  ],
  [
    "queue:\n  maxBytes: 1000\n",
    "p.yaml:2: queue.maxBytes: expected an integer in 1048576..1073741824, got 1000",
  ],
  ["spire: [1]\n", "p.yaml:1: spire: expected a mapping, got a list"],
  ["spire:\n  socketPath: a\n  socketPath: b\n", "p.yaml:3: invalid YAML: Map keys must be unique"],
  [
    "mqtt:\n  brokerUrl: mqtt://localhost:1883\n",
    'p.yaml:2: mqtt.brokerUrl: mqtt:// is refused: robots reach the broker only over mTLS; use ssl://, mqtts:// or tls:// (got "mqtt://localhost:1883")',
  ],
  [
    "spire:\n  trustDomain: Bad_TD!\n",
    "p.yaml:2: spire.trustDomain: expected a trust domain of lowercase letters, digits, '.', '-', '_', got \"Bad_TD!\"",
  ],
  [
    "spire:\n  serverAddr: localhost\n",
    'p.yaml:2: spire.serverAddr: expected host:port like localhost:8081, got "localhost"',
  ],
  ['\n\nspire:\n  dataDir: ""\n', 'p.yaml:4: spire.dataDir: expected a non-empty string, got ""'],
  [
    "mqtt:\n  brokerSpiffeId: mqtt-broker\n",
    'p.yaml:2: mqtt.brokerSpiffeId: expected a SPIFFE ID like spiffe://k8s4r.example.org/mqtt-broker, got "mqtt-broker"',
  ],
  [
    "tasks:\n  allow: [./run.sh]\n",
    'p.yaml:2: tasks.allow: expected "*", program names or absolute paths, got "./run.sh"',
  ],
  [
    "tasks:\n  allowEnv: [LANG, LD_PRELOAD]\n",
    'p.yaml:2: tasks.allowEnv: "LD_PRELOAD" can never be allowed (LD_PRELOAD: LD_* variables are loader or shell hooks of the start chain)',
  ],
  [
    'tasks:\n  allowEnv: ["*"]\n',
    'p.yaml:2: tasks.allowEnv: "*" would allow PATH, which can never be allowed (PATH: the agent resolves the executable with its own PATH and gives tasks that one)',
  ],
  [
    "tasks:\n  allowEnv: [my-var]\n",
    'p.yaml:2: tasks.allowEnv: expected variable names or prefixes ending in * (LC_*), got "my-var"',
  ],
  [
    "tasks:\n  group: g\n",
    "p.yaml:2: tasks.group: expected tasks.user too (the group of the user tasks run as)",
  ],
  [
    "tasks:\n  signerSpiffeId: fleet-server\n",
    'p.yaml:2: tasks.signerSpiffeId: expected a SPIFFE ID like spiffe://k8s4r.example.org/fleet-server, got "fleet-server"',
  ],
  [
    "tasks:\n  maxConcurrent: 0\n",
    "p.yaml:2: tasks.maxConcurrent: expected an integer in 1..256, got 0",
  ],
];

for (const [yaml, message] of BAD) {
  Deno.test(`bad config: ${message.slice(0, 60)}`, async () => {
    await assert.rejects(load(yaml), (e: Error) => {
      assert.ok(e instanceof ConfigError, `${e.name}: ${e.message}`);
      assert.equal(e.message, message);
      assert.equal(e.exitCode, 2);
      return true;
    });
  });
}

Deno.test("robot id and flag values are usage errors", async () => {
  const cases: [Record<string, string>, AgentFlags, string][] = [
    [{ ROBOT_ID: "" }, {}, "agent: --robot-id ID (or ROBOT_ID) is required"],
    [{}, { robotId: "Robot_1" }, 'agent: robot id "Robot_1": expected [a-z0-9][a-z0-9-]{0,62}'],
    [
      {},
      { heartbeatSeconds: 0.5 },
      "agent: --heartbeat-seconds expects an integer in 1..3600, got 0.5",
    ],
    [
      { MQTT_BROKER_URL: "tcp://h:1883" },
      {},
      'agent: MQTT_BROKER_URL: tcp:// is refused: robots reach the broker only over mTLS; use ssl://, mqtts:// or tls:// (got "tcp://h:1883")',
    ],
    [
      {},
      { brokerUrl: "localhost:8883" },
      'agent: --broker-url: expected a broker URL like ssl://localhost:8883, got "localhost:8883"',
    ],
  ];
  for (const [env, flags, message] of cases) {
    await assert.rejects(load("", env, flags), (e: Error) => {
      assert.ok(e instanceof UsageError, `${e.name}: ${e.message}`);
      assert.equal(e.message, message);
      return true;
    });
  }
});

Deno.test("broker URL schemes: TLS ones are normalised, plaintext is refused", () => {
  assert.deepEqual(parseBrokerUrl("ssl://localhost:8883"), {
    url: "mqtts://localhost:8883",
    host: "localhost",
    port: 8883,
  });
  assert.equal(parseBrokerUrl("tls://broker.example").url, "mqtts://broker.example:8883");
  assert.equal(parseBrokerUrl("MQTTS://127.0.0.1:18883").url, "mqtts://127.0.0.1:18883");
  assert.equal(parseBrokerUrl("ssl://[::1]:8883").url, "mqtts://[::1]:8883");
  assert.equal(parseBrokerUrl("ssl://[::1]:8883").host, "::1");
  for (const bad of ["mqtt://h:1883", "tcp://h", "ws://h", "wss://h"]) {
    assert.throws(() => parseBrokerUrl(bad), /is refused: robots reach the broker only over mTLS/);
  }
  assert.throws(() => parseBrokerUrl("gopher://h"), /unknown scheme gopher:\/\//);
  assert.throws(() => parseBrokerUrl("ssl://h:99999"), /expected a port in 1..65535|host\[:port\]/);
  assert.throws(() => parseBrokerUrl("ssl://user:pw@h:1"), /without user, password or path/);
  assert.throws(() => parseBrokerUrl("ssl://h:1/path"), /without user, password or path/);
});

Deno.test("interpolation: ${VAR}, ${VAR:-default}, $$", () => {
  const env = { A: "a", EMPTY: "" };
  assert.equal(interpolate("x${A}y", env), "xay");
  assert.equal(interpolate("${B:-dflt}", env), "dflt");
  assert.equal(interpolate("${EMPTY:-dflt}", env), "dflt");
  assert.equal(interpolate("${EMPTY}", env), "");
  assert.equal(interpolate("$${A} $5", env), "${A} $5");
  assert.throws(() => interpolate("${B}", env), /environment variable B is not set/);
});

Deno.test("--spire-sync-interval and --spire-agent-bin: what devenv hands the managed spire-agent", async () => {
  assert.equal((await load("")).spire.syncInterval, undefined);
  assert.equal((await load("")).spire.agentBin, undefined);
  assert.ok((await load("", {}, { spireAgentBin: "bin/spire-agent" })).spire.agentBin!
    .endsWith("/bin/spire-agent"));
  assert.equal((await load("", {}, { spireSyncInterval: "500ms" })).spire.syncInterval, "500ms");
  await assert.rejects(
    load("", {}, { spireSyncInterval: "fast" }),
    (e: unknown) =>
      e instanceof UsageError && /--spire-sync-interval expects a Go duration/.test(e.message),
  );
});

Deno.test("robot.id and the x509pop node attestor come from the file; flags and env still win", async () => {
  const yaml = [
    "robot:",
    "  id: robot-042",
    "spire:",
    "  nodeAttestor: x509pop",
    "  x509popKeyPath: x509pop/agent.key",
    "  x509popCertPath: /abs/agent.crt",
    "",
  ].join("\n");
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/p.yaml`, yaml);
    const c = await loadAgentConfig({ cwd: dir, env: {}, flags: { config: "p.yaml" } });
    assert.equal(c.robotId, "robot-042");
    assert.deepEqual(c.spire.nodeAttestor, {
      type: "x509pop",
      privateKeyPath: join(dir, "x509pop/agent.key"),
      certificatePath: "/abs/agent.crt",
    });
    const e = await loadAgentConfig({
      cwd: dir,
      env: { ROBOT_ID: "robot-1" },
      flags: { config: "p.yaml" },
    });
    assert.equal(e.robotId, "robot-1");
    await Deno.writeTextFile(`${dir}/p.yaml`, "robot:\n  id: Robot_1\n");
    await assert.rejects(
      loadAgentConfig({ cwd: dir, env: {}, flags: { config: "p.yaml" } }),
      (err: Error) =>
        err.message === 'p.yaml:2: robot.id: expected [a-z0-9][a-z0-9-]{0,62}, got "Robot_1"',
    );
    await Deno.writeTextFile(`${dir}/p.yaml`, "spire:\n  nodeAttestor: x509pop\n");
    await assert.rejects(
      loadAgentConfig({ cwd: dir, env: { ROBOT_ID: "r" }, flags: { config: "p.yaml" } }),
      /p\.yaml:2: spire\.x509popKeyPath: expected a path: spire\.nodeAttestor x509pop needs/,
    );
    const d = await loadAgentConfig({ cwd: dir, env: { ROBOT_ID: "r" }, flags: {} });
    assert.deepEqual(d.spire.nodeAttestor, { type: "join_token" });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("config lookup: --data-dir's agent.yaml, then the project's plugins.yaml, then production", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const prod = `${dir}/etc/agent.yaml`;
    const opts = (flags: AgentFlags) => ({
      cwd: `${dir}/proj`,
      env: {},
      flags,
      productionConfig: prod,
    });
    await Deno.mkdir(`${dir}/etc`);
    await Deno.mkdir(`${dir}/proj/config/agent`, { recursive: true });
    await Deno.mkdir(`${dir}/robot`);
    await assert.rejects(loadAgentConfig(opts({})), /--robot-id ID \(or ROBOT_ID\) is required/);
    await Deno.writeTextFile(prod, "robot:\n  id: from-production\n");
    assert.equal((await loadAgentConfig(opts({}))).robotId, "from-production");
    assert.equal((await loadAgentConfig(opts({}))).file, prod);
    await Deno.writeTextFile(
      `${dir}/proj/config/agent/plugins.yaml`,
      "robot:\n  id: from-project\n",
    );
    assert.equal((await loadAgentConfig(opts({}))).robotId, "from-project");
    // --data-dir DIR without DIR/agent.yaml: the project's file, with DIR as spire.dataDir.
    const noYaml = await loadAgentConfig(opts({ dataDir: `${dir}/robot` }));
    assert.equal(noYaml.robotId, "from-project");
    assert.equal(noYaml.spire.dataDir, `${dir}/robot`);
    await Deno.writeTextFile(`${dir}/robot/agent.yaml`, "robot:\n  id: from-data-dir\n");
    const enrolled = await loadAgentConfig(opts({ dataDir: `${dir}/robot` }));
    assert.equal(enrolled.robotId, "from-data-dir");
    assert.equal(enrolled.file, `${dir}/robot/agent.yaml`);
    // --config wins over all of them.
    await Deno.writeTextFile(`${dir}/proj/x.yaml`, "robot:\n  id: from-flag\n");
    assert.equal(
      (await loadAgentConfig(opts({ config: "x.yaml", dataDir: `${dir}/robot` }))).robotId,
      "from-flag",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("metrics.listen: a loopback HOST:PORT (file or flag); anything else names the key", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = `${dir}/p.yaml`;
    const load = (text: string, flags: Record<string, string> = {}) =>
      Deno.writeTextFile(file, text).then(() =>
        loadAgentConfig({
          cwd: dir,
          env: {},
          flags: { robotId: "robot-001", config: file, ...flags },
        })
      );
    assert.deepEqual((await load("metrics:\n  listen: 127.0.0.1:9803\n")).metrics, {
      listen: { hostname: "127.0.0.1", port: 9803 },
    });
    assert.deepEqual((await load("mqtt:\n  heartbeatSeconds: 5\n")).metrics, { listen: undefined });
    await assert.rejects(
      () => load("metrics:\n  listen: 0.0.0.0:9803\n"),
      (e: Error) =>
        e.message ===
          `${file}:2: metrics.listen: expected a loopback address (127.0.0.1, [::1], localhost), got "0.0.0.0:9803"`,
    );
    await assert.rejects(
      () => load("metrics:\n  listen: nine\n"),
      /p\.yaml:2: metrics\.listen: expected host:port like 127\.0\.0\.1:9803, got "nine"/,
    );
    // The flag wins over the file.
    assert.deepEqual(
      (await load("metrics:\n  listen: 127.0.0.1:9803\n", { metricsListen: "[::1]:9900" })).metrics,
      { listen: { hostname: "::1", port: 9900 } },
    );
    await assert.rejects(
      () => load("", { metricsListen: "10.0.0.1:9900" }),
      /--metrics-listen: expected a loopback address/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
