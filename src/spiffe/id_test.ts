import assert from "node:assert/strict";
import {
  parseSpiffeId,
  parseTrustDomain,
  SpiffeId,
  SpiffeIdError,
  TrustDomainError,
  tryParseSpiffeId,
} from "./id.ts";

Deno.test("parseSpiffeId accepts valid IDs and keeps their parts", () => {
  const id = parseSpiffeId("spiffe://k8s4r.example.org/robot/robot-001");
  assert.equal(id.trustDomain.name, "k8s4r.example.org");
  assert.equal(id.path, "/robot/robot-001");
  assert.equal(id.toString(), "spiffe://k8s4r.example.org/robot/robot-001");
  assert.equal(JSON.stringify({ id }), '{"id":"spiffe://k8s4r.example.org/robot/robot-001"}');
  for (
    const ok of [
      "spiffe://td",
      "spiffe://a-b_c.d9/x",
      "spiffe://td/A.b-C_9/..x/.y",
      "spiffe://td/" + "a".repeat(2048 - "spiffe://td/".length),
    ]
  ) {
    assert.equal(parseSpiffeId(ok).toString(), ok);
  }
  assert.ok(parseSpiffeId("spiffe://td").isTrustDomainId());
});

Deno.test("parseSpiffeId names the broken rule", () => {
  const cases: Array<[string, string]> = [
    ["", "ID is empty"],
    ["example.org/robot", "scheme is missing (expected 'spiffe://')"],
    ["https://example.org/robot", "scheme must be 'spiffe://', got 'https:'"],
    ["SPIFFE://example.org/robot", "scheme must be lowercase 'spiffe://'"],
    ["spiffe:/example.org", "scheme must be 'spiffe://', got 'spiffe:'"],
    ["spiffe://", "trust domain is missing"],
    ["spiffe:///robot", "trust domain is missing"],
    ["spiffe://Example.org/robot", "trust domain must be lowercase (found 'E' at position 1)"],
    ["spiffe://example.org:8080/robot", "a port is not allowed in the trust domain"],
    ["spiffe://user@example.org/robot", "userinfo is not allowed in the trust domain"],
    ["spiffe://exa%6dple.org", "percent-encoding is not allowed in the trust domain"],
    [
      "spiffe://exam ple.org",
      `trust domain characters are limited to lowercase letters, digits, '.', '-' and '_' (found " " at position 5)`,
    ],
    ["spiffe://example.org/robot?x=1", "a query ('?') is not allowed"],
    ["spiffe://example.org/robot#frag", "a fragment ('#') is not allowed"],
    ["spiffe://example.org/", "path cannot be '/' alone (a trust domain ID has no path)"],
    ["spiffe://example.org/robot/", "path cannot have a trailing slash"],
    ["spiffe://example.org//robot", "path cannot contain empty segments ('//')"],
    ["spiffe://example.org/a/./b", "path cannot contain '.' segments"],
    ["spiffe://example.org/a/../b", "path cannot contain '..' segments"],
    ["spiffe://example.org/a%20b", "percent-encoding is not allowed in the path"],
    [
      "spiffe://example.org/robot*1",
      `path characters are limited to letters, digits, '.', '-' and '_' (found "*" in segment "robot*1")`,
    ],
    ["spiffe://td/" + "a".repeat(2048), "ID is longer than 2048 bytes"],
  ];
  for (const [input, reason] of cases) {
    assert.throws(() => parseSpiffeId(input), (err: unknown) => {
      assert.ok(err instanceof SpiffeIdError, `${input}: ${err}`);
      assert.equal(err.reason, reason, input);
      assert.ok(err.message.startsWith("invalid SPIFFE ID "), err.message);
      return true;
    });
    assert.equal(tryParseSpiffeId(input), undefined);
  }
});

Deno.test("SpiffeIdError message quotes the input", () => {
  assert.throws(
    () => parseSpiffeId("spiffe://td/a//b"),
    { message: `invalid SPIFFE ID "spiffe://td/a//b": path cannot contain empty segments ('//')` },
  );
});

Deno.test("SpiffeId equals and memberOf", () => {
  const id = parseSpiffeId("spiffe://td/robot/robot-001");
  assert.ok(id.equals(parseSpiffeId("spiffe://td/robot/robot-001")));
  assert.ok(id.equals("spiffe://td/robot/robot-001"));
  assert.ok(!id.equals(parseSpiffeId("spiffe://td/robot/robot-002")));
  assert.ok(id.memberOf("td"));
  assert.ok(id.memberOf("spiffe://td"));
  assert.ok(id.memberOf(parseTrustDomain("td")));
  assert.ok(!id.memberOf("other.td"));
  assert.ok(!id.memberOf("t"));
});

Deno.test("SpiffeId.fromSegments validates segments", () => {
  assert.equal(SpiffeId.fromSegments("td", "robot", "r1").toString(), "spiffe://td/robot/r1");
  assert.throws(() => SpiffeId.fromSegments("td", "a/b"), /segment "a\/b" contains '\/'/);
  assert.throws(() => SpiffeId.fromSegments("td", "a", ""), /trailing slash/);
  assert.throws(() => SpiffeId.fromSegments("td", "", "a"), /empty segments/);
  assert.throws(() => SpiffeId.fromSegments("TD", "x"), TrustDomainError);
});

Deno.test("parseTrustDomain accepts a name or its ID and rejects the rest", () => {
  assert.equal(parseTrustDomain("example.org").name, "example.org");
  assert.equal(parseTrustDomain("spiffe://example.org").name, "example.org");
  assert.equal(parseTrustDomain("example.org").idString(), "spiffe://example.org");
  assert.equal(parseTrustDomain("example.org").id().toString(), "spiffe://example.org");
  assert.ok(parseTrustDomain("a.b").equals("a.b"));
  const bad: Array<[string, string]> = [
    ["", "trust domain is missing"],
    ["Example.org", "trust domain must be lowercase (found 'E' at position 1)"],
    ["example.org:443", "a port is not allowed in the trust domain"],
    ["spiffe://example.org/robot", "a trust domain has no path (got '/robot')"],
    ["http://example.org", "scheme must be 'spiffe://', got 'http:'"],
    ["a".repeat(256), "trust domain is longer than 255 characters"],
  ];
  for (const [input, reason] of bad) {
    assert.throws(() => parseTrustDomain(input), (err: unknown) => {
      assert.ok(err instanceof TrustDomainError, input);
      assert.equal(err.reason, reason, input);
      assert.ok(err.message.startsWith("invalid trust domain "), err.message);
      return true;
    });
  }
});
