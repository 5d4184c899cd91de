/**
 * The HTTP API's rules, one by one, through the real handler (no network: the client chain is
 * what TLS would hand over). Every refusal has its positive control: the same request with the
 * one thing fixed succeeds.
 */
import assert from "node:assert/strict";
import type { X509Certificate } from "node:crypto";
import { decodeDown } from "../mqtt/messages.ts";
import { TestCa } from "../spiffe/testing/test_ca.ts";
import { FleetService, type Publisher } from "./fleet.ts";
import { allowedHostNames, identify, type VerifiedConnection } from "./auth.ts";
import { parseAuthority } from "../fleet/addresses.ts";
import { createHandler, decodeCursor, encodeCursor } from "./http_api.ts";
import { openSqliteFile } from "./registry_sqlite.ts";
import { type Role, type RolesSource, type RolesState, staticRoles } from "./roles.ts";
import { TestHttps, UNSIGNED } from "./testing.ts";
import { exposureWarning } from "./command.ts";

class Pub implements Publisher {
  sent: string[] = [];
  publish(topic: string, payload: Uint8Array) {
    const d = decodeDown(topic, payload);
    if (!d.ok) throw new Error(d.error);
    this.sent.push(topic);
    return Promise.resolve();
  }
  connected() {
    return true;
  }
}

async function setup(roleMap: Record<string, Role> = { admin: "operator", vera: "viewer" }) {
  const registry = openSqliteFile(":memory:");
  const pub = new Pub();
  let n = 0;
  const fleet = new FleetService(registry, pub, { newId: () => `t${++n}`, signer: UNSIGNED });
  await registry.touchRobot("robot-001", new Date().toISOString());
  await registry.setOnline("robot-001", false, "test"); // tasks stay pending: cancel withdraws them
  const web = new TestHttps();
  let roles: RolesSource = staticRoles(roleMap);
  const handler = createHandler({
    fleet,
    mqttConnected: () => true,
    auth: {
      trustDomain: web.trustDomain,
      bundles: web.source,
      roles: { current: () => roles.current() },
    },
    hosts: { port: 8090, names: () => new Set(["localhost", "127.0.0.1", "[::1]"]) },
  });
  const req = async (
    method: string,
    path: string,
    opts: {
      chain?: X509Certificate[] | null;
      host?: string | null;
      origin?: string;
      contentType?: string | null;
      body?: string;
    } = {},
  ) => {
    const headers = new Headers();
    if (opts.host !== null) headers.set("host", opts.host ?? "localhost:8090");
    if (opts.origin !== undefined) headers.set("origin", opts.origin);
    const body = opts.body ?? (method === "POST" ? '{"command":["true"]}' : undefined);
    if (opts.contentType !== null && body !== undefined) {
      headers.set("content-type", opts.contentType ?? "application/json");
    }
    const chain = opts.chain === null ? undefined : opts.chain ?? web.admin.certificates;
    const res = await handler(
      new Request(`https://localhost:8090${path}`, { method, headers, body }),
      {
        peerChain: chain,
      },
    );
    return { status: res.status, json: await res.json(), type: res.headers.get("content-type") };
  };
  const setRoles = (r: RolesSource) => (roles = r);
  return { fleet, registry, web, req, handler, setRoles, pub };
}

const CREATE = "/api/robots/robot-001/tasks";

