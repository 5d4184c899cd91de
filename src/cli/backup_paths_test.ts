import assert from "node:assert/strict";
import { bufferIo } from "./io.ts";
import { renderControlConfig } from "../control/config.ts";
import { factoryCaFiles } from "../control/factory_ca.ts";
import { defaultLayout } from "../devenv/layout.ts";
import { brokerFiles } from "../mqtt/broker_config.ts";
import { writeFileAtomic } from "../fs/atomic.ts";
import { devStackBackupSources } from "./backup_paths.ts";

Deno.test("backup sources: the control host's files at the layout's paths (the ones robot add and devenv use)", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const io = bufferIo({ cwd: dir });
    const src = devStackBackupSources(io, dir);
    const L = defaultLayout(dir, {});
    const path = (name: string) => {
      const s = src.sources.find((s) => s.name === name);
      assert.ok(s && s.kind !== "postgres", `no file source ${name}`);
      return s.path;
    };
    const factory = factoryCaFiles(L.factoryCaDir);
    assert.equal(path("factory-ca.crt"), factory.cert);
    assert.equal(path("factory-ca.key"), factory.key);
    assert.equal(path("control-host.json"), L.controlHostConfig);
    assert.equal(path("robots.json"), L.robotRecords);
    assert.equal(path("broker-admin.json"), L.brokerAdminCredentialsFile);
    const broker = brokerFiles(L.mosquittoDir);
    assert.equal(path("mosquitto-passwd"), broker.passwordFile);
    assert.equal(path("mosquitto-dynsec.json"), broker.dynsecFile);

    // A restore checks a manifest against the sources of the manifest's mode: a clean host
    // (this one: no state, so "plain") takes an HA backup's PostgreSQL dumps where devenv start
    // loads them from.
    assert.equal(src.mode, "plain");
    const kinds = (mode: string) =>
      Object.fromEntries(src.sourcesOf(mode).map((s) => [s.name, s.kind]));
    assert.equal(kinds("plain")["spire-datastore"], "sqlite");
    assert.equal(kinds("ha")["spire-datastore"], "postgres");
    assert.equal(kinds("ha")["spire-2-keys"], "file");
    assert.equal(kinds("root-ca")["spire-2-keys"], undefined);
    assert.throws(() => src.sourcesOf("cluster"), /a "cluster" control host; expected one of/);

    // The start a restore suggests: the plain stack's, then what the restored files need.
    assert.equal(src.startCommand("plain"), "k8s4r devenv start");
    assert.equal(src.startCommand("ha"), "k8s4r devenv start --ha");
    await writeFileAtomic(factory.cert, "restored\n", 0o600);
    const config = (host: string) =>
      renderControlConfig({
        trustDomain: "k8s4r.example.org",
        spireServer: { adminSocket: `${dir}/api.sock`, address: `${host}:8081` },
        broker: {
          url: `ssl://${host}:8883`,
          adminAddress: "127.0.0.1:1883",
          adminCredentials: L.brokerAdminCredentialsFile,
        },
        robotSelectors: ["unix:uid:0"],
        factoryCa: factory,
        records: L.robotRecords,
      });
    await writeFileAtomic(L.controlHostConfig, config("10.0.0.1"), 0o600);
    assert.equal(
      src.startCommand("ha"),
      "k8s4r devenv start --ha --attestation x509pop --advertise 10.0.0.1",
    );
    // Control: a loopback-only control host needs no --advertise.
    await writeFileAtomic(L.controlHostConfig, config("localhost"), 0o600);
    assert.equal(src.startCommand("root-ca"), "k8s4r devenv start --root-ca --attestation x509pop");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
