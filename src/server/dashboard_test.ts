/**
 * The dashboard's login, its browser sessions and the API they unlock, /metrics and the event
 * stream, through the API's handler (http_api.ts) with a real SQLite registry and test
 * certificates. Every refusal has its positive control on the same path.
 */
import assert from "node:assert/strict";
import { FleetService, type Publisher } from "./fleet.ts";
import { type ApiContext, createHandler } from "./http_api.ts";
import { openSqliteFile } from "./registry_sqlite.ts";
import type { RolesSource } from "./roles.ts";
import { TestHttps, UNSIGNED } from "./testing.ts";
import { DashboardSessions, SESSION_COOKIE } from "./sessions.ts";
import { observeFleet } from "./observe.ts";
import { FleetEvents } from "./events.ts";
import { assertPromtoolClean } from "../monitoring/testing.ts";
import { DASHBOARD_CSP } from "./dashboard.ts";
import type { Role } from "./roles.ts";
import type { IssuedCert } from "../spiffe/testing/test_ca.ts";

const NOW = Date.parse("2025-01-01T00:00:00Z");

class Pub implements Publisher {
  publish(): Promise<void> {
    return Promise.resolve();
  }
  connected() {
    return true;
  }
}

function mutableRoles(entries: Record<string, Role>) {
  const ops = new Map(Object.entries(entries));
  const issuedAfter = new Map<string, Date>();
  const src: RolesSource = {
    current: () => ({
      ok: true,
      config: { file: "roles.yaml", operators: ops, issuedAfter },
      missing: false,
    }),
  };
  return { src, ops, issuedAfter };
}

function setup(api: Partial<ApiContext> = {}, events?: FleetEvents) {
  const clock = { t: NOW };
  const registry = openSqliteFile(":memory:");
  const fleet = new FleetService(registry, new Pub(), {
    now: () => new Date(clock.t),
    signer: UNSIGNED,
  });
  const web = new TestHttps();
  const viewer = web.operator("vera");
  const roles = mutableRoles({ admin: "operator", vera: "viewer" });
  const obs = observeFleet(fleet, {
    mqtt: () => ({ connected: true, connects: 1 }),
    pollMs: 50,
    events,
  });
  const sessions = new DashboardSessions({ now: () => clock.t });
  const handler = createHandler({
    fleet,
    mqttConnected: () => true,
    auth: { trustDomain: web.trustDomain, bundles: web.source, roles: roles.src },
    hosts: { port: 443, names: () => new Set(["localhost"]) },
    metrics: obs.metrics,
    events: obs.events,
    sessions,
    ...api,
  });
  const call = async (
    method: string,
    path: string,
    o: {
      cert?: IssuedCert | null;
      cookie?: string;
      body?: string;
      headers?: Record<string, string>;
    } = {},
  ) => {
    const headers: Record<string, string> = { host: "localhost", ...o.headers };
    if (o.body !== undefined && !headers["content-type"]) {
      headers["content-type"] = "application/json";
    }
    if (o.cookie) headers.cookie = `${SESSION_COOKIE}=${o.cookie}`;
    const cert = o.cert === undefined ? null : o.cert;
    const res = await handler(
      new Request(`https://localhost${path}`, { method, body: o.body, headers }),
      cert ? { peerChain: cert.certificates } : {},
    );
    return res;
  };
  /** The login page's button: POSTs the token of a login path (as the page's form does). */
  const confirm = (path: string, headers: Record<string, string> = {}) =>
    call("POST", "/dashboard/login", {
      body: `token=${new URL(path, "https://localhost").searchParams.get("token")}`,
      headers: {
        origin: "https://localhost",
        "content-type": "application/x-www-form-urlencoded",
        ...headers,
      },
    });
  /** Logs in as `cert` through the one-time URL; returns the session id of the cookie. */
  const login = async (cert: IssuedCert) => {
    const r = await call("POST", "/api/dashboard/login", { cert, body: "{}" });
    assert.equal(r.status, 201);
    const { path } = await r.json();
    const look = await call("GET", path);
    assert.equal(look.status, 200);
    const open = await confirm(path);
    assert.equal(open.status, 303);
    const m = new RegExp(`${SESSION_COOKIE}=([^;]+)`).exec(open.headers.get("set-cookie")!);
    return { id: m![1], path };
  };
  return { clock, registry, fleet, web, viewer, roles, obs, sessions, call, confirm, login };
}

