import assert from "node:assert/strict";
import { bufferIo } from "../cli/io.ts";
import { runCli } from "../cli/mod.ts";
import { decodeDown, type TaskMessage } from "../mqtt/messages.ts";
import { FleetService, type Publisher } from "./fleet.ts";
import { createHandler, MAX_BODY_BYTES } from "./http_api.ts";
import { serveHttps, svidServerTls } from "./https.ts";
import { openSqliteFile } from "./registry_sqlite.ts";
import { staticRoles } from "./roles.ts";
import { robotsCommand, taskCommand, tasksCommand } from "./command.ts";
import { TestHttps, UNSIGNED, writeTestCredentials } from "./testing.ts";

class FakePublisher implements Publisher {
  sent: { topic: string; msg: TaskMessage }[] = [];
  online = true;
  onPublish?: (msg: TaskMessage) => void;
  publish(topic: string, payload: Uint8Array): Promise<void> {
    const d = decodeDown(topic, payload);
    if (!d.ok) throw new Error(`server published an invalid message: ${d.error}`);
    this.sent.push({ topic, msg: d.message as TaskMessage });
    queueMicrotask(() => this.onPublish?.(d.message as TaskMessage));
    return Promise.resolve();
  }
  connected() {
    return this.online;
  }
}

function setup(now = { t: Date.parse("2025-01-01T00:00:00Z") }) {
  const registry = openSqliteFile(":memory:");
  const pub = new FakePublisher();
  let n = 0;
  const fleet = new FleetService(registry, pub, {
    now: () => new Date(now.t),
    newId: () => `task-${++n}`,
    heartbeatIntervalSeconds: 10,
    signer: UNSIGNED,
  });
  const web = new TestHttps();
  const roles = staticRoles({ admin: "operator" });
  const handler = createHandler({
    fleet,
    mqttConnected: () => pub.online,
    auth: { trustDomain: web.trustDomain, bundles: web.source, roles },
    hosts: { port: 443, names: () => new Set(["localhost"]) },
  });
  /** As the admin operator, with this server's Host and a JSON content type for bodies. */
  const call = async (method: string, path: string, body?: string) => {
    const headers: Record<string, string> = { host: "localhost" };
    if (body !== undefined) headers["content-type"] = "application/json";
    const res = await handler(new Request(`https://localhost${path}`, { method, body, headers }), {
      peerChain: web.admin.certificates,
    });
    return { status: res.status, headers: res.headers, json: await res.json() };
  };
  return { registry, pub, fleet, call, now, web, roles, handler };
}

const up = (robotId: string, kind: string, msg: Record<string, unknown>, ts: string) => ({
  topic: `k8s4r/robots/${robotId}/up/${kind}`,
  payload: new TextEncoder().encode(JSON.stringify({ v: 1, robotId, ts, ...msg })),
});

function register(fleet: FleetService, robotId: string, ts = "2025-01-01T00:00:00.000Z") {
  const m = up(robotId, "register", {
    type: "register",
    spiffeId: `spiffe://k8s4r.test/robot/${robotId}`,
    agentVersion: "0.1.0",
    heartbeatIntervalSeconds: 5,
    svidExpiresAt: "2025-01-01T01:00:00.000Z",
    device: {
      hostname: "h",
      os: "linux",
      arch: "x86_64",
      cpus: 1,
      memoryBytes: 1,
      load: [0, 0, 0],
      uptimeSeconds: 1,
    },
  }, ts);
  return fleet.handleMessage(m.topic, m.payload);
}

