import assert from "node:assert/strict";
import { TestCa } from "../../spiffe/testing/test_ca.ts";
import type { FetchedSvid } from "../check.ts";
import { splitDer } from "../pki.ts";
import { dirChain, fakeContext, ROOT } from "../testing.ts";
import { spireAgentChecks, spireServerChecks } from "./spire.ts";

const all = [...spireServerChecks, ...spireAgentChecks];
const byId = (id: string) => all.find((c) => c.id === id)!;
const SOCK = "/tmp/spire-agent/agent.sock";
const SERVER_SOCK = `${ROOT}/.spire-data/server/api.sock`;

Deno.test("spire-server.port: held by spire-server passes, by another process fails with the pid", async () => {
  const owner = (comm: string) => ({
    listeningOwner: () => Promise.resolve({ address: "127.0.0.1", port: 8081, pid: 42, comm }),
  });
  const ok = await byId("spire-server.port").run(fakeContext({ net: owner("spire-server") }));
  assert.equal(ok.detail, "127.0.0.1:8081 held by spire-server (pid 42)");
  const bad = await byId("spire-server.port").run(fakeContext({ net: owner("nginx") }));
  assert.equal(bad.status, "fail");
  assert.equal(bad.detail, "127.0.0.1:8081 is held by nginx (pid 42), not spire-server");
  const none = await byId("spire-server.port").run(fakeContext());
  assert.equal(none.detail, "nothing listens on port 8081");
  assert.match(none.hint!, /cat \.dev-env\/spire-server\.log/);
});

Deno.test("spire-server.health: SERVING passes; NOT_SERVING and unreachable fail", async () => {
  const stats = { [SERVER_SOCK]: { isSocket: true } };
  const asked: string[] = [];
  const health = (status: string) => (p: string) => {
    asked.push(p);
    return Promise.resolve({ status });
  };
  assert.equal(
    (await byId("spire-server.health").run(
      fakeContext({ stats, spire: { health: health("SERVING") } }),
    )).status,
    "ok",
  );
  assert.deepEqual(asked, [SERVER_SOCK]);
  const r = await byId("spire-server.health").run(
    fakeContext({ stats, spire: { health: health("NOT_SERVING") } }),
  );
  assert.deepEqual([r.status, r.detail], ["fail", "spire-server reports NOT_SERVING"]);
  const gone = await byId("spire-server.health").run(fakeContext());
  assert.equal(gone.detail, `${SERVER_SOCK} does not exist`);
});

Deno.test("spire-server.log: recent errors warn and are shown; old ones do not", async () => {
  const now = Date.parse("2030-01-01T00:00:00Z");
  const log = [
    'time="2029-12-31T20:00:00Z" level=error msg="old trouble"',
    'time="2029-12-31T23:59:00Z" level=info msg="fine"',
    'time="2029-12-31T23:58:00Z" level=error msg="datastore is locked" subsystem_name=ca',
  ].join("\n");
  const path = `${ROOT}/.dev-env/spire-server.log`;
  const r = await byId("spire-server.log").run(fakeContext({ files: { [path]: log }, now }));
  assert.equal(r.status, "warn");
  assert.equal(r.detail, "1 error line(s) in the last 10m: datastore is locked");
  assert.equal(r.info!.length, 2);
  const old = await byId("spire-server.log").run(
    fakeContext({ files: { [path]: log.split("\n").slice(0, 2).join("\n") }, now }),
  );
  assert.deepEqual([old.status, old.detail], ["ok", "no recent errors (1 older)"]);
});

Deno.test("spire-agent.socket: the agent's rule: ours or root's, nobody else writes; a missing socket fails", async () => {
  const dir = (last: Record<string, unknown>) =>
    fakeContext({ stats: { ...dirChain("/tmp/spire-agent", last), [SOCK]: { isSocket: true } } });
  const ok = await byId("spire-agent.socket").run(dir({ mode: 0o755 }));
  assert.equal(ok.status, "ok", ok.detail);
  const ww = await byId("spire-agent.socket").run(dir({ mode: 0o777 }));
  assert.equal(ww.status, "fail");
  assert.match(ww.detail, /writable by group and others \(mode 0777\)/);
  assert.equal(ww.hint, "chmod go-w /tmp/spire-agent");
  // Squatted: made first by another user, not world-writable (what the old check accepted).
  const squat = await byId("spire-agent.socket").run(dir({ mode: 0o755, uid: 1234 }));
  assert.equal(squat.status, "fail");
  assert.match(squat.detail, /\/tmp\/spire-agent belongs to uid 1234, not to this user/);
  // A symbolic link is followed, and where it leads is checked the same way.
  const linked = await byId("spire-agent.socket").run(
    fakeContext({
      stats: {
        ...dirChain("/tmp"),
        "/tmp/spire-agent": { isSymlink: true, uid: 0 },
        ...dirChain("/home/eve/s", { uid: 1234 }),
        [SOCK]: { isSocket: true },
      },
      links: { "/tmp/spire-agent": "/home/eve/s" },
    }),
  );
  assert.equal(linked.status, "fail");
  assert.match(linked.detail, /belongs to uid 1234/);
  const gone = await byId("spire-agent.socket").run(fakeContext());
  assert.equal(gone.detail, `${SOCK} does not exist`);
});

