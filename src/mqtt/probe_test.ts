// The MQTT CONNECT probe against fake brokers (node:net and node:tls servers on loopback) for
// each outcome. The real-broker cases are in tests/mqtt_probe_test.ts.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import * as net from "node:net";
import * as tls from "node:tls";
import { TestCa } from "../spiffe/testing/test_ca.ts";
import { probeMqtt } from "./probe.ts";
import { PROBE_AUTH_METHOD } from "./wire.ts";

interface Fake {
  port: number;
  /** Everything each connection sent, in order. */
  received: Buffer[];
  closed: Promise<void>;
  close(): Promise<void>;
}

/** A fake broker: `onData` answers each chunk a client sends (or does nothing). */
async function fakeBroker(
  onData: (s: net.Socket, d: Buffer) => void,
  opts: { tls?: tls.TlsOptions } = {},
): Promise<Fake> {
  const received: Buffer[] = [];
  const sockets = new Set<net.Socket>();
  const closed = Promise.withResolvers<void>();
  const handle = (s: net.Socket) => {
    sockets.add(s);
    s.on("data", (d: Buffer) => {
      received.push(d);
      onData(s, d);
    });
    s.on("error", () => {});
    s.on("close", () => {
      sockets.delete(s);
      closed.resolve();
    });
  };
  const server = opts.tls ? tls.createServer(opts.tls, handle) : net.createServer(handle);
  server.on("tlsClientError", () => {});
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    port: (server.address() as net.AddressInfo).port,
    received,
    closed: closed.promise,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise((r) => server.close(r));
    },
  };
}

const connack = (rc: number) => Buffer.from([0x20, 2, 0, rc]);

Deno.test("probe: CONNACK 0 is accepted; the CONNECT carries the credentials, then DISCONNECT", async () => {
  const b = await fakeBroker((s, d) => d[0] === 0x10 && s.write(connack(0)));
  try {
    const r = await probeMqtt({ port: b.port, username: "k8s4r-server", password: "s3cret" });
    assert.deepEqual([r.ok, r.outcome, r.returnCode], [true, "accepted", 0]);
    assert.equal(r.detail, `127.0.0.1:${b.port}: CONNACK 0 (accepted)`);
    assert.equal(r.tls, undefined);
    await b.closed;
    const all = Buffer.concat(b.received);
    assert.equal(all[0], 0x10);
    assert.ok(all.includes(Buffer.from("k8s4r-server")) && all.includes(Buffer.from("s3cret")));
    assert.deepEqual([...all.subarray(all.length - 2)], [0xe0, 0x00], "no DISCONNECT at the end");
  } finally {
    await b.close();
  }
});

Deno.test("probe: CONNACK 4 and 5 are refusals with their return code", async () => {
  for (const rc of [4, 5]) {
    const b = await fakeBroker((s) => s.write(connack(rc)));
    try {
      const r = await probeMqtt({ port: b.port, username: "u", password: "p" });
      assert.deepEqual([r.ok, r.outcome, r.returnCode], [false, "refused", rc]);
      assert.match(
        r.detail,
        rc === 4 ? /CONNACK 4 \(bad user name or password\)$/ : /CONNACK 5 \(not authorized\)$/,
      );
    } finally {
      await b.close();
    }
  }
});

Deno.test("probe: nothing listening is connection-refused", async () => {
  const b = await fakeBroker(() => {});
  const port = b.port;
  await b.close();
  const r = await probeMqtt({ port, timeoutMs: 2000 });
  assert.deepEqual([r.ok, r.outcome, r.returnCode, r.code], [
    false,
    "connection-refused",
    undefined,
    "ECONNREFUSED",
  ]);
  assert.equal(r.detail, `127.0.0.1:${port}: connection refused (nothing listens)`);
});

Deno.test("probe: a broker that closes before CONNACK, or answers something else", async () => {
  const closer = await fakeBroker((s) => s.end());
  try {
    const r = await probeMqtt({ port: closer.port });
    assert.deepEqual([r.ok, r.outcome], [false, "closed"]);
    assert.match(r.detail, /connection closed before CONNACK/);
  } finally {
    await closer.close();
  }
  const http = await fakeBroker((s) => s.write("HTTP/1.1 400 Bad Request\r\n\r\n"));
  try {
    const r = await probeMqtt({ port: http.port });
    assert.deepEqual([r.ok, r.outcome], [false, "protocol-error"]);
    assert.match(r.detail, /expected CONNACK, got packet type 0x48/);
  } finally {
    await http.close();
  }
});