Deno.test("HTTP API: robots, tasks, precise errors", async () => {
  const { call, fleet, pub, registry } = setup();
  try {
    assert.deepEqual((await call("GET", "/api/robots")).json, { robots: [] });
    assert.ok((await register(fleet, "robot-001")).ok);
    const robots = (await call("GET", "/api/robots")).json.robots;
    assert.equal(robots.length, 1);
    assert.equal(robots[0].id, "robot-001");
    assert.equal(robots[0].online, true);
    assert.equal((await call("GET", "/api/robots/robot-001")).json.agentVersion, "0.1.0");

    const created = await call(
      "POST",
      "/api/robots/robot-001/tasks",
      JSON.stringify({ command: ["uname", "-a"], timeoutSeconds: 30, env: {}, cwd: "/" }),
    );
    assert.equal(created.status, 201);
    assert.equal(created.json.id, "task-1");
    assert.equal(created.headers.get("location"), "/api/tasks/task-1");
    await fleet.settled();
    assert.equal(pub.sent.length, 1);
    assert.equal(pub.sent[0].topic, "k8s4r/robots/robot-001/down/task");
    assert.deepEqual(pub.sent[0].msg.command, ["uname", "-a"]);
    assert.equal((await call("GET", "/api/tasks/task-1")).json.state, "dispatched");

    const errors: [string, string, string | undefined, number, RegExp][] = [
      ["GET", "/api/robots/robot-404", undefined, 404, /unknown robot "robot-404"/],
      ["GET", "/api/tasks/nope", undefined, 404, /unknown task "nope"/],
      ["GET", "/nowhere", undefined, 404, /no such endpoint/],
      ["DELETE", "/api/robots", undefined, 405, /method DELETE not allowed/],
      ["POST", "/api/robots/robot-404/tasks", '{"command":["x"]}', 404, /unknown robot/],
      ["POST", "/api/robots/robot-001/tasks", "{", 400, /body: invalid JSON/],
      ["POST", "/api/robots/robot-001/tasks", "", 400, /body: expected a JSON object, got nothing/],
      ["POST", "/api/robots/robot-001/tasks", "[]", 400, /body: expected a JSON object/],
      [
        "POST",
        "/api/robots/robot-001/tasks",
        '{"command":"uname -a"}',
        400,
        /command: expected a non-empty array/,
      ],
      [
        "POST",
        "/api/robots/robot-001/tasks",
        '{"command":["ls",3]}',
        400,
        /command\[1\]: expected a string, got number/,
      ],
      [
        "POST",
        "/api/robots/robot-001/tasks",
        '{"command":["ls"],"timeoutSeconds":0}',
        400,
        /timeoutSeconds: expected an integer in \[1, 86400\], got 0/,
      ],
      [
        "POST",
        "/api/robots/robot-001/tasks",
        '{"command":["ls"],"cwd":"tmp"}',
        400,
        /cwd: expected an absolute path, got "tmp"/,
      ],
      [
        "POST",
        "/api/robots/robot-001/tasks",
        '{"command":["ls"],"env":{"A":1}}',
        400,
        /env.A: expected a string, got number/,
      ],
      [
        "POST",
        "/api/robots/robot-001/tasks",
        '{"command":["ls"],"colour":"red"}',
        400,
        /colour: unknown field/,
      ],
      [
        "POST",
        "/api/robots/robot-001/tasks",
        JSON.stringify({ command: ["x".repeat(MAX_BODY_BYTES)] }),
        413,
        /larger than 65536 bytes/,
      ],
    ];
    for (const [method, path, body, status, re] of errors) {
      const r = await call(method, path, body);
      assert.equal(r.status, status, `${method} ${path} ${body?.slice(0, 40)}`);
      assert.match(r.json.error, re, `${method} ${path}`);
    }
    assert.equal((await call("DELETE", "/api/robots")).headers.get("allow"), "GET, HEAD");
    const health = await call("GET", "/healthz");
    assert.equal(health.status, 200);
    assert.equal(health.json.robots.online, 1);
    pub.online = false;
    assert.equal((await call("GET", "/healthz")).status, 503);
  } finally {
    await registry.close();
  }
});

