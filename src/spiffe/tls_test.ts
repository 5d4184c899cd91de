import assert from "node:assert/strict";
import * as tls from "node:tls";
import type { AddressInfo } from "node:net";
import { X509Bundle, X509BundleSet } from "./bundle.ts";
import { parseSpiffeId } from "./id.ts";
import { StaticX509Source } from "./source.ts";
import { parseX509Svid } from "./svid.ts";
import { mutuallyIssuingChain, TestCa } from "./testing/test_ca.ts";
import { MAX_CHAIN_CERTS, verifyX509Svid } from "./verify.ts";
import {
  authorizeAny,
  authorizeId,
  authorizeIf,
  authorizeMemberOf,
  authorizeOneOf,
  mtlsClientOptions,
  mtlsServerOptions,
  peerChain,
} from "./tls.ts";

const ca = TestCa.create({ trustDomain: "td" });
const bundles = new X509BundleSet([X509Bundle.fromDer("td", ca.rootDer)]);

function source(spiffeId: string, issuer = ca, dnsNames?: string[]): StaticX509Source {
  const s = issuer.issue({ spiffeId, dnsNames });
  return new StaticX509Source(parseX509Svid(s.chainDer, s.keyDer), bundles);
}

Deno.test("authorizers", () => {
  const id = parseSpiffeId("spiffe://td/robot/robot-001");
  assert.equal(authorizeId("spiffe://td/robot/robot-001")(id), undefined);
  assert.equal(
    authorizeId("spiffe://td/mqtt-broker")(id)?.message,
    "unexpected peer ID spiffe://td/robot/robot-001: expected spiffe://td/mqtt-broker",
  );
  assert.equal(authorizeOneOf("spiffe://td/x", id)(id), undefined);
  assert.match(
    authorizeOneOf("spiffe://td/x")(id)?.message ?? "",
    /expected one of spiffe:\/\/td\/x/,
  );
  assert.equal(authorizeAny()(id), undefined);
  assert.equal(authorizeMemberOf("td")(id), undefined);
  assert.equal(
    authorizeMemberOf("other.org")(id)?.message,
    "unexpected peer ID spiffe://td/robot/robot-001: expected a member of trust domain other.org",
  );
  assert.equal(authorizeIf("a robot", (i) => i.path.startsWith("/robot/"))(id), undefined);
  assert.match(authorizeIf("a broker", () => false)(id)?.message ?? "", /expected a broker$/);
});

Deno.test("StaticX509Source.set notifies listeners", () => {
  const src = source("spiffe://td/a");
  let n = 0;
  const off = src.onUpdate(() => n++);
  src.set(source("spiffe://td/b").getX509Svid());
  off();
  src.set(source("spiffe://td/c").getX509Svid());
  assert.equal(n, 1);
  assert.equal(src.getX509Svid().id.toString(), "spiffe://td/c");
});

/** Runs one mTLS handshake; resolves with what each side saw. */
async function handshake(
  serverSrc: StaticX509Source,
  serverAuthz: ReturnType<typeof authorizeAny>,
  clientSrc: StaticX509Source,
  clientAuthz: ReturnType<typeof authorizeAny>,
): Promise<{ clientError?: string; serverSawId?: string; serverError?: string }> {
  const opts = mtlsServerOptions(serverSrc, serverAuthz);
  const result: { clientError?: string; serverSawId?: string; serverError?: string } = {};
  let serverDone!: () => void;
  const serverSeen = new Promise<void>((r) => (serverDone = r));
  const server = tls.createServer(opts, (socket) => {
    const r = opts.authorizePeer(socket);
    if (r.id) result.serverSawId = r.id.toString();
    if (r.error) result.serverError = r.error.message;
    socket.end();
    serverDone();
  });
  server.on("tlsClientError", () => serverDone());
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as AddressInfo).port;
  try {
    await new Promise<void>((resolve) => {
      // The hostname is deliberately wrong: identity comes from the SPIFFE ID, not DNS.
      const sock = tls.connect({
        ...mtlsClientOptions(clientSrc, clientAuthz),
        host: "127.0.0.1",
        port,
        servername: "not-the-broker.invalid",
      });
      sock.on("secureConnect", () => sock.end());
      sock.on("error", (e) => {
        result.clientError = e.message;
        resolve();
      });
      sock.on("close", () => resolve());
      sock.resume();
    });
    await serverSeen;
  } finally {
    await new Promise<void>((r) => server.close(() => r()));
  }
  return result;
}

