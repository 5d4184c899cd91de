import assert from "node:assert/strict";
import {
  decodeDown,
  decodeUp,
  encode,
  MAX_OUTPUT_TAIL,
  MAX_PAYLOAD_BYTES,
  tail,
  validateCancel,
  validateHeartbeat,
  validateRegister,
  validateStatus,
  validateTask,
  validateTaskStatus,
} from "./messages.ts";

const TS = "2025-01-31T12:00:00.000Z";
const env = { v: 1, robotId: "robot-001", ts: TS };

const goodRegister = {
  ...env,
  type: "register",
  spiffeId: "spiffe://k8s4r.example.org/robot/robot-001",
  agentVersion: "0.1.0",
  heartbeatIntervalSeconds: 5,
  svidExpiresAt: TS,
  device: {
    hostname: "rpi",
    os: "linux",
    arch: "x86_64",
    cpus: 4,
    memoryBytes: 8e9,
    load: [0.1, 0.2, 0.3],
    uptimeSeconds: 100,
  },
};
const goodHeartbeat = { ...env, type: "heartbeat", seq: 3, svidExpiresAt: TS, load: [1, 2, 3] };
const goodStatus = { ...env, type: "status", status: "offline", reason: "connection lost" };
const goodTaskStatus = {
  ...env,
  type: "task-status",
  taskId: "t-1",
  state: "done",
  exitCode: 0,
  stdout: "hi\n",
  stderr: "",
};
const goodTask = {
  ...env,
  type: "task",
  id: "t-1",
  command: ["uname", "-a"],
  env: { LANG: "C" },
  cwd: "/",
  timeoutSeconds: 30,
  createdAt: TS,
  expiresAt: TS,
};
const goodCancel = { ...env, type: "cancel", taskId: "t-1" };

Deno.test("valid messages pass, and unknown extra fields are tolerated", () => {
  const extra = { futureField: { nested: true } };
  assert.ok(validateRegister({ ...goodRegister, ...extra }).ok);
  assert.ok(validateHeartbeat({ ...goodHeartbeat, ...extra }).ok);
  assert.ok(validateStatus({ ...goodStatus, ...extra }).ok);
  assert.ok(validateTaskStatus({ ...goodTaskStatus, ...extra }).ok);
  assert.ok(validateTask({ ...goodTask, ...extra }).ok);
  assert.ok(validateCancel({ ...goodCancel, ...extra }).ok);
  const cancelled = validateTaskStatus({ ...goodTaskStatus, state: "cancelled", exitCode: null });
  assert.ok(cancelled.ok);
  const replay = validateTaskStatus({
    ...goodTaskStatus,
    state: "refused",
    error: "replay: task id seen before",
    reason: "replay",
  });
  assert.ok(replay.ok && replay.value.reason === "replay");
  const hb = validateHeartbeat({ ...goodHeartbeat, load: undefined });
  assert.ok(hb.ok);
  if (hb.ok) assert.equal(hb.value.load, undefined);
});

