// ca-bundle, broker, docker and server checks, with network, processes and files faked.
import assert from "node:assert/strict";
import { RecordingRunner } from "../../process/mod.ts";
import { TestCa } from "../../spiffe/testing/test_ca.ts";
import type { MqttProbeOptions, MqttProbeResult } from "../../mqtt/probe.ts";
import type { FetchedSvid } from "../check.ts";
import { splitDer } from "../pki.ts";
import { fakeContext, ROOT } from "../testing.ts";
import { brokerChecks } from "./broker.ts";
import { caBundleChecks } from "./ca_bundle.ts";
import { dockerChecks } from "./docker.ts";
import { serverChecks } from "./server.ts";

const all = [...caBundleChecks, ...brokerChecks, ...dockerChecks, ...serverChecks];
const byId = (id: string) => all.find((c) => c.id === id)!;
const TD = "k8s4r.example.org";
const ca = TestCa.create({ trustDomain: TD });
const robot = ca.issue({ spiffeId: `spiffe://${TD}/robot/robot-001`, dnsNames: ["robot-001"] });
const broker = ca.issue({ spiffeId: `spiffe://${TD}/mqtt-broker`, dnsNames: ["localhost"] });
const svid: FetchedSvid = {
  spiffeId: robot.spiffeId!,
  chain: splitDer(robot.chainDer),
  key: robot.keyDer,
  bundle: splitDer(robot.bundleDer),
};
const CA_FILE = `${ROOT}/config/mosquitto/certs/spire-ca.crt`;
const fetchOk = { fetchX509Svids: () => Promise.resolve([svid]) };

Deno.test("ca-bundle.file: a valid CA passes; garbage fails with the export command", async () => {
  const ok = await byId("ca-bundle.file").run(
    fakeContext({ now: Date.now(), files: { [CA_FILE]: ca.rootPem } }),
  );
  assert.equal(ok.status, "ok");
  const bad = await byId("ca-bundle.file").run(fakeContext({ files: { [CA_FILE]: "hello" } }));
  assert.equal(bad.status, "fail");
  assert.match(
    bad.hint!,
    /spire-server bundle show -format pem -socketPath \/proj\/\.spire-data\/server\/api\.sock > config\/mosquitto\/certs\/spire-ca\.crt/,
  );
});