async function register(fleet: FleetService, robotId: string) {
  const payload = new TextEncoder().encode(JSON.stringify({
    v: 1,
    type: "register",
    robotId,
    ts: new Date(NOW).toISOString(),
    spiffeId: `spiffe://k8s4r.test/robot/${robotId}`,
    agentVersion: "0.1.0",
    heartbeatIntervalSeconds: 5,
    svidExpiresAt: "2025-01-01T01:00:00.000Z",
    svidIssuedAt: "2025-01-01T00:00:00.000Z",
    device: {
      hostname: "h",
      os: "linux",
      arch: "x86_64",
      cpus: 1,
      memoryBytes: 1,
      load: [0.5, 0, 0],
      uptimeSeconds: 1,
    },
  }));
  const r = await fleet.handleMessage(`k8s4r/robots/${robotId}/up/register`, payload);
  assert.ok(r.ok);
}

Deno.test("dashboard: a one-time login URL becomes a Secure, HttpOnly, SameSite=Strict session", async () => {
  const t = setup();
  try {
    const r = await t.call("POST", "/api/dashboard/login", { cert: t.web.admin, body: "{}" });
    assert.equal(r.status, 201);
    const body = await r.json();
    assert.match(body.path, /^\/dashboard\/login\?token=[A-Za-z0-9_-]{43}$/);
    assert.equal(body.operator, "admin");
    assert.equal(Date.parse(body.expiresAt) - NOW, 120_000, "valid for 2 minutes");

    // Opening the URL shows who it logs in as; only its button uses the token.
    const look = await t.call("GET", body.path);
    assert.equal(look.status, 200);
    assert.equal(look.headers.get("set-cookie"), null);
    assert.equal(look.headers.get("cache-control"), "no-store");
    // (no-referrer would make Chromium POST the form with Origin: null, which is refused)
    assert.equal(look.headers.get("referrer-policy"), "same-origin");
    assert.match(await look.text(), /<button type="submit" id="login">Log in as admin<\/button>/);
    const open = await t.confirm(body.path);
    assert.equal(open.status, 303);
    assert.equal(open.headers.get("location"), "/dashboard/");
    assert.equal(open.headers.get("referrer-policy"), "no-referrer");
    const cookie = open.headers.get("set-cookie")!;
    for (const attr of ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"]) {
      assert.ok(cookie.split("; ").includes(attr), `${attr} in ${cookie}`);
    }
    // __Host-: no Domain, Secure, Path=/; no other origin of this host can plant or shadow it.
    assert.match(cookie, /^__Host-k8s4r_session=/);
    assert.doesNotMatch(cookie, /Domain=/i);
    const id = /__Host-k8s4r_session=([^;]+)/.exec(cookie)![1];
    assert.doesNotMatch(cookie, new RegExp(body.path.split("=")[1]), "not the login token");

    // The session acts as admin, with admin's role.
    const me = await t.call("GET", "/api/whoami", { cookie: id });
    assert.equal(me.status, 200);
    assert.deepEqual(await me.json(), {
      spiffeId: "spiffe://k8s4r.test/operator/admin",
      operator: "admin",
      role: "operator",
      via: "session",
    });

    // The URL works once: its page says so, and its button too.
    const again = await t.call("GET", body.path);
    assert.equal(again.status, 401);
    assert.match(await again.text(), /used already/);
    const twice = await t.confirm(body.path);
    assert.equal(twice.status, 401);
    assert.match(await twice.text(), /used already/);
    assert.equal(twice.headers.get("set-cookie"), null);

    // And not after it expired (positive control first: a fresh one works at 119 s).
    const a =
      await (await t.call("POST", "/api/dashboard/login", { cert: t.web.admin, body: "{}" }))
        .json();
    const b =
      await (await t.call("POST", "/api/dashboard/login", { cert: t.web.admin, body: "{}" }))
        .json();
    t.clock.t += 119_000;
    assert.equal((await t.confirm(a.path)).status, 303);
    t.clock.t += 2_000;
    const late = await t.call("GET", b.path);
    assert.equal(late.status, 401);
    assert.match(await late.text(), /expired/);
    assert.equal((await t.confirm(b.path)).status, 401);
    // A made-up token.
    const fake = await t.call("GET", `/dashboard/login?token=${"A".repeat(43)}`);
    assert.equal(fake.status, 401);
    assert.match(await fake.text(), /not valid/);
  } finally {
    t.obs.close();
    await t.registry.close();
  }
});