Deno.test("fleet: offline robot gets its task when it returns; counters; sweeper", async () => {
  const { call, fleet, pub, registry, now } = setup();
  try {
    await register(fleet, "robot-001");
    const off = up(
      "robot-001",
      "status",
      { type: "status", status: "offline" },
      "2025-01-01T00:00:01.000Z",
    );
    await fleet.handleMessage(off.topic, off.payload);
    assert.equal((await registry.getRobot("robot-001"))!.online, false);
    const created = await call("POST", "/api/robots/robot-001/tasks", '{"command":["true"]}');
    await fleet.settled();
    assert.equal(pub.sent.length, 0, "no dispatch while offline");
    assert.equal((await call("GET", `/api/tasks/${created.json.id}`)).json.state, "pending");
    // A replayed (retained) older status is ignored.
    await fleet.handleMessage(off.topic, off.payload);
    // The robot comes back.
    const on = up(
      "robot-001",
      "status",
      { type: "status", status: "online" },
      "2025-01-01T00:00:02.000Z",
    );
    await fleet.handleMessage(on.topic, on.payload);
    await fleet.settled();
    assert.equal(pub.sent.length, 1);
    // Robot reports.
    for (
      const [state, extra] of [["accepted", {}], ["running", {}], ["done", {
        exitCode: 3,
        stdout: "out",
        stderr: "err",
      }]] as const
    ) {
      const m = up("robot-001", "task", {
        type: "task-status",
        taskId: created.json.id,
        state,
        ...extra,
      }, "2025-01-01T00:00:03.000Z");
      assert.ok((await fleet.handleMessage(m.topic, m.payload)).ok);
    }
    const t = (await call("GET", `/api/tasks/${created.json.id}`)).json;
    assert.equal(t.state, "done");
    assert.equal(t.exitCode, 3);
    assert.equal(t.stdout, "out");
    // Another robot cannot report on robot-001's task.
    await register(fleet, "robot-002");
    const forged = up("robot-002", "task", {
      type: "task-status",
      taskId: created.json.id,
      state: "failed",
      error: "x",
    }, "2025-01-01T00:00:04.000Z");
    await fleet.handleMessage(forged.topic, forged.payload);
    assert.equal((await registry.getTask(created.json.id))!.state, "done");
    assert.equal(fleet.stats.unknownTaskReports, 1);
    // Malformed and mismatched messages are counted per reason, never thrown.
    await fleet.handleMessage(
      "k8s4r/robots/robot-001/up/heartbeat",
      new TextEncoder().encode("garbage"),
    );
    const mismatch = up("robot-002", "heartbeat", {
      type: "heartbeat",
      seq: 1,
      svidExpiresAt: "2025-01-01T01:00:00.000Z",
    }, "2025-01-01T00:00:05.000Z");
    await fleet.handleMessage("k8s4r/robots/robot-001/up/heartbeat", mismatch.payload);
    assert.equal(fleet.stats.dropped["bad-json"], 1);
    assert.equal(fleet.stats.dropped["robot-id-mismatch"], 1);
    assert.equal(fleet.stats.droppedTotal, 2);
    // Missed heartbeats: both announced 5 s; after 3 x 5 s of silence they are offline.
    now.t += 16_000;
    const swept = await fleet.sweep();
    assert.deepEqual(swept.offline, ["robot-001", "robot-002"]);
    assert.equal((await registry.getRobot("robot-002"))!.offlineReason, "missed 3 heartbeats");
    // TTL: a task for an offline robot expires.
    const t2 = await call(
      "POST",
      "/api/robots/robot-002/tasks",
      '{"command":["true"],"ttlSeconds":10}',
    );
    now.t += 11_000;
    assert.deepEqual((await fleet.sweep()).expired, [t2.json.id]);
    assert.equal((await call("GET", `/api/tasks/${t2.json.id}`)).json.state, "expired");
  } finally {
    await registry.close();
  }
});

