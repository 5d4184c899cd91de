import assert from "node:assert/strict";
import { BundleError, X509Bundle, X509BundleSet } from "./bundle.ts";
import { concatDer } from "./der.ts";
import { TestCa } from "./testing/test_ca.ts";

Deno.test("X509Bundle round-trips DER and PEM and compares", () => {
  const a = TestCa.create({ trustDomain: "td" });
  const b = TestCa.create({ trustDomain: "td" });
  const der = concatDer([a.rootDer, b.rootDer]);
  const bundle = X509Bundle.fromDer("td", der);
  assert.equal(bundle.trustDomain.name, "td");
  assert.equal(bundle.authorities.length, 2);
  assert.deepEqual(bundle.toDer(), der);
  assert.equal(bundle.toPem(), a.rootPem + b.rootPem);
  const fromPem = X509Bundle.fromPem("spiffe://td", bundle.toPem());
  assert.ok(fromPem.equals(bundle));
  assert.ok(!X509Bundle.fromDer("td", a.rootDer).equals(bundle));
  assert.ok(!X509Bundle.fromDer("other", der).equals(bundle));
  assert.ok(bundle.hasAuthority(b.root));
  assert.equal(bundle.getX509BundleForTrustDomain("spiffe://td"), bundle);
  assert.equal(bundle.getX509BundleForTrustDomain("x"), undefined);
});

Deno.test("X509Bundle rejects bad input with clear errors", () => {
  const a = TestCa.create({ trustDomain: "td" });
  assert.throws(() => X509Bundle.fromDer("td", new Uint8Array()), {
    name: "BundleError",
    message: "X.509 bundle for td is empty",
  });
  assert.throws(
    () => X509Bundle.fromDer("td", a.rootDer.subarray(0, 50)),
    (e: unknown) =>
      e instanceof BundleError &&
      /^X\.509 bundle for td: certificate 1: truncated DER/.test(e.message),
  );
  assert.throws(() => X509Bundle.fromPem("td", "hello"), {
    message: "X.509 bundle for td: no PEM block found",
  });
  assert.throws(() => X509Bundle.fromPem("td", a.rootPem.replace("MII", "M!I")), {
    message: "X.509 bundle for td: block 1 (CERTIFICATE) is not valid base64",
  });
  assert.throws(() => X509Bundle.fromDer("Bad TD", a.rootDer), /invalid trust domain/);
});

Deno.test("X509BundleSet keeps one bundle per trust domain", () => {
  const a = X509Bundle.fromDer("a.org", TestCa.create({ trustDomain: "a.org" }).rootDer);
  const b = X509Bundle.fromDer("b.org", TestCa.create({ trustDomain: "b.org" }).rootDer);
  const a2 = X509Bundle.fromDer("a.org", TestCa.create({ trustDomain: "a.org" }).rootDer);
  const set = new X509BundleSet([b, a]);
  assert.equal(set.size, 2);
  assert.deepEqual(set.bundles().map((x) => x.trustDomain.name), ["a.org", "b.org"]);
  assert.equal(set.get("spiffe://a.org"), a);
  set.add(a2);
  assert.equal(set.size, 2);
  assert.equal(set.getX509BundleForTrustDomain("a.org"), a2);
  assert.ok(!set.equals(new X509BundleSet([a, b])));
  assert.ok(set.equals(new X509BundleSet([a2, b])));
  assert.ok(set.remove("b.org"));
  assert.ok(!set.has("b.org"));
});
