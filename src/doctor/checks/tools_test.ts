import assert from "node:assert/strict";
import { RecordingRunner } from "../../process/mod.ts";
import { fakeContext } from "../testing.ts";
import { toolChecks } from "./tools.ts";

const byId = (id: string) => toolChecks.find((c) => c.id === id)!;
const bins = {
  server: "/c/spire-server",
  agent: "/c/spire-agent",
  source: "cache",
  version: "1.13.3",
};

Deno.test("tools.spire-server: found in the cache", async () => {
  const r = await byId("tools.spire-server").run(
    fakeContext({ spire: { findBinaries: () => Promise.resolve(bins) } }),
  );
  assert.equal(r.status, "ok");
  assert.equal(r.detail, "/c/spire-server (1.13.3, from cache)");
});

Deno.test("tools.spire-agent: a wrong version on PATH fails with the install hint", async () => {
  const runner = new RecordingRunner(() => ({ stderr: "1.9.0\n" }));
  const r = await byId("tools.spire-agent").run(
    fakeContext({ runner, which: { "spire-agent": "/usr/bin/spire-agent" } }),
  );
  assert.equal(r.status, "fail");
  assert.equal(r.detail, "/usr/bin/spire-agent is version 1.9.0, k8s4r needs 1.13.3");
  assert.match(r.hint!, /^k8s4r devenv install/);
  assert.deepEqual(runner.calls.map((c) => [c.cmd, c.args]), [["/usr/bin/spire-agent", [
    "--version",
  ]]]);
});

Deno.test("tools.mosquitto: 2.0.21 passes, 2.0.11 is a warning (SIGHUP crash), 1.6 fails", async () => {
  const ctx = (v: string) =>
    fakeContext({
      which: { mosquitto: "/usr/sbin/mosquitto" },
      runner: new RecordingRunner(() => ({ code: 3, stdout: `mosquitto version ${v}\n` })),
    });
  const good = await byId("tools.mosquitto").run(ctx("2.0.21"));
  assert.equal(good.status, "ok");
  assert.equal(good.detail, "/usr/sbin/mosquitto (2.0.21)");
  const old = await byId("tools.mosquitto").run(ctx("2.0.11"));
  assert.equal(old.status, "warn");
  assert.match(
    old.detail,
    /older than 2\.0\.21 .*2\.0\.11 crashed in our tests under frequent SIGHUPs/,
  );
  assert.match(old.hint!, /apt-get install -y -t bookworm-backports mosquitto mosquitto-clients/);
  const bad = await byId("tools.mosquitto").run(ctx("1.6.9"));
  assert.equal(bad.status, "fail");
  assert.match(bad.detail, /version 1\.6\.9, k8s4r needs 2\.x/);
});

Deno.test("tools.mosquitto in docker mode asks docker info, and fails without an engine", async () => {
  const runner = new RecordingRunner(() => ({
    code: 1,
    stderr: "Cannot connect to the Docker daemon at unix:///var/run/docker.sock\n",
  }));
  const r = await byId("tools.mosquitto").run(
    fakeContext({ runner, which: { docker: "/usr/bin/docker" }, options: { broker: "docker" } }),
  );
  assert.equal(r.status, "fail");
  assert.match(r.detail, /Cannot connect to the Docker daemon/);
  assert.deepEqual(runner.calls[0].args, ["info", "--format", "{{.ServerVersion}}"]);
  const ok = await byId("tools.mosquitto").run(
    fakeContext({
      runner: new RecordingRunner(() => ({ stdout: "27.1.0\n" })),
      which: { docker: "/usr/bin/docker" },
      options: { broker: "docker" },
    }),
  );
  assert.equal(ok.status, "ok");
});

Deno.test("tools.openssl: version reported; missing fails", async () => {
  const ok = await byId("tools.openssl").run(
    fakeContext({
      which: { openssl: "/usr/bin/openssl" },
      runner: new RecordingRunner(() => ({ stdout: "OpenSSL 3.0.19 27 Jan 2026\n" })),
    }),
  );
  assert.equal(ok.detail, "/usr/bin/openssl (OpenSSL 3.0.19)");
  const bad = await byId("tools.openssl").run(fakeContext());
  assert.equal(bad.status, "fail");
  assert.equal(bad.hint, "sudo apt-get install openssl");
});