type V = (v: unknown) => { ok: boolean; error?: string };
const BAD: [string, V, unknown, string][] = [
  [
    "not an object",
    validateHeartbeat as V,
    [1],
    "heartbeat: expected a JSON object, got an array of 1",
  ],
  ["null", validateStatus as V, null, "status: expected a JSON object, got null"],
  [
    "higher major",
    validateHeartbeat as V,
    { ...goodHeartbeat, v: 2 },
    "heartbeat.v: unsupported protocol version 2 (this side speaks 1)",
  ],
  [
    "v missing",
    validateHeartbeat as V,
    { ...goodHeartbeat, v: undefined },
    "heartbeat.v: expected protocol version integer >= 1, got nothing",
  ],
  [
    "v string",
    validateRegister as V,
    { ...goodRegister, v: "1" },
    'register.v: expected protocol version integer >= 1, got "1"',
  ],
  [
    "wrong type",
    validateHeartbeat as V,
    { ...goodHeartbeat, type: "status" },
    'heartbeat.type: expected "heartbeat", got "status"',
  ],
  [
    "bad robot id",
    validateStatus as V,
    { ...goodStatus, robotId: "Robot 1" },
    'status.robotId: expected robot id matching [a-z0-9][a-z0-9-]{0,62}, got "Robot 1"',
  ],
  [
    "bad ts",
    validateStatus as V,
    { ...goodStatus, ts: "yesterday" },
    'status.ts: expected RFC 3339 UTC timestamp like 2025-01-31T12:00:00.000Z, got "yesterday"',
  ],
  [
    "ts as number",
    validateStatus as V,
    { ...goodStatus, ts: 1700000000 },
    "status.ts: expected RFC 3339 UTC timestamp like 2025-01-31T12:00:00.000Z, got 1700000000",
  ],
  [
    "load of 2",
    validateHeartbeat as V,
    { ...goodHeartbeat, load: [1, 2] },
    "heartbeat.load: expected array of 3 numbers, got an array of 2",
  ],
  [
    "load strings",
    validateHeartbeat as V,
    { ...goodHeartbeat, load: ["1", 2, 3] },
    "heartbeat.load: expected array of 3 numbers, got an array of 3",
  ],
  [
    "seq negative",
    validateHeartbeat as V,
    { ...goodHeartbeat, seq: -1 },
    "heartbeat.seq: expected integer in [0, 9007199254740991], got -1",
  ],
  [
    "seq float",
    validateHeartbeat as V,
    { ...goodHeartbeat, seq: 1.5 },
    "heartbeat.seq: expected integer in [0, 9007199254740991], got 1.5",
  ],
  [
    "status value",
    validateStatus as V,
    { ...goodStatus, status: "sleeping" },
    'status.status: expected one of online|offline, got "sleeping"',
  ],
  [
    "reason too long",
    validateStatus as V,
    { ...goodStatus, reason: "x".repeat(300) },
    "status.reason: expected string of at most 256 chars, got a string of 300 chars",
  ],
  [
    "spiffe id",
    validateRegister as V,
    { ...goodRegister, spiffeId: "https://x" },
    'register.spiffeId: expected SPIFFE ID (spiffe://...), got "https://x"',
  ],
  [
    "device missing",
    validateRegister as V,
    { ...goodRegister, device: undefined },
    "register.device: expected object, got nothing",
  ],
  ["device.cpus", validateRegister as V, {
    ...goodRegister,
    device: { ...goodRegister.device, cpus: 0 },
  }, "register.device.cpus: expected integer in [1, 65536], got 0"],
  ["device.load", validateRegister as V, {
    ...goodRegister,
    device: { ...goodRegister.device, load: "high" },
  }, 'register.device.load: expected array of 3 numbers, got "high"'],
  [
    "hb interval",
    validateRegister as V,
    { ...goodRegister, heartbeatIntervalSeconds: 0 },
    "register.heartbeatIntervalSeconds: expected integer in [1, 3600], got 0",
  ],
  [
    "empty agentVersion",
    validateRegister as V,
    { ...goodRegister, agentVersion: "" },
    'register.agentVersion: expected non-empty string of at most 64 chars, got ""',
  ],
  [
    "task state",
    validateTaskStatus as V,
    { ...goodTaskStatus, state: "finished" },
    'task-status.state: expected one of accepted|running|done|refused|failed|cancelled, got "finished"',
  ],
  [
    "refusal reason unknown",
    validateTaskStatus as V,
    { ...goodTaskStatus, state: "refused", error: "x", reason: "nope" },
    'task-status.reason: expected one of bad-signature|wrong-robot|expired|replay, got "nope"',
  ],
  [
    "refusal reason on another state",
    validateTaskStatus as V,
    { ...goodTaskStatus, reason: "replay" },
    'task-status.reason: expected only with state "refused", got state "done"',
  ],
  [
    "done without exit code",
    validateTaskStatus as V,
    { ...goodTaskStatus, exitCode: undefined },
    'task-status.exitCode: expected integer when state is "done", got nothing',
  ],
  [
    "failed without error",
    validateTaskStatus as V,
    { ...goodTaskStatus, state: "failed" },
    'task-status.error: expected non-empty string when state is "failed", got nothing',
  ],
  [
    "stdout too long",
    validateTaskStatus as V,
    { ...goodTaskStatus, stdout: "x".repeat(MAX_OUTPUT_TAIL + 1) },
    `task-status.stdout: expected string of at most ${MAX_OUTPUT_TAIL} chars, got a string of ${
      MAX_OUTPUT_TAIL + 1
    } chars`,
  ],
  [
    "task id",
    validateTaskStatus as V,
    { ...goodTaskStatus, taskId: "../etc" },
    'task-status.taskId: expected task id [A-Za-z0-9][A-Za-z0-9_-]{0,63}, got "../etc"',
  ],
  [
    "command empty",
    validateTask as V,
    { ...goodTask, command: [] },
    "task.command: expected non-empty array of at most 256 strings, got an array of 0",
  ],
  [
    "command string",
    validateTask as V,
    { ...goodTask, command: "uname -a" },
    'task.command: expected non-empty array of at most 256 strings, got "uname -a"',
  ],
  [
    "command number arg",
    validateTask as V,
    { ...goodTask, command: ["sleep", 1] },
    "task.command[1]: expected string, got 1",
  ],
  [
    "env value",
    validateTask as V,
    { ...goodTask, env: { A: 1 } },
    "task.env.A: expected string, got 1",
  ],
  [
    "env name",
    validateTask as V,
    { ...goodTask, env: { "A-B": "x" } },
    'task.env: expected environment variable names matching [A-Za-z_][A-Za-z0-9_]*, got "A-B"',
  ],
  [
    "relative cwd",
    validateTask as V,
    { ...goodTask, cwd: "tmp" },
    'task.cwd: expected absolute path, got "tmp"',
  ],
  [
    "timeout 0",
    validateTask as V,
    { ...goodTask, timeoutSeconds: 0 },
    "task.timeoutSeconds: expected integer in [1, 86400], got 0",
  ],
  [
    "cancel task id",
    validateCancel as V,
    { ...goodCancel, taskId: 5 },
    "cancel.taskId: expected task id [A-Za-z0-9][A-Za-z0-9_-]{0,63}, got 5",
  ],
];

