// The MQTT CONNECT probe (src/mqtt/probe.ts) against a REAL mosquitto with k8s4r's generated
// config: each outcome it reports is what the real broker does, with a positive control next to
// every refusal.
import assert from "node:assert/strict";
import mqtt from "mqtt";
import { TestCa } from "../src/spiffe/testing/test_ca.ts";
import { probeMqtt } from "../src/mqtt/probe.ts";
import { startTestBroker, TEST_TRUST_DOMAIN } from "./helpers/broker.ts";

Deno.test({
  name: "probe vs real mosquitto: password and mTLS logins, each refusal told apart",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async (t) => {
    const b = await startTestBroker();
    try {
      const ca = await Deno.readTextFile(b.caFile);
      const robot = await b.issueCert("robot-001");

      await t.step(
        "plain listener: the server's password in, a wrong one and none refused (5)",
        async () => {
          const ok = await probeMqtt({ port: b.plainPort, ...b.server });
          assert.deepEqual([ok.ok, ok.outcome, ok.returnCode], [true, "accepted", 0], ok.detail);
          const wrong = await probeMqtt({ port: b.plainPort, ...b.server, password: "nope" });
          assert.deepEqual([wrong.ok, wrong.outcome, wrong.returnCode], [false, "refused", 5]);
          const anon = await probeMqtt({ port: b.plainPort });
          assert.deepEqual([anon.outcome, anon.returnCode], ["refused", 5]);
        },
      );

      await t.step("mTLS listener: a certificate of the trusted CA is accepted", async () => {
        const r = await probeMqtt({
          port: b.tlsPort,
          tls: { ca, cert: robot.cert, key: robot.key },
        });
        assert.deepEqual([r.ok, r.outcome, r.returnCode], [true, "accepted", 0], r.detail);
        assert.equal(r.tls?.authorized, true);
        assert.match(r.tls?.protocol ?? "", /^TLSv1\.[23]$/);
        assert.ok(r.tls!.peerChain.length >= 1);
      });

      await t.step(
        "identifyOnly: a robot's own certificate is identified (0x8c) while its agent stays connected; a normal CONNECT kicks it (control); no CN is refused (0x86)",
        async () => {
          const agent = await mqtt.connectAsync(b.tlsUrl, {
            key: robot.key,
            cert: robot.cert,
            ca,
            servername: "localhost",
            clientId: "robot-001",
            protocolVersion: 5,
            clean: false,
            properties: { sessionExpiryInterval: 3600 },
            reconnectPeriod: 0,
          });
          let closes = 0;
          const closed = new Promise<void>((r) => agent.on("close", () => (closes++, r())));
          try {
            const marker = `m-${crypto.randomUUID().slice(0, 8)}`;
            await agent.subscribeAsync("k8s4r/robots/robot-001/down/#", { qos: 1 });
            const r = await probeMqtt({
              port: b.tlsPort,
              clientId: "k8s4r-doctor-robot-001-x",
              identifyOnly: true,
              tls: { ca, cert: robot.cert, key: robot.key },
            });
            assert.deepEqual([r.ok, r.outcome, r.returnCode], [true, "identified", 0x8c], r.detail);
            // Still connected and delivering: a message the server sends it now arrives.
            const srv = await mqtt.connectAsync(b.plainUrl, {
              ...b.server,
              protocolVersion: 5,
              reconnectPeriod: 0,
            });
            const got = new Promise<string>((res) => agent.on("message", (_t, p) => res(`${p}`)));
            await srv.publishAsync("k8s4r/robots/robot-001/down/task", marker, { qos: 1 });
            assert.equal(await got, marker);
            srv.end(true);
            assert.equal(closes, 0, "the identify-only probe kicked the robot's session");

            const noCn = b.ca.ca.issue({ spiffeId: `spiffe://${TEST_TRUST_DOMAIN}/robot/x` });
            const r2 = await probeMqtt({
              port: b.tlsPort,
              identifyOnly: true,
              tls: { ca, cert: noCn.chainPem, key: noCn.keyPem },
            });
            assert.deepEqual([r2.ok, r2.outcome, r2.returnCode], [false, "refused", 0x86]);
            const pw = await probeMqtt({ port: b.plainPort, ...b.server, identifyOnly: true });
            assert.deepEqual([pw.ok, pw.outcome], [false, "error"], "identifyOnly on a password");

            // The control: a normal CONNECT with the same certificate gets the CN as its client
            // id (use_username_as_clientid) and takes the agent's session over.
            const plain = await probeMqtt({
              port: b.tlsPort,
              clientId: "k8s4r-doctor-robot-001-y",
              tls: { ca, cert: robot.cert, key: robot.key },
            });
            assert.equal(plain.outcome, "accepted", plain.detail);
            await closed;
            assert.equal(closes, 1);
          } finally {
            agent.end(true);
          }
        },
      );

      await t.step("mTLS listener: no client certificate is refused in TLS", async () => {
        const r = await probeMqtt({ port: b.tlsPort, tls: { ca } });
        console.log(`no certificate: ${r.outcome}: ${r.detail}`);
        assert.equal(r.ok, false);
        assert.equal(r.returnCode, undefined, r.detail);
        // TLS 1.3: the refusal is an alert after the client's side of the handshake.
        assert.equal(r.outcome, "tls-error", r.detail);
        assert.match(r.detail, /alert: ?certificate ?required/i);
        assert.equal(r.tls?.handshake, true);
        assert.equal(r.tls?.authorized, true, "the client did trust the real broker");
      });

      await t.step("mTLS listener: a certificate of another CA is refused in TLS", async () => {
        const foreign = TestCa.create({ trustDomain: TEST_TRUST_DOMAIN }).issue({
          spiffeId: `spiffe://${TEST_TRUST_DOMAIN}/robot/robot-001`,
          dnsNames: ["robot-001"],
        });
        const r = await probeMqtt({
          port: b.tlsPort,
          tls: { ca, cert: foreign.chainPem, key: foreign.keyPem },
        });
        console.log(`foreign CA: ${r.outcome}: ${r.detail}`);
        assert.equal(r.outcome, "tls-error", r.detail);
        assert.match(r.detail, /alert: ?unknown ?ca/i);
      });

      await t.step("a client that does not trust the broker sends no CONNECT", async () => {
        const other = TestCa.create({ trustDomain: TEST_TRUST_DOMAIN });
        const r = await probeMqtt({
          port: b.tlsPort,
          tls: { ca: other.rootPem, cert: robot.cert, key: robot.key },
        });
        assert.deepEqual([r.ok, r.outcome], [false, "tls-error"]);
        assert.match(r.detail, /the broker's certificate is not trusted/);
      });

      await t.step("TLS against the plain listener, and a stopped broker", async () => {
        const r = await probeMqtt({ port: b.plainPort, tls: { ca } });
        console.log(`TLS to the plain port: ${r.outcome}: ${r.detail}`);
        assert.equal(r.outcome, "tls-error", r.detail);
        assert.equal(r.tls?.handshake, false);
        await b.kill9();
        const down = await probeMqtt({ port: b.plainPort, ...b.server });
        assert.deepEqual([down.outcome, down.code], ["connection-refused", "ECONNREFUSED"]);
        await b.start();
        const back = await probeMqtt({ port: b.plainPort, ...b.server });
        assert.equal(back.ok, true, back.detail);
      });
    } finally {
      await b.stop();
    }
  },
});
