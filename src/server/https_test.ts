/**
 * The HTTPS listener over real TLS (node:https in Deno, a test CA standing in for SPIRE):
 * client certificates reach the API as a verified chain or not at all, and the server's
 * certificate and the trusted bundle follow rotation without a restart.
 */
import assert from "node:assert/strict";
import net from "node:net";
import tls from "node:tls";
import type { X509Certificate } from "node:crypto";
import { encodePem } from "../spiffe/pem.ts";
import { mutuallyIssuingChain, TestCa, watchSignatureChecks } from "../spiffe/testing/test_ca.ts";
import { FleetService, type Publisher } from "./fleet.ts";
import { allowedHostNames } from "./auth.ts";
import { createHandler } from "./http_api.ts";
import { DEFAULT_MAX_CONNECTIONS, serveHttps, svidServerTls } from "./https.ts";
import { waitFor } from "../process/mod.ts";
import { openSqliteFile } from "./registry_sqlite.ts";
import { RolesFile, type RolesSource, setOperatorRole, staticRoles } from "./roles.ts";
import { TestHttps, UNSIGNED } from "./testing.ts";

const pub: Publisher = { publish: () => Promise.resolve(), connected: () => true };

async function serve(
  web: TestHttps,
  extra: { maxConnections?: number; roles?: RolesSource } = {},
) {
  const registry = openSqliteFile(":memory:");
  const fleet = new FleetService(registry, pub, { signer: UNSIGNED });
  let port = 0;
  const handler = createHandler({
    fleet,
    mqttConnected: () => true,
    auth: {
      trustDomain: web.trustDomain,
      bundles: web.source,
      roles: extra.roles ?? staticRoles({ admin: "operator" }),
    },
    hosts: {
      get port() {
        return port;
      },
      names: () => allowedHostNames("127.0.0.1", web.source.getX509Svid().dnsNames),
    },
  });
  const api = await serveHttps(handler, {
    hostname: "127.0.0.1",
    port: 0,
    tls: svidServerTls(web.source),
    urlHost: "localhost",
    maxConnections: extra.maxConnections,
  });
  port = api.addr.port;
  return {
    api,
    async close() {
      await api.close();
      await registry.close();
      web.close();
    },
  };
}

/** The serial of the certificate a fresh TLS connection gets. */
function servedSerial(port: number, ca: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = tls.connect({ host: "127.0.0.1", port, servername: "localhost", ca }, () => {
      const s = c.getPeerCertificate().serialNumber;
      c.end();
      resolve(s);
    });
    c.on("error", reject);
  });
}

Deno.test("HTTPS: an operator certificate gets 200; none or a foreign CA gets 401 JSON", async () => {
  const web = new TestHttps();
  const s = await serve(web);
  try {
    const ok = await web.json(`${s.api.url}/api/whoami`);
    assert.equal(ok.status, 200);
    assert.equal(ok.body.operator, "admin");
    const none = await web.json(`${s.api.url}/api/robots`, {}, null);
    assert.equal(none.status, 401);
    assert.equal(none.body.code, "no-certificate");
    const foreign = TestCa.create({ trustDomain: web.trustDomain }).issue({
      spiffeId: `spiffe://${web.trustDomain}/operator/admin`,
    });
    const f = await web.json(`${s.api.url}/api/robots`, {}, foreign);
    assert.equal(f.status, 401);
    assert.equal(f.body.code, "untrusted-certificate");
    // /healthz is for everyone (load balancers, probes).
    assert.equal((await web.json(`${s.api.url}/healthz`, {}, null)).status, 200);
    // The URL's name is in the certificate: TLS clients verify it as usual.
    assert.match(s.api.url, /^https:\/\/localhost:\d+$/);
  } finally {
    await s.close();
  }
});

Deno.test("HTTPS: the server's SVID and the bundle rotate without a restart", async () => {
  const web = new TestHttps();
  const s = await serve(web);
  try {
    const port = s.api.addr.port;
    const first = await servedSerial(port, web.ca.rootPem);
    assert.equal(
      first.replace(/^0+/, ""),
      web.source.getX509Svid().serialNumber.toUpperCase().replace(/^0+/, ""),
    );
    // A keep-alive connection opened before the rotation.
    const before = web.client();
    assert.equal((await fetch(`${s.api.url}/api/whoami`, { client: before })).status, 200);

    web.rotate();
    const second = await servedSerial(port, web.ca.rootPem);
    assert.notEqual(second, first, "the new SVID is not served");
    assert.equal(
      second.replace(/^0+/, ""),
      web.source.getX509Svid().serialNumber.toUpperCase().replace(/^0+/, ""),
    );
    assert.equal(s.api.stats.contextUpdates, 1);
    // The API still answers, on old and new connections.
    assert.equal((await fetch(`${s.api.url}/api/whoami`, { client: before })).status, 200);
    assert.equal((await web.json(`${s.api.url}/api/whoami`)).status, 200);

    // CA rotation: the new bundle is trusted for clients at once, the old CA no longer.
    const oldAdmin = web.admin;
    const newCa = TestCa.create({ trustDomain: web.trustDomain });
    web.rotateCa(newCa);
    const third = await servedSerial(port, newCa.rootPem);
    assert.notEqual(third, second);
    const fresh = web.operator("admin");
    assert.equal((await web.json(`${s.api.url}/api/whoami`, {}, fresh)).status, 200);
    const stale = await web.json(`${s.api.url}/api/whoami`, {}, oldAdmin);
    assert.equal(stale.status, 401, "a certificate of the dropped CA still works");
    assert.equal(s.api.stats.contextUpdates, 2);
  } finally {
    await s.close();
  }
});