Deno.test("probe: a broker that accepts the connection and never answers times out at CONNACK", async () => {
  const mute = await fakeBroker(() => {});
  try {
    const r = await probeMqtt({ port: mute.port, timeoutMs: 150 });
    assert.deepEqual([r.ok, r.outcome], [false, "timeout"]);
    assert.equal(r.detail, `127.0.0.1:${mute.port}: no CONNACK within 150 ms`);
    assert.equal(mute.received[0]?.[0], 0x10, "the CONNECT was not sent");
  } finally {
    await mute.close();
  }
});

Deno.test("probe: an abort signal ends it at once", async () => {
  const mute = await fakeBroker(() => {});
  try {
    const ac = new AbortController();
    const p = probeMqtt({ port: mute.port, timeoutMs: 60_000, signal: ac.signal });
    ac.abort(new Error("stop"));
    const r = await p;
    assert.deepEqual([r.ok, r.outcome], [false, "aborted"]);
  } finally {
    await mute.close();
  }
});

// --- TLS ---------------------------------------------------------------------------------------

const TD = "k8s4r.test";
const ca = TestCa.create({ trustDomain: TD });
const brokerCert = ca.issue({ spiffeId: `spiffe://${TD}/mqtt-broker`, dnsNames: ["localhost"] });
const client = ca.issue({ spiffeId: `spiffe://${TD}/robot/r1`, dnsNames: ["r1"] });
const other = TestCa.create({ trustDomain: TD });
const serverTls: tls.TlsOptions = {
  cert: brokerCert.chainPem,
  key: brokerCert.keyPem,
  ca: ca.rootPem,
  requestCert: true,
  rejectUnauthorized: false,
};

/** Answers CONNACK 0 to a client with a certificate of `ca`, CONNACK 5 otherwise. */
function mtlsBroker(s: net.Socket, d: Buffer) {
  if (d[0] !== 0x10) return;
  const t = s as tls.TLSSocket;
  s.write(connack(t.authorized ? 0 : 5));
}

Deno.test("probe (TLS): mTLS accepted; the broker's chain and the handshake are reported", async () => {
  const b = await fakeBroker(mtlsBroker, { tls: serverTls });
  try {
    const r = await probeMqtt({
      port: b.port,
      tls: { ca: ca.rootPem, cert: client.chainPem, key: client.keyPem },
    });
    assert.deepEqual([r.ok, r.outcome, r.returnCode], [true, "accepted", 0], r.detail);
    assert.equal(r.detail, `127.0.0.1:${b.port} (mTLS): CONNACK 0 (accepted)`);
    assert.equal(r.tls?.handshake, true);
    assert.equal(r.tls?.authorized, true);
    assert.match(r.tls?.protocol ?? "", /^TLSv1\.[23]$/);
    assert.ok(r.tls!.peerChain.length >= 1);
    assert.deepEqual(r.tls!.peerChain[0], new Uint8Array(brokerCert.certificate.raw));
    // Control: the same broker refuses a client without a certificate (CONNACK 5).
    const anon = await probeMqtt({ port: b.port, tls: { ca: ca.rootPem } });
    assert.deepEqual([anon.ok, anon.outcome, anon.returnCode], [false, "refused", 5]);
    assert.equal(anon.detail, `127.0.0.1:${b.port} (TLS): CONNACK 5 (not authorized)`);
  } finally {
    await b.close();
  }
});