Deno.test("mTLS options authorize both sides by SPIFFE ID", async () => {
  const broker = source("spiffe://td/mqtt-broker", ca, ["localhost"]);
  const robot = source("spiffe://td/robot/robot-001");
  const ok = await handshake(
    broker,
    authorizeMemberOf("td"),
    robot,
    authorizeId("spiffe://td/mqtt-broker"),
  );
  assert.deepEqual(ok, { serverSawId: "spiffe://td/robot/robot-001" });
});

Deno.test("mTLS client refuses a server with the wrong SPIFFE ID", async () => {
  const broker = source("spiffe://td/not-the-broker");
  const robot = source("spiffe://td/robot/robot-001");
  const r = await handshake(broker, authorizeAny(), robot, authorizeId("spiffe://td/mqtt-broker"));
  assert.equal(
    r.clientError,
    "unexpected peer ID spiffe://td/not-the-broker: expected spiffe://td/mqtt-broker",
  );
});

Deno.test("mTLS server reports a client it does not authorize", async () => {
  const broker = source("spiffe://td/mqtt-broker");
  const robot = source("spiffe://td/robot/robot-001");
  const r = await handshake(
    broker,
    authorizeId("spiffe://td/robot/robot-002"),
    robot,
    authorizeAny(),
  );
  assert.equal(
    r.serverError,
    "unexpected peer ID spiffe://td/robot/robot-001: expected spiffe://td/robot/robot-002",
  );
});

Deno.test("mTLS rejects a peer certificate from an untrusted CA", async () => {
  const impostorCa = TestCa.create({ trustDomain: "td", commonName: "impostor" });
  const broker = source("spiffe://td/mqtt-broker", impostorCa);
  const robot = source("spiffe://td/robot/robot-001");
  const r = await handshake(broker, authorizeAny(), robot, authorizeAny());
  assert.ok(r.clientError, "the handshake must fail");
  assert.equal(r.serverSawId, undefined);
});

Deno.test("peerChain takes at most one certificate more than the verifier accepts", () => {
  // node:tls's detailed form: each certificate links to its issuer; the root to itself.
  type Linked = { raw: Uint8Array; issuerCertificate?: Linked };
  const link = (ders: Uint8Array[]): Linked => {
    const nodes: Linked[] = ders.map((raw) => ({ raw }));
    nodes.forEach((n, i) => (n.issuerCertificate = nodes[i + 1] ?? n));
    return nodes[0];
  };
  const hostile = mutuallyIssuingChain({ spiffeId: "spiffe://td/attacker", count: 19 });
  const ders = hostile.certificates.map((c) => new Uint8Array(c.raw));
  const long = peerChain(link(ders) as unknown as tls.PeerCertificate);
  assert.equal(long.length, MAX_CHAIN_CERTS + 1);
  assert.deepEqual(
    long.map((c) => c.fingerprint256),
    hostile.certificates.slice(0, MAX_CHAIN_CERTS + 1).map((c) => c.fingerprint256),
  );
  // Control: a real chain (leaf, intermediate, root) comes through whole.
  const s = ca.intermediate().issue({ spiffeId: "spiffe://td/a" });
  const real = peerChain(
    link(
      [...s.certificates, ca.root].map((c) => new Uint8Array(c.raw)),
    ) as unknown as tls.PeerCertificate,
  );
  assert.equal(real.length, 3);
  assert.equal(verifyX509Svid(real, bundles).toString(), "spiffe://td/a");
});