Deno.test("HTTPS: a request with a foreign Host over TLS is refused (DNS rebinding)", async () => {
  const web = new TestHttps();
  const s = await serve(web);
  try {
    const port = s.api.addr.port;
    // Raw TLS so the Host header can be anything.
    const ask = (host: string) =>
      new Promise<string>((resolve, reject) => {
        const c = tls.connect({
          host: "127.0.0.1",
          port,
          servername: "localhost",
          ca: web.ca.rootPem,
          cert: web.admin.chainPem,
          key: web.admin.keyPem,
        }, () => c.write(`GET /api/robots HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`));
        let out = "";
        c.on("data", (d) => (out += d));
        c.on("end", () => resolve(out));
        c.on("error", reject);
      });
    assert.match(await ask(`localhost:${port}`), /^HTTP\/1\.1 200/);
    const evil = await ask(`evil.example:${port}`);
    assert.match(evil, /^HTTP\/1\.1 403/);
    assert.match(evil, /"code": "bad-host"/);
  } finally {
    await s.close();
  }
});

Deno.test("HTTPS: connections are capped (idle TCP connections cannot exhaust the server); below the cap it serves (control)", async () => {
  assert.equal(DEFAULT_MAX_CONNECTIONS, 512);
  const web = new TestHttps();
  const s = await serve(web, { maxConnections: 3 });
  const idle: net.Socket[] = [];
  try {
    const closed = new Set<number>();
    // Connections that never even start TLS (a slow or hostile client), up to the cap and one more.
    for (let i = 0; i < 4; i++) {
      const c = net.connect(s.api.addr.port, "127.0.0.1");
      c.on("error", () => {});
      c.on("close", () => closed.add(i));
      await new Promise((r) => c.once("connect", r));
      idle.push(c);
    }
    await waitFor(() => closed.size > 0, {
      timeoutMs: 5000,
      intervalMs: 10,
      what: "the server to close the connection over its cap",
    });
    assert.deepEqual([...closed], [3], "not the one over the cap was closed");
    // The control: once one of them goes, a real request gets through.
    idle[0].destroy();
    await waitFor(() => closed.has(0), { timeoutMs: 5000, intervalMs: 10, what: "close" });
    assert.equal((await web.json(`${s.api.url}/healthz`, {}, null)).status, 200);
  } finally {
    for (const c of idle) c.destroy();
    await s.close();
  }
});

Deno.test("HTTPS: an operator's certificate issued before the one of its last add/login (issuedAfter) is refused (403); the new one works", async () => {
  const web = new TestHttps();
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-issued-after-" });
  const rolesFile = `${dir}/roles.yaml`;
  const s = await serve(web, { roles: new RolesFile(rolesFile) });
  try {
    const now = Date.now();
    const old = web.ca.issue({
      spiffeId: `spiffe://${web.trustDomain}/operator/alice`,
      notBefore: new Date(now - 3_600_000),
      notAfter: new Date(now + 3_600_000),
    });
    await setOperatorRole(rolesFile, "alice", "viewer");
    // The control: without an issuedAfter, the old certificate is alice's.
    assert.equal((await web.json(`${s.api.url}/api/robots`, {}, old)).status, 200);
    // `operator login alice` re-issued her SVID (say, the old key leaked): from now on only
    // certificates issued at or after the new one's notBefore are hers.
    const fresh = web.ca.issue({
      spiffeId: `spiffe://${web.trustDomain}/operator/alice`,
      notBefore: new Date(now - 1000),
      notAfter: new Date(now + 3_600_000),
    });
    await setOperatorRole(rolesFile, "alice", "viewer", {
      issuedAfter: new Date(fresh.certificate.validFromDate),
    });
    assert.match(await Deno.readTextFile(rolesFile), /alice:\n\s+role: viewer\n\s+issuedAfter: /);
    const refused = await web.json(`${s.api.url}/api/robots`, {}, old);
    assert.equal(refused.status, 403);
    assert.equal(refused.body.code, "superseded-certificate");
    assert.match(
      refused.body.error,
      /alice's certificate was issued at .*, before .*: use the credentials of the last 'k8s4r operator add\|login alice'/,
    );
    assert.equal((await web.json(`${s.api.url}/api/robots`, {}, fresh)).status, 200);
  } finally {
    await s.close();
    await Deno.remove(dir, { recursive: true });
  }
});