Deno.test("bad messages get one precise error (both directions)", () => {
  for (const [name, validate, input, expected] of BAD) {
    const r = validate(input);
    assert.equal(r.ok, false, name);
    assert.equal(r.error, expected, name);
  }
});

const bytes = (v: unknown) => new TextEncoder().encode(JSON.stringify(v));

Deno.test("decodeUp: topic decides the type, payload robotId must match the topic", () => {
  const ok = decodeUp("k8s4r/robots/robot-001/up/heartbeat", bytes(goodHeartbeat));
  assert.ok(ok.ok);
  const ts = decodeUp("k8s4r/robots/robot-001/up/task", bytes(goodTaskStatus));
  assert.ok(ts.ok);
  const cases: [string, Uint8Array, string, RegExp][] = [
    [
      "k8s4r/robots/robot-002/up/heartbeat",
      bytes(goodHeartbeat),
      "robot-id-mismatch",
      /payload robotId "robot-001" differs from topic robot id "robot-002"/,
    ],
    [
      "k8s4r/robots/robot-001/up/status",
      bytes(goodHeartbeat),
      "bad-schema",
      /status.type: expected "status", got "heartbeat"/,
    ],
    [
      "k8s4r/robots/robot-001/up/heartbeat",
      new TextEncoder().encode("{not json"),
      "bad-json",
      /not UTF-8 JSON/,
    ],
    [
      "k8s4r/robots/robot-001/up/heartbeat",
      new Uint8Array([0xff, 0xfe]),
      "bad-json",
      /not UTF-8 JSON/,
    ],
    [
      "k8s4r/robots/robot-001/up/heartbeat",
      new Uint8Array(MAX_PAYLOAD_BYTES + 1),
      "too-large",
      /exceeds/,
    ],
    [
      "k8s4r/robots/robot-001/up/heartbeat",
      bytes({ ...goodHeartbeat, v: 9 }),
      "unsupported-version",
      /unsupported protocol version 9/,
    ],
    ["k8s4r/robots/robot-001/down/task", bytes(goodTask), "bad-topic", /expected an up topic/],
    ["k8s4r/robots/ROBOT/up/heartbeat", bytes(goodHeartbeat), "bad-topic", /invalid robot id/],
  ];
  for (const [topic, payload, reason, re] of cases) {
    const r = decodeUp(topic, payload);
    assert.equal(r.ok, false, topic);
    if (!r.ok) {
      assert.equal(r.reason, reason, topic);
      assert.match(r.error, re, topic);
    }
  }
});