Deno.test("dashboard: minting a login needs a certificate (not a session, not nothing)", async () => {
  const t = setup();
  try {
    const s = await t.login(t.web.admin);
    const bySession = await t.call("POST", "/api/dashboard/login", {
      cookie: s.id,
      body: "{}",
      headers: { origin: "https://localhost" },
    });
    assert.equal(bySession.status, 403);
    assert.match((await bySession.json()).error, /needs a client certificate/);
    const byNobody = await t.call("POST", "/api/dashboard/login", { body: "{}" });
    assert.equal(byNobody.status, 401);
    // A viewer may get one (reading is all it will do).
    const viewer = await t.call("POST", "/api/dashboard/login", { cert: t.viewer, body: "{}" });
    assert.equal(viewer.status, 201);
  } finally {
    t.obs.close();
    await t.registry.close();
  }
});

Deno.test("dashboard: a session's mutating request passes Host, Origin and content-type checks, and its role", async () => {
  const t = setup();
  try {
    await register(t.fleet, "robot-001");
    const admin = await t.login(t.web.admin);
    const vera = await t.login(t.viewer);
    const body = JSON.stringify({ command: ["echo", "hi"] });
    const origin = { origin: "https://localhost" };
    const post = (cookie: string, headers: Record<string, string> = origin, b = body) =>
      t.call("POST", "/api/robots/robot-001/tasks", { cookie, body: b, headers });

    // Positive control: the operator's session creates the task, recorded as admin's.
    const ok = await post(admin.id);
    assert.equal(ok.status, 201);
    assert.equal((await ok.json()).createdBy, "spiffe://k8s4r.test/operator/admin");

    const noOrigin = await post(admin.id, {});
    assert.equal(noOrigin.status, 403);
    assert.equal((await noOrigin.json()).code, "bad-origin");
    const evil = await post(admin.id, { origin: "https://evil.example" });
    assert.equal(evil.status, 403);
    assert.equal((await evil.json()).code, "bad-origin");
    const badHost = await t.call("POST", "/api/robots/robot-001/tasks", {
      cookie: admin.id,
      body,
      headers: { ...origin, host: "evil.example" },
    });
    assert.equal(badHost.status, 403);
    assert.equal((await badHost.json()).code, "bad-host");
    const form = await post(admin.id, { ...origin, "content-type": "text/plain" });
    assert.equal(form.status, 415);

    // A viewer's session reads but does not write.
    assert.equal((await t.call("GET", "/api/robots", { cookie: vera.id })).status, 200);
    const viewerPost = await post(vera.id);
    assert.equal(viewerPost.status, 403);
    assert.equal((await viewerPost.json()).code, "forbidden");

    // The role is read at each request: removed from the roles config, the session is refused.
    t.roles.ops.delete("admin");
    const removed = await t.call("GET", "/api/robots", { cookie: admin.id });
    assert.equal(removed.status, 403);
    assert.equal((await removed.json()).code, "no-role");
    t.roles.ops.set("admin", "operator");
    assert.equal((await t.call("GET", "/api/robots", { cookie: admin.id })).status, 200);

    // Logout ends the session.
    const out = await t.call("POST", "/dashboard/logout", { cookie: admin.id, headers: origin });
    assert.equal(out.status, 204);
    assert.match(out.headers.get("set-cookie")!, /Max-Age=0/);
    assert.equal((await t.call("GET", "/api/robots", { cookie: admin.id })).status, 401);
    // A session past its end is refused (8 h).
    t.clock.t += 8 * 3600_000 + 1;
    assert.equal((await t.call("GET", "/api/robots", { cookie: vera.id })).status, 401);
  } finally {
    t.obs.close();
    await t.registry.close();
  }
});

