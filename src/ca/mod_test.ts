import assert from "node:assert/strict";
import { createPrivateKey, generateKeyPairSync, X509Certificate } from "node:crypto";
import { bufferIo } from "../cli/io.ts";
import { runCli } from "../cli/mod.ts";
import { CliError } from "../cli/errors.ts";
import { certInfo, X509Bundle, X509BundleSet } from "../spiffe/mod.ts";
import { verifyX509SvidChain } from "../spiffe/verify.ts";
import { buildCertificate, issuerFromCert } from "../spiffe/cert_builder.ts";
import { TestCa } from "../spiffe/testing/test_ca.ts";
import { caCommand } from "./command.ts";
import { caFiles, initCa, issueUpstream, readCa, upstreamAuthorityOf } from "./mod.ts";

const TD = "k8s4r.example.org";

async function withDir(fn: (dir: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-ca-" });
  try {
    await fn(`${dir}/ca`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const mode = (p: string) => Deno.statSync(p).mode! & 0o777;

Deno.test("ca init: a root and an upstream CA signed by it, keys 0600, dir 0700", async () => {
  await withDir(async (dir) => {
    const { root, upstream } = await initCa(dir, { trustDomain: TD });
    const f = caFiles(dir);
    assert.equal(mode(dir), 0o700);
    assert.equal(mode(f.rootKey), 0o600);
    assert.equal(mode(f.upstreamKey), 0o600);
    assert.equal(mode(f.rootCert), 0o644);
    assert.ok(root.checkIssued(root) && root.verify(root.publicKey), "root is not self-signed");
    assert.ok(upstream.checkIssued(root) && upstream.verify(root.publicKey));
    for (const c of [root, upstream]) {
      const info = certInfo(c);
      assert.equal(info.isCa, true);
      assert.deepEqual(info.uris, [`spiffe://${TD}`]);
      assert.equal(info.keyUsage?.keyCertSign, true);
    }
    // No extended key usage on the CAs: Go would apply it to everything below.
    assert.doesNotMatch(upstream.toLegacyObject().ext_key_usage?.join() ?? "", /./);
    const st = await readCa(dir);
    assert.deepEqual(st.problems, []);
    assert.equal(st.rootKeyOnline, true);
    assert.deepEqual(upstreamAuthorityOf(f), {
      certFile: f.upstreamCert,
      keyFile: f.upstreamKey,
      bundleFile: f.rootCert,
    });
    // An SVID under a CA the upstream CA signed (as SPIRE's is) verifies against the root
    // alone, which is the whole bundle; a foreign CA's does not (the control).
    const upKey = createPrivateKey(await Deno.readTextFile(f.upstreamKey));
    const spireKey = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;
    const now = Date.now();
    const spireCa = buildCertificate(
      {
        uris: [`spiffe://${TD}`],
        isCa: true,
        notBefore: new Date(now - 1000),
        notAfter: new Date(now + 3600_000),
      },
      spireKey,
      issuerFromCert(new Uint8Array(upstream.raw), upKey),
    );
    const leafKey = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;
    const leaf = buildCertificate(
      {
        commonName: "robot-001",
        uris: [`spiffe://${TD}/robot/robot-001`],
        dnsNames: ["robot-001"],
        notBefore: new Date(now - 1000),
        notAfter: new Date(now + 600_000),
      },
      leafKey,
      issuerFromCert(spireCa.der, spireKey),
    );
    const x = (der: Uint8Array) => new X509Certificate(der);
    const bundles = new X509BundleSet([new X509Bundle(TD, [root])]);
    const v = verifyX509SvidChain([x(leaf.der), x(spireCa.der), upstream], bundles);
    assert.equal(v.id.toString(), `spiffe://${TD}/robot/robot-001`);
    const foreign = TestCa.create({ trustDomain: TD }).issue({
      spiffeId: `spiffe://${TD}/robot/robot-001`,
    });
    assert.throws(() => verifyX509SvidChain(foreign.certificates, bundles), /not issued under/);
  });
});

Deno.test("ca init refuses an existing root; issue renews only the upstream CA", async () => {
  await withDir(async (dir) => {
    const first = await initCa(dir, { trustDomain: TD });
    await assert.rejects(() => initCa(dir, { trustDomain: TD }), (e: CliError) => {
      assert.match(e.message, /already has a root CA/);
      assert.match(e.hint ?? "", /ca issue/);
      return true;
    });
    // The root key offline: issue needs it back.
    const f = caFiles(dir);
    const offline = `${dir}/../offline.key`;
    await Deno.rename(f.rootKey, offline);
    assert.equal((await readCa(dir)).rootKeyOnline, false);
    await assert.rejects(() => issueUpstream(dir, { trustDomain: TD }), /--root-key|no root key/);
    const up = await issueUpstream(dir, { trustDomain: TD, rootKeyFile: offline });
    assert.notEqual(up.fingerprint256, first.upstream.fingerprint256);
    assert.ok(up.checkIssued(first.root) && up.verify(first.root.publicKey));
    const root = new X509Certificate(await Deno.readTextFile(f.rootCert));
    assert.equal(root.fingerprint256, first.root.fingerprint256, "the root changed");
    assert.deepEqual((await readCa(dir)).problems, []);
    // A key readable by others is refused, naming the fix.
    await Deno.chmod(offline, 0o644);
    await assert.rejects(
      () => issueUpstream(dir, { trustDomain: TD, rootKeyFile: offline }),
      (e: CliError) => /readable by others/.test(e.message) && /chmod 600/.test(e.hint ?? ""),
    );
    // The wrong key is refused.
    const other = `${dir}/../other`;
    await initCa(other, { trustDomain: TD });
    await assert.rejects(
      () => issueUpstream(dir, { trustDomain: TD, rootKeyFile: caFiles(other).rootKey }),
      /does not belong/,
    );
  });
});

Deno.test("readCa names each problem: missing files, a foreign upstream, an open key", async () => {
  await withDir(async (dir) => {
    assert.match((await readCa(dir)).problems.join("\n"), /root\.crt: missing/);
    await initCa(dir, { trustDomain: TD });
    const other = `${dir}-b`;
    await initCa(other, { trustDomain: TD });
    await Deno.copyFile(caFiles(other).upstreamCert, caFiles(dir).upstreamCert);
    const st = await readCa(dir);
    assert.match(st.problems.join("\n"), /not signed by/);
    assert.match(st.problems.join("\n"), /does not belong/);
    await Deno.chmod(caFiles(dir).upstreamKey, 0o640);
    assert.match((await readCa(dir)).problems.join("\n"), /readable by others \(mode 640\)/);
    await Deno.remove(other, { recursive: true });
  });
});

Deno.test("k8s4r ca init|show through the CLI: usage errors exit 2, show exits 1 on problems", async () => {
  await withDir(async (dir) => {
    const io = bufferIo({ cwd: "/" });
    assert.equal(await runCli(caCommand, ["init", "--dir", dir], io), 0);
    assert.match(io.out(), /Move it offline now/);
    assert.match(io.out(), /k8s4r ca issue --root-key/);
    const show = bufferIo({ cwd: "/" });
    assert.equal(await runCli(caCommand, ["show", "--dir", dir, "--json"], show), 0);
    const j = JSON.parse(show.out());
    assert.equal(j.rootKeyOnline, true);
    assert.deepEqual(j.problems, []);
    await Deno.remove(caFiles(dir).upstreamKey);
    assert.equal(await runCli(caCommand, ["show", "--dir", dir], bufferIo({ cwd: "/" })), 1);
    await assert.rejects(
      () => runCli(caCommand, ["init", "--dir", `${dir}x`, "--root-days", "0"], bufferIo()),
      (e: CliError) => e.exitCode === 2 && /--root-days/.test(e.message),
    );
  });
});

Deno.test("ca issue: when the certificate file cannot be replaced, upstream.key and upstream.crt still match", async () => {
  if (Deno.uid() !== 0) throw new Error("uses chattr +i (an immutable file): run as root");
  await withDir(async (dir) => {
    await initCa(dir, { trustDomain: TD });
    const f = caFiles(dir);
    const matches = () => {
      const cert = new X509Certificate(Deno.readTextFileSync(f.upstreamCert));
      const key = createPrivateKey(Deno.readTextFileSync(f.upstreamKey));
      return cert.checkPrivateKey(key);
    };
    const before = Deno.readTextFileSync(f.upstreamCert);
    // The file upstream.crt leads to is immutable (a crash between two writes is the same):
    // written separately, the new key landed next to the old certificate.
    await new Deno.Command("chattr", { args: ["+i", f.upstreamCert] }).output();
    try {
      await issueUpstream(dir, { trustDomain: TD }).catch(() => {});
      // SPIRE's disk plugin reads both files at its next rotation: they must still be a pair.
      assert.equal(matches(), true, "upstream.key no longer matches upstream.crt");
    } finally {
      await new Deno.Command("chattr", { args: ["-i", f.upstreamCert] }).output();
    }
    // The control: once it can be written, issue renews both, still a pair.
    await issueUpstream(dir, { trustDomain: TD });
    assert.notEqual(Deno.readTextFileSync(f.upstreamCert), before);
    assert.equal(matches(), true);
    assert.equal(mode(f.upstreamKey), 0o600);
    assert.equal(mode(f.upstreamCert), 0o644);
    assert.deepEqual((await readCa(dir)).problems, []);
  });
});