/** One GET over raw TLS presenting `chainPem` (leaf first, in the order given) and `keyPem`. */
function getWithChain(
  port: number,
  caPem: string,
  path: string,
  chainPem: string,
  keyPem: string,
): Promise<{ status: number; body: { code?: string; error?: string; operator?: string } }> {
  return new Promise((resolve, reject) => {
    const c = tls.connect(
      {
        host: "127.0.0.1",
        port,
        servername: "localhost",
        ca: caPem,
        cert: chainPem,
        key: keyPem,
      },
      () => c.write(`GET ${path} HTTP/1.1\r\nHost: localhost:${port}\r\nConnection: close\r\n\r\n`),
    );
    let out = "";
    c.on("data", (d) => (out += d));
    c.on("end", () => {
      const m = /^HTTP\/1\.1 (\d{3})/.exec(out);
      const body = out.slice(out.indexOf("\r\n\r\n") + 4);
      if (!m) {
        return reject(new Error(`not an HTTP response: ${JSON.stringify(out.slice(0, 200))}`));
      }
      try {
        resolve({ status: Number(m[1]), body: JSON.parse(body) });
      } catch {
        reject(new Error(`not JSON: ${JSON.stringify(body.slice(0, 200))}`));
      }
    });
    c.on("error", reject);
  });
}

const pemOf = (certs: X509Certificate[]) =>
  certs.map((c) => encodePem("CERTIFICATE", new Uint8Array(c.raw))).join("");

Deno.test("HTTPS: a client chain of 7 CAs that all issue each other is refused within 64 signature checks", async () => {
  const web = new TestHttps();
  const s = await serve(web);
  try {
    const port = s.api.addr.port;
    const id = `spiffe://${web.trustDomain}/operator/admin`;
    const hostile = mutuallyIssuingChain({ spiffeId: id, count: 7 });
    const watch = watchSignatureChecks();
    let r;
    try {
      r = await getWithChain(port, web.ca.rootPem, "/api/whoami", hostile.chainPem, hostile.keyPem);
    } finally {
      watch.stop();
    }
    assert.equal(r.status, 401, JSON.stringify(r.body));
    assert.equal(r.body.code, "untrusted-certificate");
    assert.match(r.body.error ?? "", /is not issued under the X\.509 bundle for "k8s4r\.test"/);
    assert.ok(watch.checks <= 64, `${watch.checks} signature checks`);
    // The same chain on a new connection: the same refusal, remembered (no signature check).
    const again = watchSignatureChecks();
    let r2;
    try {
      r2 = await getWithChain(
        port,
        web.ca.rootPem,
        "/api/whoami",
        hostile.chainPem,
        hostile.keyPem,
      );
    } finally {
      again.stop();
    }
    assert.equal(r2.status, 401);
    assert.equal(r2.body.error, r.body.error);
    assert.equal(again.checks, 0);

    // More certificates than any SVID chain has: refused before any signature check.
    const many = mutuallyIssuingChain({ spiffeId: id, count: 19 });
    const watch2 = watchSignatureChecks();
    try {
      r = await getWithChain(port, web.ca.rootPem, "/api/whoami", many.chainPem, many.keyPem);
    } finally {
      watch2.stop();
    }
    assert.equal(r.status, 401, JSON.stringify(r.body));
    assert.equal(r.body.code, "untrusted-certificate");
    assert.match(
      r.body.error ?? "",
      /^client certificate refused: a chain of more than 8 certificates \(the leaf and its intermediates\) is refused$/,
    );
    assert.equal(watch2.checks, 0);

    // Control: an operator's chain through 2 intermediates, sent in either order, is accepted;
    // so is the admin's certificate directly under the root.
    const op = web.ca.intermediate({ commonName: "i1" }).intermediate({ commonName: "i2" })
      .issue({ spiffeId: id });
    const [leaf, i2, i1] = op.certificates;
    for (const order of [[leaf, i2, i1], [leaf, i1, i2]]) {
      const ok = await getWithChain(port, web.ca.rootPem, "/api/whoami", pemOf(order), op.keyPem);
      assert.equal(ok.status, 200, JSON.stringify(ok.body));
      assert.equal(ok.body.operator, "admin");
    }
    const direct = await getWithChain(
      port,
      web.ca.rootPem,
      "/api/whoami",
      web.admin.chainPem,
      web.admin.keyPem,
    );
    assert.equal(direct.status, 200, JSON.stringify(direct.body));
  } finally {
    await s.close();
  }
});