Deno.test("auth: no certificate, foreign CA, expired: 401 JSON; the admin's certificate: 200", async () => {
  const { req, web, handler } = await setup();
  const ok = await req("GET", "/api/robots");
  assert.equal(ok.status, 200, JSON.stringify(ok.json));
  const none = await req("GET", "/api/robots", { chain: null });
  assert.equal(none.status, 401);
  assert.equal(none.json.code, "no-certificate");
  assert.match(none.type ?? "", /application\/json/);
  assert.match(none.json.error, /operator X\.509 SVID/);
  // Same trust domain name, another CA: not under the bundle.
  const foreign = TestCa.create({ trustDomain: web.trustDomain }).issue({
    spiffeId: `spiffe://${web.trustDomain}/operator/admin`,
  });
  const f = await req("GET", "/api/robots", { chain: foreign.certificates });
  assert.equal(f.status, 401);
  assert.equal(f.json.code, "untrusted-certificate");
  assert.match(f.json.error, /not issued under the X\.509 bundle/);
  const expired = web.ca.issueExpired({ spiffeId: `spiffe://${web.trustDomain}/operator/admin` });
  const e = await req("GET", "/api/robots", { chain: expired.certificates });
  assert.equal(e.status, 401);
  assert.match(e.json.error, /expired at/);
  // Another trust domain (no bundle for it).
  const other = TestCa.create({ trustDomain: "evil.test" }).issue({
    spiffeId: "spiffe://evil.test/operator/admin",
  });
  const o = await req("GET", "/api/robots", { chain: other.certificates });
  assert.equal(o.status, 401);
  assert.match(o.json.error, /no X\.509 bundle for trust domain "evil\.test"/);
  // A CA certificate as the leaf.
  const ca = web.ca.issue({ spiffeId: `spiffe://${web.trustDomain}/operator/admin`, isCa: true });
  assert.equal((await req("GET", "/api/robots", { chain: ca.certificates })).status, 401);
  assert.equal(handler.refusals["no-certificate"], 1);
  assert.equal(handler.refusals["untrusted-certificate"], 4);
  // /healthz needs no certificate.
  assert.equal((await req("GET", "/healthz", { chain: null })).status, 200);
});

Deno.test("auth: a robot's SVID is not an operator (403); roles deny by default", async () => {
  const { req, web, setRoles } = await setup();
  const robot = web.ca.issue({
    spiffeId: `spiffe://${web.trustDomain}/robot/robot-001`,
    dnsNames: ["robot-001"],
  });
  const r = await req("GET", "/api/robots", { chain: robot.certificates });
  assert.equal(r.status, 403);
  assert.equal(r.json.code, "not-an-operator");
  assert.match(r.json.error, /robot\/robot-001 is not an operator/);
  for (const path of ["/fleet-server", "/operator/admin/x", "/operators/admin"]) {
    const c = web.ca.issue({ spiffeId: `spiffe://${web.trustDomain}${path}` });
    assert.equal((await req("GET", "/api/robots", { chain: c.certificates })).status, 403, path);
  }
  // An operator with a valid certificate but no role.
  const carol = web.operator("carol");
  const c = await req("GET", "/api/robots", { chain: carol.certificates });
  assert.equal(c.status, 403);
  assert.equal(c.json.code, "no-role");
  // Positive control: once it has a role, the same certificate works (no restart).
  setRoles(staticRoles({ admin: "operator", carol: "viewer" }));
  assert.equal((await req("GET", "/api/robots", { chain: carol.certificates })).status, 200);
  // A broken roles file: nobody, 503.
  const broken: RolesState = { ok: false, error: "roles.yaml:3: operators.x: expected a role" };
  setRoles({ current: () => broken });
  const b = await req("GET", "/api/robots");
  assert.equal(b.status, 503);
  assert.equal(b.json.code, "roles-unavailable");
  assert.match(b.json.error, /roles\.yaml:3/);
});