Deno.test("spire-agent.health: asks the agent socket", async () => {
  const stats = { [SOCK]: { isSocket: true } };
  const ok = await byId("spire-agent.health").run(
    fakeContext({ stats, spire: { health: () => Promise.resolve({ status: "SERVING" }) } }),
  );
  assert.equal(ok.status, "ok");
  const bad = await byId("spire-agent.health").run(
    fakeContext({ stats, spire: { health: () => Promise.reject(new Error("UNAVAILABLE")) } }),
  );
  assert.equal(bad.status, "fail");
  assert.match(bad.detail, /does not answer on \/tmp\/spire-agent\/agent\.sock: UNAVAILABLE/);
});

Deno.test("spire-agent.join-token: attested, env or 0600 file pass; nothing or a loose file fails; never echoed", async () => {
  assert.equal(
    (await byId("spire-agent.join-token").run(fakeContext({
      spire: { isAttested: () => Promise.resolve(true) },
    }))).status,
    "ok",
  );
  const env = await byId("spire-agent.join-token").run(
    fakeContext({ env: { SPIRE_JOIN_TOKEN: "tok-secret" } }),
  );
  assert.equal(env.detail, "SPIRE_JOIN_TOKEN is set (10 chars)");
  const tf = `${ROOT}/.dev-env/tokens/robot-001.token`;
  assert.equal(
    (await byId("spire-agent.join-token").run(
      fakeContext({ stats: { [tf]: { isFile: true, mode: 0o600 } } }),
    )).status,
    "ok",
  );
  const loose = await byId("spire-agent.join-token").run(
    fakeContext({ stats: { [tf]: { isFile: true, mode: 0o644 } } }),
  );
  assert.deepEqual([loose.status, loose.hint], ["fail", `chmod 600 ${tf}`]);
  const none = await byId("spire-agent.join-token").run(fakeContext());
  assert.equal(none.status, "fail");
  assert.match(
    none.hint!,
    /spire-server token generate -spiffeID spiffe:\/\/k8s4r\.example\.org\/k8s4r\/node\/robot-001/,
  );
});

function svidOf(ttlSeconds: number, notBefore?: Date): FetchedSvid {
  const ca = TestCa.create({ trustDomain: "k8s4r.example.org" });
  const id = "spiffe://k8s4r.example.org/robot/robot-001";
  const c = ca.issue({
    spiffeId: id,
    dnsNames: ["robot-001"],
    ttlSeconds,
    notBefore,
    notAfter: notBefore && new Date(notBefore.getTime() + ttlSeconds * 1000),
  });
  return {
    spiffeId: id,
    chain: splitDer(c.chainDer),
    key: c.keyDer,
    bundle: splitDer(c.bundleDer),
  };
}

Deno.test("spire-agent.svid: the robot's SVID verifies and is fresh", async () => {
  const svid = svidOf(3600);
  const r = await byId("spire-agent.svid").run(
    fakeContext({ now: Date.now(), spire: { fetchX509Svids: () => Promise.resolve([svid]) } }),
  );
  assert.equal(r.status, "ok");
  assert.match(
    r.detail,
    /^spiffe:\/\/k8s4r\.example\.org\/robot\/robot-001, expires in (59m|60m|1h) \(TTL 1h\)$/,
  );
});

Deno.test("spire-agent.svid: missing entry, failed verification and near expiry", async () => {
  const denied = await byId("spire-agent.svid").run(
    fakeContext({
      spire: {
        fetchX509Svids: () => Promise.reject(new Error("PermissionDenied: no identity issued")),
      },
    }),
  );
  assert.equal(denied.status, "fail");
  assert.match(
    denied.hint!,
    /spire-server entry show -spiffeID spiffe:\/\/k8s4r\.example\.org\/robot\/robot-001/,
  );
  const svid = svidOf(3600);
  const unverified = await byId("spire-agent.svid").run(fakeContext({
    now: Date.now(),
    spire: {
      fetchX509Svids: () => Promise.resolve([svid]),
      verifyChain: () => ({ ok: false, error: "signed by a stranger" }),
    },
  }));
  assert.match(unverified.detail, /does not verify against the bundle: signed by a stranger/);
  const old = svidOf(3600, new Date(Date.now() - 3300_000)); // 5 of 60 minutes left
  const near = await byId("spire-agent.svid").run(
    fakeContext({ now: Date.now(), spire: { fetchX509Svids: () => Promise.resolve([old]) } }),
  );
  assert.equal(near.status, "warn");
  assert.match(near.detail, /below 10% of its lifetime/);
});