Deno.test("dashboard: the page and its assets are embedded and served with a strict CSP", async () => {
  const t = setup();
  try {
    const page = await t.call("GET", "/dashboard/");
    assert.equal(page.status, 200);
    assert.match(page.headers.get("content-type")!, /^text\/html/);
    assert.equal(page.headers.get("content-security-policy"), DASHBOARD_CSP);
    assert.match(await page.text(), /<k8s4r-app>/);
    const js = await t.call("GET", "/dashboard/assets/app.js");
    assert.equal(js.status, 200);
    assert.match(js.headers.get("content-type")!, /^text\/javascript/);
    assert.match(await js.text(), /customElements\.define\("k8s4r-app"/);
    // No way out of the embedded files: ../ is resolved by the URL (then it is not ours), an
    // encoded slash is not a file name.
    assert.equal((await t.call("GET", "/dashboard/assets/../../etc/passwd")).status, 401);
    assert.equal((await t.call("GET", "/dashboard/assets/..%2f..%2fetc%2fpasswd")).status, 404);
    assert.equal((await t.call("GET", "/dashboard/assets/nope.js")).status, 404);
    assert.equal((await t.call("GET", "/dashboard")).status, 308);
  } finally {
    t.obs.close();
    await t.registry.close();
  }
});

Deno.test("/metrics: the API's authorization, then a promtool-clean page fed by the registry", async () => {
  const t = setup();
  try {
    await register(t.fleet, "robot-001");
    const hb = new TextEncoder().encode(JSON.stringify({
      v: 1,
      type: "heartbeat",
      robotId: "robot-001",
      ts: new Date(NOW).toISOString(),
      seq: 1,
      bootId: "b",
      svidExpiresAt: "2025-01-01T01:00:00.000Z",
      svidIssuedAt: "2025-01-01T00:00:00.000Z",
      workloadApi: "down",
      outboundQueueDepth: 7,
    }));
    assert.ok((await t.fleet.handleMessage("k8s4r/robots/robot-001/up/heartbeat", hb)).ok);
    const task = await t.fleet.createTask("robot-001", {
      command: ["true"],
      env: {},
      timeoutSeconds: 5,
    });
    t.clock.t += 1500;
    const rep = new TextEncoder().encode(JSON.stringify({
      v: 1,
      type: "task-status",
      robotId: "robot-001",
      ts: new Date(t.clock.t).toISOString(),
      taskId: task.id,
      state: "done",
      exitCode: 0,
    }));
    assert.ok((await t.fleet.handleMessage("k8s4r/robots/robot-001/up/task", rep)).ok);

    assert.equal((await t.call("GET", "/metrics")).status, 401, "no certificate");
    const stranger = t.web.operator("mallory");
    assert.equal((await t.call("GET", "/metrics", { cert: stranger })).status, 403, "no role");
    const r = await t.call("GET", "/metrics", { cert: t.viewer });
    assert.equal(r.status, 200);
    assert.match(r.headers.get("content-type")!, /^text\/plain; version=0\.0\.4/);
    const text = await r.text();
    await assertPromtoolClean(text, "the fleet server's /metrics");
    const has = (line: string) =>
      assert.ok(text.split("\n").includes(line), `${line} in:\n${text}`);
    has("k8s4r_robots_known 1");
    has("k8s4r_robots_online 1");
    has('k8s4r_robot_online{robot="robot-001"} 1');
    has('k8s4r_robot_workload_api_up{robot="robot-001"} 0');
    has('k8s4r_robot_outbound_queue_messages{robot="robot-001"} 7');
    has(`k8s4r_robot_svid_issued_timestamp_seconds{robot="robot-001"} ${NOW / 1000}`);
    has('k8s4r_robot_heartbeats_received_total{robot="robot-001"} 1');
    has('k8s4r_task_latency_seconds_count{state="done"} 1');
    has('k8s4r_task_latency_seconds_bucket{le="2.5",state="done"} 1');
    has('k8s4r_task_latency_seconds_bucket{le="1",state="done"} 0');
    has('k8s4r_tasks{state="done"} 1');
    has("k8s4r_mqtt_connected 1");
    // The registry's own timer: message batches, the task creation, the scrape's reads.
    const count = (op: string) =>
      Number(
        text.split("\n").find((l) =>
          l.startsWith(`k8s4r_storage_operation_duration_seconds_count{op="${op}"}`)
        )?.split(" ")[1],
      );
    assert.ok(count("message") >= 3, `message ops: ${count("message")}`);
    assert.ok(count("task") >= 1, `task ops: ${count("task")}`);
    assert.ok(count("read") >= 2, `read ops: ${count("read")}`);
  } finally {
    t.obs.close();
    await t.registry.close();
  }
});

Deno.test("events: online/offline and rotations from commits, live through SSE to a session", async () => {
  const t = setup();
  try {
    const s = await t.login(t.viewer);
    const res = await t.call("GET", "/api/events/stream", { cookie: s.id });
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type")!, /^text\/event-stream/);
    const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    const next = async (kind: string) => {
      while (!new RegExp(`"kind":"${kind}"`).test(buf)) {
        const { value, done } = await reader.read();
        if (done) throw new Error(`stream ended before a ${kind} event:\n${buf}`);
        buf += value;
      }
      const frames = buf.split("\n\n").filter((f) => f.includes(`"kind":"${kind}"`));
      return JSON.parse(frames[0].split("\n").find((l) => l.startsWith("data: "))!.slice(6));
    };
    await register(t.fleet, "robot-001");
    const online = await next("online");
    assert.equal(online.robotId, "robot-001");
    // The will of a crashed agent: offline at once.
    const will = new TextEncoder().encode(JSON.stringify({
      v: 1,
      type: "status",
      robotId: "robot-001",
      ts: new Date(NOW + 1000).toISOString(),
      status: "offline",
      reason: "connection lost",
    }));
    assert.ok((await t.fleet.handleMessage("k8s4r/robots/robot-001/up/status", will)).ok);
    const offline = await next("offline");
    assert.equal(offline.text, "robot-001 is offline (connection lost)");
    await reader.cancel();

    // A heartbeat with another SVID expiry than the register's is a rotation.
    const hb = (seq: number, exp: string) =>
      new TextEncoder().encode(JSON.stringify({
        v: 1,
        type: "heartbeat",
        robotId: "robot-001",
        ts: new Date(NOW).toISOString(),
        seq,
        bootId: "b",
        svidExpiresAt: exp,
      }));
    await t.fleet.handleMessage(
      "k8s4r/robots/robot-001/up/heartbeat",
      hb(1, "2025-01-01T01:00:00.000Z"),
    );
    assert.equal(t.obs.events.recent().filter((e) => e.kind === "rotation").length, 0);
    await t.fleet.handleMessage(
      "k8s4r/robots/robot-001/up/heartbeat",
      hb(3, "2025-01-01T02:00:00.000Z"),
    );
    const rot = t.obs.events.recent().filter((e) => e.kind === "rotation");
    assert.equal(rot.length, 1);
    assert.equal(rot[0].robotId, "robot-001");
    // ... and the robot page's heartbeat history shows the gap.
    const beats = await (await t.call("GET", "/api/robots/robot-001/heartbeats", { cookie: s.id }))
      .json();
    assert.deepEqual(
      beats.recent.map((b: { seq: number; missing: number }) => [b.seq, b.missing]),
      [
        [1, 0],
        [3, 1],
      ],
    );
    assert.equal(beats.missing, 1);

    // Dropped messages: summed up per reason by the poller.
    for (let i = 0; i < 5; i++) {
      await t.fleet.handleMessage(
        "k8s4r/robots/robot-001/up/heartbeat",
        new TextEncoder().encode("{"),
      );
    }
    let dropped: { detail?: Record<string, unknown> }[] = [];
    for (let i = 0; i < 100 && dropped.length === 0; i++) {
      await new Promise((r) => setTimeout(r, 20));
      dropped = t.obs.events.recent().filter((e) => e.kind === "dropped");
    }
    assert.equal(dropped.length, 1);
    assert.deepEqual(dropped[0].detail, { reason: "bad-json", count: 5 });
    // A refused task is an event, with the robot's reason.
    const task = await t.fleet.createTask("robot-001", {
      command: ["rm", "-rf", "/"],
      env: {},
      timeoutSeconds: 5,
    });
    const refusal = new TextEncoder().encode(JSON.stringify({
      v: 1,
      type: "task-status",
      robotId: "robot-001",
      ts: new Date(NOW).toISOString(),
      taskId: task.id,
      state: "refused",
      error: "rm is not in tasks.allow",
    }));
    assert.ok((await t.fleet.handleMessage("k8s4r/robots/robot-001/up/task", refusal)).ok);
    const refused = t.obs.events.recent().filter((e) => e.kind === "task-refused");
    assert.equal(refused.length, 1);
    assert.equal(refused[0].text, `robot-001 refused task ${task.id}: rm is not in tasks.allow`);
    // Without a session or certificate: no stream.
    assert.equal((await t.call("GET", "/api/events/stream")).status, 401);
  } finally {
    t.obs.close();
    await t.registry.close();
  }
});

/** Reads an SSE body until `until(text)` or its end; `done` says whether it ended. */
async function readStream(res: Response, until: (text: string) => boolean = () => false) {
  const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  let done = false;
  let error: unknown;
  try {
    while (!until(text)) {
      const r = await reader.read();
      if (r.done) {
        done = true;
        break;
      }
      text += r.value;
    }
  } catch (err) {
    done = true;
    error = err;
  }
  return { text, done, error, cancel: () => reader.cancel().catch(() => {}) };
}

function online(fleet: FleetService, robotId: string, status: "online" | "offline", ts: number) {
  return fleet.handleMessage(
    `k8s4r/robots/${robotId}/up/status`,
    new TextEncoder().encode(JSON.stringify({
      v: 1,
      type: "status",
      robotId,
      ts: new Date(ts).toISOString(),
      status,
      ...(status === "offline" ? { reason: "x".repeat(200) } : {}),
    })),
  );
}

Deno.test("dashboard: a link preview of the login URL gets nothing; racing its button gives one session", async () => {
  const t = setup();
  try {
    const r = await t.call("POST", "/api/dashboard/login", { cert: t.web.admin, body: "{}" });
    const { path, id } = await r.json();
    const state = async (cert = t.web.admin) =>
      (await (await t.call("GET", `/api/dashboard/logins/${id}`, { cert })).json()).state;
    assert.equal(await state(), "pending");
    // A preview bot or a prefetch fetches the URL, as often as it likes: no cookie, still unused.
    for (let i = 0; i < 3; i++) {
      const look = await t.call("GET", path);
      assert.equal(look.status, 200);
      assert.equal(look.headers.get("set-cookie"), null);
    }
    assert.equal(await state(), "pending");
    // The button's POST without an Origin (not from a browser's form) is refused.
    const noOrigin = await t.call("POST", "/dashboard/login", {
      body: `token=${new URL(path, "https://localhost").searchParams.get("token")}`,
      headers: { "content-type": "application/x-www-form-urlencoded" },
    });
    assert.equal(noOrigin.status, 403);
    const foreign = await t.confirm(path, { origin: "https://evil.example" });
    assert.equal(foreign.status, 403);
    assert.equal(await state(), "pending");
    // Twenty browsers race with the one token: exactly one session.
    const all = await Promise.all(Array.from({ length: 20 }, () => t.confirm(path)));
    const won = all.filter((x) => x.status === 303);
    assert.equal(won.length, 1, all.map((x) => x.status).join(","));
    assert.deepEqual(
      [...new Set(all.filter((x) => x.status !== 303).map((x) => x.status))],
      [401],
    );
    assert.equal(t.sessions.size.sessions, 1);
    assert.equal(await state(), "used");
    // The state is the asking certificate's only, and never for a browser session.
    assert.equal(await state(t.viewer), "unknown");
    const s = /__Host-k8s4r_session=([^;]+)/.exec(won[0].headers.get("set-cookie")!)![1];
    const bySession = await t.call("GET", `/api/dashboard/logins/${id}`, { cookie: s });
    assert.equal(bySession.status, 403);
  } finally {
    t.obs.close();
    await t.registry.close();
  }
});

Deno.test("events: an open stream ends at logout, at the session's end, and when the role goes", async () => {
  const t = setup({ streamRecheckMs: 10 });
  try {
    const open = async (o: { cookie?: string; cert?: IssuedCert }) => {
      const res = await t.call("GET", "/api/events/stream", o);
      assert.equal(res.status, 200);
      return res;
    };
    // Positive control: a stream whose certificate and role stay fine stays open throughout.
    const kept = await open({ cert: t.web.admin });
    // A stream that should end but does not would hang the test: fail it after 20 s instead
    // (a bound on a hang, not on speed: the recheck runs every 10 ms here).
    const ended = async (res: Response) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const read = readStream(res);
      const r = await Promise.race([
        read,
        new Promise<{ done: false; text: string; cancel: () => Promise<void> }>((resolve) => {
          timer = setTimeout(
            () => resolve({ done: false, text: "", cancel: () => Promise.resolve() }),
            20_000,
          );
        }),
      ]);
      clearTimeout(timer);
      if (!r.done) await res.body?.cancel().catch(() => {});
      return r;
    };

    const a = await t.login(t.viewer);
    const aStream = ended(await open({ cookie: a.id }));
    const out = await t.call("POST", "/dashboard/logout", {
      cookie: a.id,
      headers: { origin: "https://localhost" },
    });
    assert.equal(out.status, 204);
    assert.equal((await aStream).done, true, "logout ends the stream");

    const b = await t.login(t.viewer);
    const bStream = ended(await open({ cookie: b.id }));
    t.roles.ops.delete("vera");
    assert.equal((await bStream).done, true, "operator remove ends the stream");
    t.roles.ops.set("vera", "viewer");

    const c = await t.login(t.viewer);
    const cStream = ended(await open({ cookie: c.id }));
    t.clock.t += 8 * 3600_000 + 1;
    assert.equal((await cStream).done, true, "the session's end ends the stream");
    t.clock.t = NOW;

    // A certificate's stream: its role removed, it ends too.
    const d = ended(await open({ cert: t.viewer }));
    t.roles.ops.delete("vera");
    assert.equal((await d).done, true, "a certificate stream ends with its role");

    // The control: the admin's stream lived through all of it, and still gets events.
    await register(t.fleet, "robot-001");
    const k = await readStream(kept, (x) => x.includes('"kind":"online"'));
    assert.equal(k.done, false, k.text);
    await k.cancel();
  } finally {
    t.obs.close();
    await t.registry.close();
  }
});