Deno.test("k8s4r robots, tasks and task run against a served HTTPS API", async () => {
  const { fleet, pub, registry, web } = setup({ t: Date.now() });
  let port = 0;
  const handler = createHandler({
    fleet,
    mqttConnected: () => true,
    auth: {
      trustDomain: web.trustDomain,
      bundles: web.source,
      roles: staticRoles({ admin: "operator" }),
    },
    hosts: {
      get port() {
        return port;
      },
      names: () => new Set(["localhost", "127.0.0.1"]),
    },
  });
  const api = await serveHttps(handler, {
    hostname: "127.0.0.1",
    port: 0,
    tls: svidServerTls(web.source),
    urlHost: "localhost",
  });
  port = api.addr.port;
  const home = await Deno.makeTempDir({ prefix: "k8s4r-cli-" });
  const env = { XDG_CONFIG_HOME: home, HOME: home };
  await writeTestCredentials(env, "admin", web.admin, web.ca.rootPem, api.url);
  const cli = () => bufferIo({ env });
  try {
    await register(fleet, "robot-001", new Date().toISOString());
    // A fake robot: answers every task with done + output.
    pub.onPublish = (msg) => {
      const code = msg.command[0] === "false" ? 1 : 0;
      const m = up("robot-001", "task", {
        type: "task-status",
        taskId: msg.id,
        state: msg.command[0] === "forbidden" ? "refused" : "done",
        exitCode: code,
        stdout: `ran ${msg.command.join(" ")}\n`,
        stderr: code ? "boom\n" : "",
        ...(msg.command[0] === "forbidden" ? { error: "command not allowed" } : {}),
      }, new Date().toISOString());
      void fleet.handleMessage(m.topic, m.payload);
    };
    // The server URL comes from the credentials; no --server needed.
    const io = cli();
    assert.equal(await runCli(robotsCommand, [], io), 0);
    const lines = io.out().trim().split("\n");
    assert.match(lines[0], /^ID\s+STATE\s+LAST SEEN\s+SVID EXPIRES$/);
    assert.match(
      lines[1],
      /^robot-001\s+online\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(\d+s ago\)\s+2025-01-01T01:00:00Z \(EXPIRED /,
    );
    const j = cli();
    assert.equal(await runCli(robotsCommand, ["--json"], j), 0);
    assert.equal(JSON.parse(j.out())[0].id, "robot-001");
    // By SPIFFE ID, not by name: 127.0.0.1 (not in the certificate) works for the CLI.
    const byIp = cli();
    assert.equal(
      await runCli(robotsCommand, ["--server", `https://127.0.0.1:${port}`, "--json"], byIp),
      0,
    );

    const run = cli();
    assert.equal(await runCli(taskCommand, ["run", "robot-001", "--", "uname", "-a"], run), 0);
    assert.equal(run.out(), "ran uname -a\n");
    const fail = cli();
    assert.equal(await runCli(taskCommand, ["run", "robot-001", "--", "false"], fail), 1);
    assert.equal(fail.err(), "boom\n");
    await assert.rejects(
      () => runCli(taskCommand, ["run", "robot-001", "--", "forbidden"], cli()),
      /task task-\d+ was refused by robot-001: command not allowed/,
    );
    await assert.rejects(
      () => runCli(taskCommand, ["run", "robot-404", "--", "ls"], cli()),
      /cannot create the task on robot-404: unknown robot "robot-404"/,
    );
    await assert.rejects(
      () => runCli(taskCommand, ["run", "robot-001"], cli()),
      /missing command/,
    );
    await assert.rejects(
      () => runCli(taskCommand, ["run", "Bad_Id", "--", "ls"], cli()),
      /invalid robot id 'Bad_Id'/,
    );
    // tasks: newest first, who created them.
    const t = cli();
    assert.equal(await runCli(tasksCommand, ["--limit", "2"], t), 0);
    const rows = t.out().trim().split("\n");
    assert.match(rows[0], /^ID\s+ROBOT\s+STATE\s+CREATED\s+CREATED BY\s+COMMAND$/);
    assert.equal(rows.length, 3);
    assert.match(rows[1], /^task-3\s+robot-001\s+refused\s+\S+\s+admin\s+forbidden$/);
    assert.match(rows[2], /^task-2\s+robot-001\s+done \(exit 1\)\s+\S+\s+admin\s+false$/);
    assert.match(t.err(), /showing the newest 2/);
    // http:// is refused: the server speaks HTTPS only.
    await assert.rejects(
      () => runCli(robotsCommand, ["--server", `http://127.0.0.1:${port}`], cli()),
      /speaks HTTPS only/,
    );
    // No credentials at all: the error says what to run.
    const empty = await Deno.makeTempDir({ prefix: "k8s4r-cli-" });
    await assert.rejects(
      () => runCli(robotsCommand, [], bufferIo({ env: { XDG_CONFIG_HOME: empty } })),
      (err: Error & { hint?: string }) => {
        assert.match(err.message, /no operator credentials in .*k8s4r\/operators/);
        assert.match(err.hint ?? "", /k8s4r operator add admin --role operator/);
        return true;
      },
    );
    await Deno.remove(empty, { recursive: true });
  } finally {
    await api.close();
    await fleet.settled();
    await registry.close();
    web.close();
  }
  await assert.rejects(
    () => runCli(robotsCommand, [], cli()),
    /cannot reach the fleet server at https:\/\/localhost:\d+/,
  );
  await Deno.remove(home, { recursive: true });
});

Deno.test("/healthz: 503 with the registry's error when it fails or does not answer; 200 again after", async () => {
  const { call, registry } = setup();
  try {
    // Control: a healthy server.
    const ok = await call("GET", "/healthz");
    assert.equal(ok.status, 200);
    assert.equal(ok.json.problems, undefined);
    const real = registry.listRobots.bind(registry);
    registry.listRobots = () => Promise.reject(new Error("connect ECONNREFUSED 127.0.0.1:5432"));
    const down = await call("GET", "/healthz");
    assert.equal(down.status, 503);
    assert.equal(down.json.ok, false);
    assert.deepEqual(down.json.problems, ["registry: connect ECONNREFUSED 127.0.0.1:5432"]);
    assert.equal(down.json.mqtt.connected, true, "the link is reported without the registry");
    // A registry that does not answer at all: /healthz answers anyway, bounded.
    registry.listRobots = () => new Promise(() => {});
    const hung = await call("GET", "/healthz");
    assert.equal(hung.status, 503);
    assert.match(hung.json.problems[0], /^registry: no answer within 1\.5 s$/);
    registry.listRobots = real;
    assert.equal((await call("GET", "/healthz")).status, 200);
  } finally {
    await registry.close();
  }
});
