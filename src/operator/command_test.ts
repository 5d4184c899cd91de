import assert from "node:assert/strict";
import { writeTestCredentials } from "../server/testing.ts";
import { readRolesFile } from "../server/roles.ts";
import { addOperator, ensureOperator, loginOperator, parseTtl, removeOperator } from "./command.ts";
import { loadCredentials, resolveOperatorName } from "./credentials.ts";
import { fakeControl as control } from "./testing.ts";
import { TestCa } from "../spiffe/testing/test_ca.ts";

const TD = "k8s4r.test";

Deno.test("parseTtl: durations, bounds, precise errors", () => {
  assert.equal(parseTtl("12h"), 43200);
  assert.equal(parseTtl("1h30m"), 5400);
  assert.equal(parseTtl("90s"), 90);
  assert.equal(parseTtl("3600"), 3600);
  for (const bad of ["", "1d", "-5m", "12 h", "59s", "721h"]) {
    assert.throws(() => parseTtl(bad), /--ttl: expected/, bad);
  }
});

Deno.test("operator add/login/remove: argv carries no key, files 0600, roles edited", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-op-" });
  try {
    const { runner, env, ctl, spire } = control(dir);
    const r = await addOperator(ctl, "alice", "viewer", 7200);
    assert.equal(r.meta.spiffeId, `spiffe://${TD}/operator/alice`);
    const args = runner.calls.find((c) => c.args[0] === "x509")!.args;
    assert.deepEqual(args.slice(0, 4), [
      "x509",
      "mint",
      "-spiffeID",
      `spiffe://${TD}/operator/alice`,
    ]);
    assert.ok(args.includes("7200s"));
    assert.ok(!args.join(" ").includes("PRIVATE KEY"));
    for (const f of ["cert.pem", "key.pem", "bundle.pem", "operator.json"]) {
      assert.equal(Deno.statSync(`${r.dir}/${f}`).mode! & 0o777, 0o600, f);
    }
    assert.equal((await readRolesFile(ctl.rolesFile)).operators.get("alice"), "viewer");
    const c = await loadCredentials(env, "alice");
    assert.equal(c.expired, false);
    // The roles file revokes every older certificate of alice: issuedAfter = this one's notBefore.
    const issuedAfter = async () =>
      (await readRolesFile(ctl.rolesFile)).issuedAfter?.get("alice")?.toISOString();
    assert.equal(await issuedAfter(), c.svid.notBefore.toISOString());
    // A valid certificate is left alone; one with less than a third of its life is renewed.
    const same = await loginOperator(ctl, "alice");
    assert.equal(same.renewed, false);
    const late = await loginOperator(ctl, "alice", {
      now: new Date(c.svid.notAfter.getTime() - 1000_000),
    });
    assert.equal(late.renewed, true);
    assert.match(late.why, /less than a third of its lifetime left/);
    // A renewal moves issuedAfter to the new certificate (the old one is refused from now on);
    // a login that renews nothing leaves it.
    assert.equal(await issuedAfter(), late.meta.issuedAt);
    assert.equal((await readRolesFile(ctl.rolesFile)).operators.get("alice"), "viewer");
    // A new SPIRE CA (a rotation, a cleaned dev stack): valid but stale credentials renewed.
    spire.ca = TestCa.create({ trustDomain: TD });
    const moved = await loginOperator(ctl, "alice");
    assert.equal(moved.renewed, true);
    assert.match(moved.why, /not issued under the SPIRE server's current bundle/);
    assert.equal((await loginOperator(ctl, "alice")).renewed, false);
    // No role, no login.
    await assert.rejects(() => loginOperator(ctl, "bob"), /operator bob has no role in/);
    // ensureOperator (devenv): creates, then leaves alone.
    assert.match(await ensureOperator(ctl, "admin", "operator"), /credentials written/);
    assert.match(await ensureOperator(ctl, "admin", "operator"), /credentials valid until/);
    assert.deepEqual(await removeOperator(ctl, "alice"), { credentials: true, role: true });
    assert.deepEqual(await removeOperator(ctl, "alice"), { credentials: false, role: false });
    assert.equal((await readRolesFile(ctl.rolesFile)).operators.has("alice"), false);
    // Nothing half-written is left in the operators directory.
    assert.deepEqual([...Deno.readDirSync(`${dir}/xdg/k8s4r/operators`)].map((e) => e.name), [
      "admin",
    ]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("which operator: --operator, K8S4R_OPERATOR, admin, the only one; else what to run", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-op-" });
  try {
    const ca = TestCa.create({ trustDomain: TD });
    const env: Record<string, string> = { XDG_CONFIG_HOME: dir };
    await assert.rejects(() => resolveOperatorName(env), (e: Error & { hint?: string }) => {
      assert.match(e.message, /no operator credentials in/);
      assert.match(e.hint!, /k8s4r operator add admin --role operator/);
      return true;
    });
    const put = (name: string) =>
      writeTestCredentials(
        env,
        name,
        ca.issue({ spiffeId: `spiffe://${TD}/operator/${name}` }),
        ca.rootPem,
        "https://localhost:8090",
      );
    await put("zoe");
    assert.equal(await resolveOperatorName(env), "zoe");
    await put("yan");
    await assert.rejects(() => resolveOperatorName(env), /several operators .* \(yan, zoe\)/);
    await put("admin");
    assert.equal(await resolveOperatorName(env), "admin");
    assert.equal(await resolveOperatorName({ ...env, K8S4R_OPERATOR: "yan" }), "yan");
    assert.equal(await resolveOperatorName(env, "zoe"), "zoe");
    await assert.rejects(
      () => resolveOperatorName(env, "nobody"),
      /no credentials for operator nobody/,
    );
    await assert.rejects(() => resolveOperatorName(env, "../x"), /invalid operator name/);
    // A key readable by others is refused, with the chmod to run.
    await Deno.chmod(`${dir}/k8s4r/operators/zoe/key.pem`, 0o644);
    await assert.rejects(() => loadCredentials(env, "zoe"), (e: Error & { hint?: string }) => {
      assert.match(e.message, /must be private \(mode 644, expected 600\)/);
      assert.match(e.hint!, /chmod 600/);
      return true;
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("operator add: an admin socket in a directory someone else owns is refused; nothing minted", async () => {
  if (Deno.uid() !== 0) throw new Error("chowns a directory to another user: run as root");
  const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-op-" });
  try {
    const { runner, ctl } = control(dir);
    await Deno.mkdir(`${dir}/spire`, { mode: 0o700 });
    await Deno.chown(`${dir}/spire`, 65534, 65534);
    await assert.rejects(
      addOperator({ ...ctl, spireSocket: `${dir}/spire/api.sock` }, "mallory", "viewer", 3600),
      /SPIRE server admin socket directory .*belongs to uid 65534/,
    );
    assert.deepEqual(runner.calls, [], "spire-server was asked through a squatted socket");
    assert.equal((await readRolesFile(ctl.rolesFile)).operators.has("mallory"), false);
    // The control: the same add through the test's own socket directory.
    assert.equal((await addOperator(ctl, "mallory", "viewer", 3600)).meta.name, "mallory");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