Deno.test("events: a reader that does not keep up is cut off, not buffered without bound", async () => {
  // (A robot's own events are rate-limited, events_test.ts: not this test's subject.)
  const t = setup(
    { maxStreamBufferBytes: 16 * 1024, maxStreams: 2 },
    new FleetEvents({ robotBurst: 1_000 }),
  );
  try {
    await register(t.fleet, "robot-001");
    const s = await t.login(t.viewer);
    // Positive control: a reader that reads gets every event of the same flood.
    const reading = await t.call("GET", "/api/events/stream", { cookie: s.id });
    assert.equal(reading.status, 200);
    const got = readStream(reading, (x) => (x.match(/"kind":"offline"/g) ?? []).length >= 100);
    // The slow one never reads.
    const slow = await t.call("GET", "/api/events/stream", { cookie: s.id });
    assert.equal(slow.status, 200);
    assert.equal(t.obs.events.subscribers, 2);
    for (let i = 0; i < 100; i++) {
      assert.ok((await online(t.fleet, "robot-001", "online", NOW + 2 * i + 1)).ok);
      assert.ok((await online(t.fleet, "robot-001", "offline", NOW + 2 * i + 2)).ok);
    }
    const fast = await got;
    assert.equal(fast.done, false, "the reading client is still connected");
    await fast.cancel();
    // ~200 frames of ~450 bytes: far over 16 KiB unread. The slow stream was dropped, its
    // subscription and its slot given back (a new stream opens with maxStreams 2).
    assert.equal(t.obs.events.subscribers, 0);
    const cut = await readStream(slow);
    assert.equal(cut.done, true);
    assert.ok(cut.text.length <= 16 * 1024 + 1024, `${cut.text.length} bytes were held`);
    const again = await t.call("GET", "/api/events/stream", { cookie: s.id });
    assert.equal(again.status, 200);
    await again.body!.cancel();
  } finally {
    t.obs.close();
    await t.registry.close();
  }
});