Deno.test("auth: a viewer reads but cannot create or cancel; an operator can", async () => {
  const { req, web, registry } = await setup();
  const vera = web.operator("vera");
  assert.equal((await req("GET", "/api/robots", { chain: vera.certificates })).status, 200);
  assert.equal((await req("GET", "/api/tasks", { chain: vera.certificates })).status, 200);
  const who = await req("GET", "/api/whoami", { chain: vera.certificates });
  assert.deepEqual(who.json, {
    spiffeId: `spiffe://${web.trustDomain}/operator/vera`,
    operator: "vera",
    role: "viewer",
    via: "certificate",
  });
  const create = await req("POST", CREATE, { chain: vera.certificates });
  assert.equal(create.status, 403);
  assert.equal(create.json.code, "forbidden");
  assert.match(
    create.json.error,
    /vera is a viewer: creating and cancelling tasks needs the operator role/,
  );
  assert.equal(
    (await registry.listTasksPage({ limit: 10 })).length,
    0,
    "a refused create left a task",
  );
  // Positive control: the operator creates it, and is recorded as its creator.
  const made = await req("POST", CREATE);
  assert.equal(made.status, 201);
  assert.equal(made.json.createdBy, `spiffe://${web.trustDomain}/operator/admin`);
  const view = await req("GET", `/api/tasks/${made.json.id}`, { chain: vera.certificates });
  assert.equal(view.json.createdBy, `spiffe://${web.trustDomain}/operator/admin`);
  const cancel = await req("POST", `/api/tasks/${made.json.id}/cancel`, {
    chain: vera.certificates,
    body: "{}",
  });
  assert.equal(cancel.status, 403);
  assert.equal((await registry.getTask(made.json.id))!.state, "pending");
  const c2 = await req("POST", `/api/tasks/${made.json.id}/cancel`, { body: "{}" });
  assert.equal(c2.status, 202);
  assert.equal(c2.json.outcome, "withdrawn");
  assert.equal(c2.json.state, "cancelled");
  const again = await req("POST", `/api/tasks/${made.json.id}/cancel`, { body: "" });
  assert.equal(again.status, 409);
  assert.match(again.json.error, /already cancelled/);
  assert.equal((await req("POST", "/api/tasks/nope/cancel", { body: "{}" })).status, 404);
  assert.equal((await req("GET", `/api/tasks/${made.json.id}/cancel`)).status, 405);
  const extra = await req("POST", `/api/tasks/${made.json.id}/cancel`, { body: '{"force":1}' });
  assert.equal(extra.status, 400);
  const t = (await req("GET", `/api/tasks/${made.json.id}`)).json;
  assert.equal(t.cancelRequestedBy, `spiffe://${web.trustDomain}/operator/admin`);
});

Deno.test("Host and Origin: only this server's; CSRF-shaped requests are refused", async () => {
  const { req, registry, handler } = await setup();
  // Positive controls: every name of this server, with and without a same-origin Origin.
  for (const host of ["localhost:8090", "127.0.0.1:8090", "[::1]:8090", "LOCALHOST:8090"]) {
    assert.equal((await req("GET", "/api/robots", { host })).status, 200, host);
  }
  assert.equal((await req("POST", CREATE, { origin: "https://localhost:8090" })).status, 201);
  // DNS rebinding: a page of evil.example re-pointed at 127.0.0.1.
  for (const host of ["evil.example:8090", "localhost:8091", "localhost", "localhost:8090@x", ""]) {
    const r = await req("GET", "/api/robots", { host });
    assert.equal(r.status, 403, host);
    assert.equal(r.json.code, "bad-host", host);
  }
  assert.equal(
    (await req("GET", "/healthz", { host: "evil.example:8090", chain: null })).status,
    403,
  );
  const missing = await req("GET", "/api/robots", { host: null });
  assert.equal(missing.status, 403);
  // Cross-origin: another site, another scheme, another port, an opaque origin.
  for (
    const origin of [
      "https://evil.example",
      "http://localhost:8090",
      "https://localhost:8443",
      "null",
    ]
  ) {
    const r = await req("POST", CREATE, { origin });
    assert.equal(r.status, 403, origin);
    assert.equal(r.json.code, "bad-origin", origin);
  }
  // Mutating requests must be JSON (a form or text/plain needs no CORS preflight).
  for (
    const ct of [
      "text/plain",
      "application/x-www-form-urlencoded",
      "multipart/form-data; boundary=x",
      null,
    ]
  ) {
    const r = await req("POST", CREATE, { contentType: ct });
    assert.equal(r.status, 415, String(ct));
    assert.equal(r.json.code, "unsupported-media-type");
  }
  assert.equal(
    (await req("POST", CREATE, { contentType: "Application/JSON; charset=utf-8" })).status,
    201,
  );
  // The CSRF shape of issue 11: text/plain, foreign Origin and Host. Refused, nothing created.
  const before = (await registry.listTasksPage({ limit: 100 })).length;
  const csrf = await req("POST", CREATE, {
    host: "evil.example",
    origin: "https://evil.example",
    contentType: "text/plain",
  });
  assert.equal(csrf.status, 403);
  assert.equal((await registry.listTasksPage({ limit: 100 })).length, before);
  assert.ok(handler.refusals["bad-host"] >= 6);
  assert.equal(handler.refusals["bad-origin"], 4);
  assert.equal(handler.refusals["unsupported-media-type"], 4);
  const stats = await req("GET", "/api/stats");
  assert.equal(stats.json.http.refused["bad-origin"], 4);
});

