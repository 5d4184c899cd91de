// The MQTT CONNECT probe (src/mqtt/probe.ts) against a REAL mosquitto with k8s4r's generated
// config: each outcome it reports is what the real broker does, with a positive control next to
// every refusal.
import assert from "node:assert/strict";
import { TestCa } from "../src/spiffe/testing/test_ca.ts";
import { probeMqtt } from "../src/mqtt/probe.ts";
import { startTestBroker, TEST_TRUST_DOMAIN } from "./helpers/broker.ts";

Deno.test({
  name: "probe vs real mosquitto: password and mTLS logins, each refusal told apart",
  sanitizeResources: false,
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