Deno.test("events: one operator cannot hold every stream", async () => {
  const t = setup({ maxStreamsPerOperator: 2, maxStreams: 3 });
  try {
    const v = await t.login(t.viewer);
    const a = await t.login(t.web.admin);
    const get = (cookie: string) => t.call("GET", "/api/events/stream", { cookie });
    const one = await get(v.id);
    const two = await get(v.id);
    assert.equal(one.status, 200);
    assert.equal(two.status, 200);
    const three = await get(v.id);
    assert.equal(three.status, 503);
    assert.match((await three.json()).error, /too many event streams open for vera \(2\)/);
    // Another operator still gets one (the control), and vera again once she closed one.
    const admin = await get(a.id);
    assert.equal(admin.status, 200);
    await one.body!.cancel();
    const four = await get(v.id);
    assert.equal(four.status, 200);
    for (const r of [two, admin, four]) await r.body!.cancel();
  } finally {
    t.obs.close();
    await t.registry.close();
  }
});

Deno.test("API answers are never cached: JSON, errors, /metrics, the event stream", async () => {
  const t = setup();
  try {
    await register(t.fleet, "robot-001");
    const s = await t.login(t.web.admin);
    for (
      const [path, o, status] of [
        ["/api/robots", { cookie: s.id }, 200],
        ["/api/robots/robot-001", { cert: t.web.admin }, 200],
        ["/api/tasks", { cookie: s.id }, 200],
        ["/api/robots/robot-404", { cookie: s.id }, 404],
        ["/api/robots", {}, 401],
        ["/metrics", { cert: t.viewer }, 200],
      ] as const
    ) {
      const r = await t.call("GET", path, o);
      assert.equal(r.status, status, path);
      assert.equal(r.headers.get("cache-control"), "no-store", path);
      assert.equal(r.headers.get("x-content-type-options"), "nosniff", path);
      await r.body?.cancel();
    }
    const es = await t.call("GET", "/api/events/stream", { cookie: s.id });
    assert.equal(es.headers.get("cache-control"), "no-store");
    await es.body!.cancel();
  } finally {
    t.obs.close();
    await t.registry.close();
  }
});