Deno.test("paging: cursors walk every task once, newest first; bad parameters are 400", async () => {
  const { req, fleet } = await setup();
  for (let i = 0; i < 7; i++) {
    await fleet.createTask(
      "robot-001",
      { command: ["echo", String(i)], env: {}, timeoutSeconds: 5 },
      "x",
    );
  }
  const seen: string[] = [];
  let cursor = "";
  let pages = 0;
  do {
    const r = await req("GET", `/api/tasks?limit=3${cursor ? `&cursor=${cursor}` : ""}`);
    assert.equal(r.status, 200, JSON.stringify(r.json));
    seen.push(...r.json.tasks.map((t: { id: string }) => t.id));
    cursor = r.json.nextCursor ?? "";
    pages++;
    if (pages === 1) {
      await fleet.createTask("robot-001", { command: ["late"], env: {}, timeoutSeconds: 5 });
    }
  } while (cursor);
  assert.equal(pages, 3);
  assert.deepEqual(seen.sort(), ["t1", "t2", "t3", "t4", "t5", "t6", "t7"]);
  const robot = await req("GET", "/api/robots/robot-001/tasks?limit=1000");
  assert.equal(robot.json.tasks.length, 8, "the 100-row cap is gone; 8 here");
  assert.equal(robot.json.nextCursor, null);
  assert.equal((await req("GET", "/api/tasks?state=pending&robot=robot-001")).json.tasks.length, 8);
  assert.equal((await req("GET", "/api/tasks?state=done")).json.tasks.length, 0);
  const bad: [string, RegExp][] = [
    ["/api/tasks?limit=0", /limit: expected an integer in \[1, 1000\], got "0"/],
    ["/api/tasks?limit=1001", /limit/],
    ["/api/tasks?limit=x", /limit/],
    ["/api/tasks?state=lost", /state: expected one of pending, dispatched/],
    ["/api/tasks?robot=Robot_1", /robot: expected a robot id/],
    ["/api/tasks?cursor=abc", /cursor: expected a nextCursor from a previous page/],
    ["/api/tasks?colour=red", /colour: unknown query parameter/],
    ["/api/robots/robot-001/tasks?robot=robot-002", /differs from the robot of the path/],
  ];
  for (const [path, re] of bad) {
    const r = await req("GET", path);
    assert.equal(r.status, 400, path);
    assert.match(r.json.error, re, path);
  }
  const c = encodeCursor({ createdAt: "2025-01-01T00:00:00.000Z", id: "t1" });
  assert.deepEqual(decodeCursor(c), { createdAt: "2025-01-01T00:00:00.000Z", id: "t1" });
});

