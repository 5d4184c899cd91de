import assert from "node:assert/strict";
import { createPrivateKey, X509Certificate } from "node:crypto";
import { X509Bundle, X509BundleSet } from "../spiffe/bundle.ts";
import { StaticX509Source } from "../spiffe/source.ts";
import { parseX509SvidPem } from "../spiffe/svid.ts";
import { TestCa } from "../spiffe/testing/test_ca.ts";
import {
  BrokerIdentity,
  bundleFingerprint,
  pemFingerprint,
  readBrokerIdentityStatus,
} from "./identity.ts";

const TD = "k8s4r.example.org";
const ID = `spiffe://${TD}/mqtt-broker`;

function svidFrom(ca: TestCa) {
  const c = ca.issue({ spiffeId: ID, dnsNames: ["localhost"] });
  return parseX509SvidPem(c.chainPem, c.keyPem);
}

Deno.test("broker-identity: writes files 0600, SIGHUPs on renewal, restarts on a new bundle", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const ca1 = TestCa.create({ trustDomain: TD });
    const source = new StaticX509Source(
      svidFrom(ca1),
      new X509BundleSet([new X509Bundle(TD, [ca1.certificate])]),
    );
    const actions: string[] = [];
    const paths = {
      certFile: `${dir}/m/broker.crt`,
      keyFile: `${dir}/m/broker.key`,
      caBundleFile: `${dir}/certs/spire-ca.crt`,
      statusFile: `${dir}/broker-identity.json`,
      trustDomain: TD,
    };
    const bi = new BrokerIdentity(source, paths, {
      reload: () => {
        actions.push("reload");
        return Promise.resolve("reloaded");
      },
      restart: () => {
        actions.push("restart");
        return Promise.resolve("restarted");
      },
    }, () => {});

    // First update: files written, the missing CA export written -> restart (new cafile).
    await bi.update();
    assert.deepEqual(actions, ["restart"]);
    assert.equal((await Deno.stat(paths.keyFile)).mode! & 0o777, 0o600);
    assert.equal((await Deno.stat(paths.certFile)).mode! & 0o777, 0o600);
    assert.equal(
      pemFingerprint(await Deno.readTextFile(paths.caBundleFile)),
      bundleFingerprint([ca1.certificate]),
    );
    const s1 = (await readBrokerIdentityStatus(paths.statusFile))!;
    assert.equal(s1.spiffeId, ID);
    assert.equal(s1.serial, source.getX509Svid().serialNumber);
    assert.equal(s1.renewals, 0);

    // Same SVID again: nothing to do.
    await bi.update();
    assert.deepEqual(actions, ["restart"]);

    // Rotation with the same CA: new files and a SIGHUP, no restart.
    source.set(svidFrom(ca1));
    await bi.update();
    assert.deepEqual(actions, ["restart", "reload"]);
    const s2 = (await readBrokerIdentityStatus(paths.statusFile))!;
    assert.notEqual(s2.serial, s1.serial);
    assert.equal(s2.renewals, 1);
    assert.ok((await Deno.readTextFile(paths.certFile)).includes("BEGIN CERTIFICATE"));

    // CA rotation: the bundle gains a CA -> CA export rewritten and the broker restarted.
    const ca2 = TestCa.create({ trustDomain: TD });
    source.set(
      svidFrom(ca2),
      new X509BundleSet([new X509Bundle(TD, [ca1.certificate, ca2.certificate])]),
    );
    await bi.update();
    assert.deepEqual(actions, ["restart", "reload", "restart"]);
    assert.equal(
      pemFingerprint(await Deno.readTextFile(paths.caBundleFile)),
      bundleFingerprint([ca2.certificate, ca1.certificate]),
    );
    assert.equal((await readBrokerIdentityStatus(paths.statusFile))!.bundleChanges, 2);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("broker-identity: SIGHUP only when the certificate really changed, across restarts", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const ca = TestCa.create({ trustDomain: TD });
    const bundles = new X509BundleSet([new X509Bundle(TD, [ca.certificate])]);
    const source = new StaticX509Source(svidFrom(ca), bundles);
    const actions: string[] = [];
    const paths = {
      certFile: `${dir}/m/broker.crt`,
      keyFile: `${dir}/m/broker.key`,
      caBundleFile: `${dir}/certs/spire-ca.crt`,
      statusFile: `${dir}/broker-identity.json`,
      trustDomain: TD,
    };
    await Deno.mkdir(`${dir}/certs`);
    await Deno.writeTextFile(paths.caBundleFile, bundles.get(TD)!.toPem());
    const control = {
      reload: () => (actions.push("reload"), Promise.resolve("reloaded")),
      restart: () => (actions.push("restart"), Promise.resolve("restarted")),
    };
    const first = new BrokerIdentity(source, paths, control, () => {});
    await first.update();
    assert.deepEqual(actions, ["reload"], "new files: one SIGHUP");
    await first.update();
    await first.update();
    assert.deepEqual(actions, ["reload"], "the same SVID again: nothing");

    // A new process (broker-identity restarted) finds the files current and the broker told.
    const second = new BrokerIdentity(source, paths, control, () => {});
    await second.update();
    assert.deepEqual(actions, ["reload"], "restart with current files: no SIGHUP");

    // Files written by a process that stopped before its SIGHUP: the next one sends it.
    const next = svidFrom(ca);
    await Deno.writeTextFile(paths.keyFile, next.privateKeyPem());
    await Deno.writeTextFile(paths.certFile, next.certChainPem());
    source.set(next, bundles);
    const third = new BrokerIdentity(source, paths, control, () => {});
    await third.update();
    assert.deepEqual(actions, ["reload", "reload"], "written but never announced: SIGHUP");
    const s = (await readBrokerIdentityStatus(paths.statusFile))!;
    assert.equal(s.reloadedSerial, next.serialNumber);
    assert.equal(s.reloads, 2);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("broker-identity: a failing broker action is recorded, not thrown", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const ca = TestCa.create({ trustDomain: TD });
    const source = new StaticX509Source(
      svidFrom(ca),
      new X509BundleSet([new X509Bundle(TD, [ca.certificate])]),
    );
    const logs: string[] = [];
    const bi = new BrokerIdentity(source, {
      certFile: `${dir}/c`,
      keyFile: `${dir}/k`,
      caBundleFile: `${dir}/ca`,
      statusFile: `${dir}/s.json`,
      trustDomain: TD,
    }, {
      reload: () => Promise.reject(new Error("no such process")),
      restart: () => Promise.reject(new Error("port in use")),
    }, (l) => logs.push(l));
    await bi.update(); // must not reject
    assert.ok(logs.some((l) => l.includes("port in use")));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("broker-identity: when the certificate file cannot be replaced, broker.key and broker.crt still match", async () => {
  if (Deno.uid() !== 0) throw new Error("uses chattr +i (an immutable file): run as root");
  const dir = await Deno.makeTempDir();
  const paths = {
    certFile: `${dir}/m/broker.crt`,
    keyFile: `${dir}/m/broker.key`,
    caBundleFile: `${dir}/certs/spire-ca.crt`,
    statusFile: `${dir}/broker-identity.json`,
    trustDomain: TD,
  };
  try {
    const ca = TestCa.create({ trustDomain: TD });
    let svid = svidFrom(ca);
    const source = {
      getX509Svid: () => svid,
      getX509BundleForTrustDomain: () => new X509Bundle(TD, [ca.certificate]),
    };
    const bi = new BrokerIdentity(source as unknown as StaticX509Source, paths, {
      reload: () => Promise.resolve("reloaded"),
      restart: () => Promise.resolve("restarted"),
    }, () => {});
    await bi.update();
    const matches = () =>
      new X509Certificate(Deno.readTextFileSync(paths.certFile)).checkPrivateKey(
        createPrivateKey(Deno.readTextFileSync(paths.keyFile)),
      );
    assert.equal(matches(), true);
    // A renewal while the file broker.crt leads to cannot be replaced (an immutable file; a
    // crash between the two writes is the same): Mosquitto, restarted or SIGHUPed, must find a
    // matching pair. Written separately, the new key landed next to the old certificate.
    svid = svidFrom(ca);
    await new Deno.Command("chattr", { args: ["+i", paths.certFile] }).output();
    try {
      await bi.update(); // logs a failure, if any; never throws
      assert.equal(matches(), true, "broker.key no longer matches broker.crt");
    } finally {
      await new Deno.Command("chattr", { args: ["-i", paths.certFile] }).output();
    }
    // The control: the next update writes the new pair.
    await bi.update();
    assert.equal(matches(), true);
    assert.equal(
      new X509Certificate(Deno.readTextFileSync(paths.certFile)).serialNumber,
      svid.serialNumber,
    );
    assert.equal((await Deno.stat(paths.keyFile)).mode! & 0o777, 0o600);
    assert.equal((await Deno.stat(paths.certFile)).mode! & 0o777, 0o600);
  } finally {
    await new Deno.Command("chattr", { args: ["-i", paths.certFile] }).output().catch(() => {});
    await Deno.remove(dir, { recursive: true });
  }
});