Deno.test("/metrics: the scrape role reads the metrics page and nothing else (no task env, no output)", async () => {
  const t = setup();
  try {
    await register(t.fleet, "robot-001");
    const task = await t.fleet.createTask("robot-001", {
      command: ["deploy"],
      env: { API_TOKEN: "s3cret" },
      timeoutSeconds: 5,
    });
    t.roles.ops.set("prometheus", "metrics");
    const prom = t.web.operator("prometheus");
    const metrics = await t.call("GET", "/metrics", { cert: prom });
    assert.equal(metrics.status, 200);
    assert.doesNotMatch(await metrics.text(), /s3cret/);
    for (
      const path of [
        "/api/tasks",
        `/api/tasks/${task.id}`,
        "/api/robots",
        "/api/robots/robot-001/tasks",
        "/api/events",
        "/api/events/stream",
      ]
    ) {
      const r = await t.call("GET", path, { cert: prom });
      assert.equal(r.status, 403, path);
      const body = await r.text();
      assert.doesNotMatch(body, /s3cret/, path);
      assert.equal(JSON.parse(body).code, "forbidden", path);
    }
    const login = await t.call("POST", "/api/dashboard/login", { cert: prom, body: "{}" });
    assert.equal(login.status, 403, "no dashboard session for the scrape credential");
    // The control: a viewer reads the same task, env included (reading is what it is for).
    const v = await t.call("GET", `/api/tasks/${task.id}`, { cert: t.viewer });
    assert.equal(v.status, 200);
    assert.equal((await v.json()).env.API_TOKEN, "s3cret");
  } finally {
    t.obs.close();
    await t.registry.close();
  }
});

Deno.test("dashboard: a session begun with a certificate that was re-issued since (issuedAfter) is refused; a new login works", async () => {
  const t = setup();
  try {
    const old = await t.login(t.viewer);
    // The control: the session reads as vera.
    assert.equal((await t.call("GET", "/api/robots", { cookie: old.id })).status, 200);
    // `operator login vera` re-issued her certificate: the old one, and what it began, stop.
    const notBefore = t.viewer.certificate.validFromDate.getTime();
    t.roles.issuedAfter.set("vera", new Date(notBefore + 1000));
    const r = await t.call("GET", "/api/robots", { cookie: old.id });
    assert.equal(r.status, 403);
    assert.equal((await r.json()).code, "superseded-certificate");
    const fresh = t.web.ca.issue({
      spiffeId: `spiffe://${t.web.trustDomain}/operator/vera`,
      notBefore: new Date(notBefore + 1000),
      notAfter: new Date(notBefore + 3_600_000),
    });
    const again = await t.login(fresh);
    assert.equal((await t.call("GET", "/api/robots", { cookie: again.id })).status, 200);
  } finally {
    t.obs.close();
    await t.registry.close();
  }
});