Deno.test("ca-bundle.current: equal to the Workload API bundle passes; a stale export fails", async () => {
  const ok = await byId("ca-bundle.current").run(
    fakeContext({ files: { [CA_FILE]: ca.rootPem }, spire: fetchOk }),
  );
  assert.equal(
    ok.detail,
    "config/mosquitto/certs/spire-ca.crt matches the 1 CA(s) from the Workload API",
  );
  const stale = await byId("ca-bundle.current").run(
    fakeContext({
      files: { [CA_FILE]: TestCa.create({ trustDomain: TD }).rootPem },
      spire: fetchOk,
    }),
  );
  assert.equal(stale.status, "fail");
  assert.match(stale.detail, /is stale: 1 CA\(s\) missing, 1 no longer in SPIRE's bundle/);
  assert.match(stale.hint!, /k8s4r devenv start/);
});

Deno.test("ca-bundle.current: falls back to spire-server bundle show", async () => {
  const runner = new RecordingRunner(() => ({ stdout: ca.rootPem }));
  const r = await byId("ca-bundle.current").run(fakeContext({
    runner,
    files: { [CA_FILE]: ca.rootPem },
    spire: { fetchX509Svids: () => Promise.reject(new Error("UNAVAILABLE")) },
  }));
  assert.equal(r.status, "ok");
  assert.deepEqual(runner.calls[0].args, [
    "bundle",
    "show",
    "-format",
    "pem",
    "-socketPath",
    `${ROOT}/.spire-data/server/api.sock`,
  ]);
});

const CREDS = `${ROOT}/.dev-env/server-mqtt.json`;
Deno.test("broker.plain: logs in with the server credentials; a refused login fails", async () => {
  const files = { [CREDS]: JSON.stringify({ username: "k8s4r-server", password: "pw" }) };
  let seen: MqttProbeOptions | undefined;
  const ok = await byId("broker.plain").run(fakeContext({
    files,
    net: { mqttProbe: (o) => (seen = o, Promise.resolve(plainResult(0))) },
  }));
  assert.equal(ok.status, "ok");
  assert.deepEqual([seen?.username, seen?.password, seen?.port, seen?.tls], [
    "k8s4r-server",
    "pw",
    1883,
    undefined,
  ]);
  const bad = await byId("broker.plain").run(
    fakeContext({ files, net: { mqttProbe: () => Promise.resolve(plainResult(5)) } }),
  );
  assert.equal(bad.detail, "127.0.0.1:1883 refused k8s4r-server: CONNACK 5 (not authorized)");
  const down = await byId("broker.plain").run(fakeContext({
    files,
    net: {
      mqttProbe: () =>
        Promise.resolve({
          ok: false,
          outcome: "connection-refused",
          detail: "127.0.0.1:1883: connection refused (nothing listens)",
          code: "ECONNREFUSED",
        }),
    },
  }));
  assert.equal(down.status, "fail");
  assert.equal(down.detail, "127.0.0.1:1883: connection refused (nothing listens)");
  assert.match(down.hint!, /k8s4r devenv stop && k8s4r devenv start/);
});

const plainResult = (rc: number): MqttProbeResult => ({
  ok: rc === 0,
  outcome: rc === 0 ? "accepted" : "refused",
  returnCode: rc,
  detail: `127.0.0.1:1883: CONNACK ${rc}`,
});

/** What probeMqtt reports for a robot identified over mTLS (identifyOnly), with `over` changed. */
const handshake = (
  { peerChain, ...over }: Partial<MqttProbeResult> & { peerChain?: Uint8Array[] } = {},
): MqttProbeResult => ({
  ok: true,
  outcome: "identified",
  returnCode: 0x8c,
  detail:
    "127.0.0.1:8883 (mTLS): CONNACK 0x8c (bad authentication method): certificate identity taken, no session touched",
  tls: {
    handshake: true,
    authorized: true,
    protocol: "TLSv1.3",
    peerChain: peerChain ?? splitDer(broker.chainDer),
  },
  ...over,
});

Deno.test("broker.mtls-native: identified (CONNACK 0x8c) passes; refused and dropped fail", async () => {
  let opts: MqttProbeOptions | undefined;
  const ok = await byId("broker.mtls-native").run(fakeContext({
    spire: fetchOk,
    net: { mqttProbe: (o) => (opts = o, Promise.resolve(handshake())) },
  }));
  assert.equal(ok.status, "ok");
  assert.equal(opts?.port, 8883);
  assert.match(opts!.tls!.cert!, /BEGIN CERTIFICATE/);
  assert.equal(opts!.tls!.verify, false, "the check verifies the broker's SPIFFE ID itself");
  assert.equal(opts!.identifyOnly, true, "a normal CONNECT would take the robot's session over");
  assert.match(ok.detail, /robot's own session is not touched/);
  const noCn = await byId("broker.mtls-native").run(fakeContext({
    spire: fetchOk,
    net: {
      mqttProbe: () =>
        Promise.resolve(handshake({
          ok: false,
          outcome: "refused",
          returnCode: 0x86,
          detail: "127.0.0.1:8883 (mTLS): CONNACK 0x86 (bad user name or password)",
        })),
    },
  }));
  assert.equal(noCn.status, "fail");
  assert.match(noCn.detail, /refused the robot: .*0x86/);
  assert.match(noCn.hint ?? "", /needs a CN/);
  const dropped = await byId("broker.mtls-native").run(fakeContext({
    spire: fetchOk,
    net: {
      mqttProbe: () =>
        Promise.resolve(
          handshake({
            ok: false,
            outcome: "tls-error",
            returnCode: undefined,
            error: "received fatal alert: UnknownCA",
          }),
        ),
    },
  }));
  assert.equal(dropped.status, "fail");
  assert.match(dropped.detail, /dropped the connection before CONNACK/);
});

Deno.test("broker.mtls-openssl: key material in a private temp dir, only paths on argv, dir removed", async () => {
  const runner = new RecordingRunner(() => ({
    stderr: "CONNECTION ESTABLISHED\nProtocol version: TLSv1.3\nVerification: OK\n",
  }));
  const ctx = fakeContext({ runner, spire: fetchOk });
  const r = await byId("broker.mtls-openssl").run(ctx);
  assert.equal(r.detail, "openssl s_client: TLSv1.3, server verified against the SVID bundle");
  const argv = runner.calls[0].args;
  assert.equal(runner.calls[0].cmd, "openssl");
  assert.ok(argv.includes("/tmp/fake-doctor/svid.key"));
  assert.ok(!argv.join(" ").includes("PRIVATE KEY"));
  assert.equal(ctx.written.get("/tmp/fake-doctor/svid.key")?.mode, 0o600);
  assert.deepEqual(ctx.removed, ["/tmp/fake-doctor"]);
  const bad = await byId("broker.mtls-openssl").run(fakeContext({
    spire: fetchOk,
    runner: new RecordingRunner(() => ({
      code: 1,
      stderr: "error:0A000418:SSL routines::tlsv1 alert unknown ca\n",
    })),
  }));
  assert.equal(bad.status, "fail");
  assert.match(bad.detail, /alert unknown ca/);
});

Deno.test("broker.no-cert: refusal passes; a client let in without a certificate fails", async () => {
  const refused = await byId("broker.no-cert").run(fakeContext({
    net: {
      mqttProbe: () =>
        Promise.resolve({
          ok: false,
          outcome: "tls-error",
          detail: "127.0.0.1:8883 (TLS): TLS: received fatal alert: CertificateRequired",
          error: "received fatal alert: CertificateRequired",
          tls: { handshake: true, authorized: true, peerChain: [] },
        }),
    },
  }));
  assert.deepEqual([refused.status, refused.detail], [
    "ok",
    "refused: received fatal alert: CertificateRequired",
  ]);
  // No certificate: a plain CONNECT (identify-only needs one), which a broker must refuse.
  const open = await byId("broker.no-cert").run(
    fakeContext({
      net: {
        mqttProbe: () =>
          Promise.resolve(handshake({ outcome: "accepted", returnCode: 0, detail: "CONNACK 0" })),
      },
    }),
  );
  assert.equal(open.status, "fail");
  assert.match(open.hint!, /require_certificate true/);
});

Deno.test("broker.certificate: SPIFFE ID, DNS SAN and issuer checked", async () => {
  const ok = await byId("broker.certificate").run(
    fakeContext({
      now: Date.now(),
      spire: fetchOk,
      net: { mqttProbe: () => Promise.resolve(handshake()) },
    }),
  );
  assert.equal(ok.status, "ok");
  assert.match(ok.detail, /^spiffe:\/\/k8s4r\.example\.org\/mqtt-broker, DNS localhost/);
  const wrong = ca.issue({ spiffeId: `spiffe://${TD}/robot/robot-001`, dnsNames: ["robot-001"] });
  const bad = await byId("broker.certificate").run(fakeContext({
    now: Date.now(),
    spire: fetchOk,
    net: {
      mqttProbe: () => Promise.resolve(handshake({ peerChain: splitDer(wrong.chainDer) })),
    },
  }));
  assert.equal(bad.status, "fail");
  assert.match(bad.detail, /expected spiffe:\/\/k8s4r\.example\.org\/mqtt-broker/);
});

Deno.test("docker.container: running passes; exited fails with its last log lines (argv recorded)", async () => {
  const ok = await byId("docker.container").run(
    fakeContext({ runner: new RecordingRunner(() => ({ stdout: "running 0\n" })) }),
  );
  assert.equal(ok.detail, "k8s4r-mosquitto-test is running");
  const runner = new RecordingRunner((_c, args) =>
    args[0] === "inspect"
      ? { stdout: "exited 1\n" }
      : { stderr: "Error: Unable to open config file\n" }
  );
  const bad = await byId("docker.container").run(fakeContext({ runner }));
  assert.equal(
    bad.detail,
    "k8s4r-mosquitto-test is exited (exit code 1): Error: Unable to open config file",
  );
  assert.deepEqual(runner.calls.map((c) => c.args), [
    ["inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", "k8s4r-mosquitto-test"],
    ["logs", "--tail", "20", "k8s4r-mosquitto-test"],
  ]);
});

Deno.test("docker.engine: unreachable engine fails", async () => {
  const r = await byId("docker.engine").run(
    fakeContext({
      runner: new RecordingRunner(() => ({
        code: 1,
        stderr: "Cannot connect to the Docker daemon\n",
      })),
    }),
  );
  assert.equal(r.status, "fail");
  assert.equal(
    (await byId("docker.engine").run(
      fakeContext({ runner: new RecordingRunner(() => ({ stdout: "27.0\n" })) }),
    )).status,
    "ok",
  );
});

Deno.test("server.healthz and server.robot", async () => {
  const urls: string[] = [];
  const http = (status: number, body: unknown) => ({
    httpGet: (u: string) => (urls.push(u), Promise.resolve({ status, body: JSON.stringify(body) })),
  });
  assert.equal(
    (await byId("server.healthz").run(fakeContext({ net: http(200, { ok: true }) }))).status,
    "ok",
  );
  const down = await byId("server.healthz").run(
    fakeContext({ net: http(503, { mqtt: { connected: false } }) }),
  );
  assert.equal(
    down.detail,
    "GET https://localhost:8090/healthz answered 503: not connected to the broker",
  );
  // The registry refuses every write: the doctor fails and says where to look.
  const writes = await byId("server.healthz").run(
    fakeContext({
      net: http(503, {
        ok: false,
        problems: [
          "registry: writes failing since 2030-01-01T00:00:00.000Z: database or disk is full",
        ],
        mqtt: { connected: true },
      }),
    }),
  );
  assert.equal(writes.status, "fail");
  assert.match(writes.detail, /answered 503: registry: writes failing since .*disk is full/);
  assert.match(writes.hint ?? "", /registry refuses writes.*df -h.*read-only standby/);
  const reads = await byId("server.healthz").run(
    fakeContext({
      net: http(503, { ok: false, problems: ["registry: reads fail: no answer within 1.5 s"] }),
    }),
  );
  assert.match(reads.hint ?? "", /registry does not answer: start its database/);
  const noRegistry = await byId("server.healthz").run(
    fakeContext({
      net: http(503, {
        mqtt: { connected: true },
        problems: ["registry: postgres://k8s4r@127.0.0.1:5432/fleet: connect ECONNREFUSED"],
      }),
    }),
  );
  assert.equal(noRegistry.status, "fail");
  assert.match(noRegistry.detail, /answered 503: registry: .*ECONNREFUSED$/);
  assert.match(noRegistry.hint ?? "", /registry does not answer: start its database/);
  assert.equal(
    (await byId("server.robot").run(
      fakeContext({ net: http(200, { id: "robot-001", online: true }) }),
    )).detail,
    "robot-001 is online",
  );
  assert.equal(urls.at(-1), "https://localhost:8090/api/robots/robot-001");
  const forbidden = await byId("server.robot").run(
    fakeContext({ net: http(403, { error: "operator vera is a viewer" }) }),
  );
  assert.equal(forbidden.status, "fail");
  assert.match(forbidden.detail, /answered 403: operator vera is a viewer/);
  assert.match(forbidden.hint ?? "", /operator login/);
  const off = await byId("server.robot").run(
    fakeContext({
      net: http(200, {
        online: false,
        offlineReason: "heartbeat timeout",
        lastSeen: "2030-01-01T00:00:00Z",
      }),
    }),
  );
  assert.equal(
    off.detail,
    "robot-001 is offline (heartbeat timeout), last seen 2030-01-01T00:00:00Z",
  );
});