Deno.test("allowed hosts: loopback names, the bound address, every address when wildcard", () => {
  assert.deepEqual(
    [...allowedHostNames("127.0.0.1", ["localhost"])].sort(),
    ["127.0.0.1", "[::1]", "localhost"],
  );
  assert.deepEqual(
    [...allowedHostNames("10.0.0.5", ["fleet.example"])].sort(),
    ["10.0.0.5", "fleet.example"],
  );
  const wild = allowedHostNames("0.0.0.0", ["Fleet.Example"], ["10.0.0.5", "fe80::1"]);
  for (const n of ["localhost", "127.0.0.1", "10.0.0.5", "[fe80::1]", "fleet.example"]) {
    assert.ok(wild.has(n), n);
  }
  assert.ok(!wild.has("evil.example"));
  assert.deepEqual(parseAuthority("[::1]:8090", 443), { name: "[::1]", port: 8090 });
  assert.deepEqual(parseAuthority("localhost.", 443), { name: "localhost", port: 443 });
  assert.equal(parseAuthority("a b", 443), undefined);
  assert.equal(parseAuthority("x:99999", 443), undefined);
});

Deno.test("--http-addr warning: silent on loopback, names what is exposed otherwise", () => {
  assert.equal(exposureWarning({ hostname: "127.0.0.1", port: 8090 }), undefined);
  assert.equal(exposureWarning({ hostname: "::1", port: 8090 }), undefined);
  const w = exposureWarning({ hostname: "0.0.0.0", port: 8090 })!;
  assert.match(w, /not a loopback address/);
  assert.match(w, /every address of this machine/);
  assert.match(w, /\/healthz/);
  assert.match(w, /task creation/);
  assert.match(exposureWarning({ hostname: "10.0.0.5", port: 9 })!, /exposed on 10\.0\.0\.5:9/);
});

Deno.test("a connection's verification is reused only while the bundle and validity hold", () => {
  const web = new TestHttps();
  const roles = staticRoles({ admin: "operator" });
  let now = new Date();
  const policy = {
    trustDomain: web.trustDomain,
    bundles: web.source,
    roles,
    now: () => now,
  };
  const short = web.operator("admin", { ttlSeconds: 60 });
  const conn: VerifiedConnection = {};
  const first = identify(short.certificates, policy, conn);
  assert.ok(first.ok);
  assert.ok(conn.verified, "nothing kept for the connection");
  assert.equal(conn.verified.until, short.certificate.validToDate.getTime());
  assert.ok(identify(short.certificates, policy, conn).ok, "reused");
  // Past the certificate's notAfter: verified again, and refused.
  now = new Date(Date.now() + 120_000);
  const late = identify(short.certificates, policy, conn);
  assert.ok(!late.ok && late.refusal.status === 401 && /expired at/.test(late.refusal.error));
  // A new bundle (CA rotation that drops the old CA): the same connection is verified again.
  now = new Date();
  const conn2: typeof conn = {};
  assert.ok(identify(short.certificates, policy, conn2).ok);
  web.rotateCa(TestCa.create({ trustDomain: web.trustDomain }));
  const after = identify(short.certificates, policy, conn2);
  assert.ok(!after.ok && after.refusal.code === "untrusted-certificate");
  web.close();
});

Deno.test("refusals are logged once per reason per 10 s, and all counted", async () => {
  const registry = openSqliteFile(":memory:");
  const fleet = new FleetService(registry, new Pub(), { signer: UNSIGNED });
  const web = new TestHttps();
  const lines: string[] = [];
  const handler = createHandler({
    fleet,
    mqttConnected: () => true,
    auth: { trustDomain: web.trustDomain, bundles: web.source, roles: staticRoles({}) },
    hosts: { port: 8090, names: () => new Set(["localhost"]) },
    logger: { info: () => {}, warn: (m) => lines.push(m) },
  });
  for (let i = 0; i < 50; i++) {
    const r = await handler(
      new Request("https://localhost:8090/api/robots", { headers: { host: "localhost:8090" } }),
      {},
    );
    assert.equal(r.status, 401);
    await r.body?.cancel();
  }
  assert.equal(handler.refusals["no-certificate"], 50);
  assert.equal(lines.length, 1, lines.join("\n"));
  assert.match(lines[0], /refused GET \/api\/robots: no-certificate/);
  await registry.close();
  web.close();
});