Deno.test("probe (TLS): an untrusted broker is a tls-error and gets no CONNECT; verify:false reports it and goes on", async () => {
  const b = await fakeBroker(mtlsBroker, { tls: serverTls });
  try {
    const r = await probeMqtt({
      port: b.port,
      tls: { ca: other.rootPem, cert: client.chainPem, key: client.keyPem },
    });
    assert.deepEqual([r.ok, r.outcome, r.returnCode], [false, "tls-error", undefined]);
    assert.match(r.detail, /\(mTLS\): TLS: the broker's certificate is not trusted: /);
    assert.equal(r.tls?.handshake, true);
    assert.equal(r.tls?.authorized, false);
    assert.ok(r.tls?.authorizationError);
    assert.ok(!Buffer.concat(b.received).includes(0x10), "a CONNECT went to an untrusted broker");

    const loose = await probeMqtt({
      port: b.port,
      tls: { ca: other.rootPem, cert: client.chainPem, key: client.keyPem, verify: false },
    });
    assert.deepEqual([loose.ok, loose.returnCode, loose.tls?.authorized], [true, 0, false]);
  } finally {
    await b.close();
  }
});

Deno.test("probe (TLS): a certificate for another name is a tls-error", async () => {
  const b = await fakeBroker(mtlsBroker, { tls: serverTls });
  try {
    const r = await probeMqtt({
      port: b.port,
      tls: {
        ca: ca.rootPem,
        cert: client.chainPem,
        key: client.keyPem,
        servername: "broker.example",
      },
    });
    assert.deepEqual([r.ok, r.outcome], [false, "tls-error"]);
    assert.match(r.detail, /TLS: the broker's certificate is not for broker\.example: /);
  } finally {
    await b.close();
  }
});

Deno.test("probe (TLS): a peer that never speaks TLS times out in the handshake", async () => {
  const mute = await fakeBroker(() => {});
  try {
    const r = await probeMqtt({ port: mute.port, timeoutMs: 150, tls: { ca: ca.rootPem } });
    assert.deepEqual([r.ok, r.outcome], [false, "timeout"]);
    assert.equal(r.detail, `127.0.0.1:${mute.port} (TLS): no TLS handshake within 150 ms`);
    assert.equal(r.tls?.handshake, false);
  } finally {
    await mute.close();
  }
});

Deno.test("probe (TLS): a plain MQTT listener answering a TLS hello is a tls-error", async () => {
  const plain = await fakeBroker((s) => s.end(connack(0)));
  try {
    const r = await probeMqtt({ port: plain.port, timeoutMs: 2000, tls: { ca: ca.rootPem } });
    assert.deepEqual([r.ok, r.outcome], [false, "tls-error"], r.detail);
    assert.equal(r.tls?.handshake, false);
  } finally {
    await plain.close();
  }
});

Deno.test("probe (TLS, identifyOnly): an MQTT 5 CONNECT with the probe's auth method; CONNACK 0x8c is identified, and no DISCONNECT follows", async () => {
  // What Mosquitto does (tests/mqtt_probe_test.ts): 0x8c "bad authentication method" to a
  // certificate with a CN, after taking its identity, and closes; 0x86 without a CN.
  const b = await fakeBroker((s, d) => {
    if (d[0] !== 0x10) return;
    s.end(Buffer.from([0x20, 3, 0, d.includes(Buffer.from(PROBE_AUTH_METHOD)) ? 0x8c : 0, 0]));
  }, { tls: serverTls });
  try {
    const r = await probeMqtt({
      port: b.port,
      identifyOnly: true,
      tls: { ca: ca.rootPem, cert: client.chainPem, key: client.keyPem },
    });
    assert.deepEqual([r.ok, r.outcome, r.returnCode], [true, "identified", 0x8c], r.detail);
    assert.match(r.detail, /CONNACK 0x8c \(bad authentication method\)/);
    const sent = Buffer.concat(b.received);
    assert.equal(sent[0], 0x10, "a CONNECT");
    assert.equal(sent.indexOf(Buffer.from([0x00, 0x04, 77, 81, 84, 84, 0x05])), 2, "MQTT 5");
    assert.ok(!sent.includes(0xe0), "no DISCONNECT after 0x8c: there is no connection to end");
    // Without a certificate, or with a password, identifyOnly proves nothing: refused up front.
    const anon = await probeMqtt({ port: b.port, identifyOnly: true, tls: { ca: ca.rootPem } });
    assert.deepEqual([anon.ok, anon.outcome], [false, "error"]);
    assert.match(anon.detail, /identifyOnly needs a client certificate/);
  } finally {
    await b.close();
  }
});