Deno.test("decodeDown: round trip through encode, and up topics are refused", () => {
  const r = decodeDown("k8s4r/robots/robot-001/down/task", encode(goodTask as never));
  assert.ok(r.ok);
  if (r.ok) assert.deepEqual(r.message, goodTask);
  const c = decodeDown("k8s4r/robots/robot-001/down/cancel", bytes(goodCancel));
  assert.ok(c.ok);
  const up = decodeDown("k8s4r/robots/robot-001/up/task", bytes(goodTask));
  assert.equal(up.ok, false);
  if (!up.ok) assert.equal(up.reason, "bad-topic");
});

Deno.test("tail keeps the end of the output", () => {
  assert.equal(tail("abcdef", 3), "def");
  assert.equal(tail("ab", 3), "ab");
});

Deno.test("heartbeat and register telemetry fields (optional, additive): valid ones are kept", () => {
  const issued = "2025-01-31T11:00:00.000Z";
  const hb = validateHeartbeat({
    ...goodHeartbeat,
    svidIssuedAt: issued,
    workloadApi: "down",
    outboundQueueDepth: 12,
  });
  assert.ok(hb.ok);
  if (hb.ok) {
    assert.equal(hb.value.svidIssuedAt, issued);
    assert.equal(hb.value.workloadApi, "down");
    assert.equal(hb.value.outboundQueueDepth, 12);
  }
  const reg = validateRegister({ ...goodRegister, svidIssuedAt: issued });
  assert.ok(reg.ok);
  if (reg.ok) assert.equal(reg.value.svidIssuedAt, issued);
  // Without them (older agents): nothing is made up.
  const old = validateHeartbeat(goodHeartbeat);
  assert.ok(old.ok);
  if (old.ok) {
    assert.equal(old.value.svidIssuedAt, undefined);
    assert.equal(old.value.workloadApi, undefined);
    assert.equal(old.value.outboundQueueDepth, undefined);
  }
});

Deno.test("heartbeat and register telemetry fields: bad values are bad-schema naming the field", () => {
  const cases: [V, unknown, string][] = [
    [
      validateHeartbeat as V,
      { ...goodHeartbeat, workloadApi: "maybe" },
      'heartbeat.workloadApi: expected one of up|down, got "maybe"',
    ],
    [
      validateHeartbeat as V,
      { ...goodHeartbeat, outboundQueueDepth: -1 },
      "heartbeat.outboundQueueDepth: expected integer in [0, 10000000], got -1",
    ],
    [
      validateHeartbeat as V,
      { ...goodHeartbeat, outboundQueueDepth: 1.5 },
      "heartbeat.outboundQueueDepth: expected integer in [0, 10000000], got 1.5",
    ],
    [
      validateHeartbeat as V,
      { ...goodHeartbeat, svidIssuedAt: "2025-01-31T13:00:00.000Z" },
      `heartbeat.svidIssuedAt: expected a time not after svidExpiresAt (${TS}), got "2025-01-31T13:00:00.000Z"`,
    ],
    [
      validateRegister as V,
      { ...goodRegister, svidIssuedAt: 5 },
      "register.svidIssuedAt: expected RFC 3339 UTC timestamp like 2025-01-31T12:00:00.000Z, got 5",
    ],
  ];
  for (const [fn, input, msg] of cases) {
    const r = fn(input);
    assert.equal(r.ok, false, msg);
    assert.equal(r.error, msg);
  }
  // Through the decoder: counted as bad-schema.
  const d = decodeUp(
    "k8s4r/robots/robot-001/up/heartbeat",
    new TextEncoder().encode(JSON.stringify({ ...goodHeartbeat, workloadApi: "maybe" })),
  );
  assert.equal(d.ok, false);
  if (!d.ok) assert.equal(d.reason, "bad-schema");
});
