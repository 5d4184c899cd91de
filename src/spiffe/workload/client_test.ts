import assert from "node:assert/strict";
import * as grpc from "@grpc/grpc-js";
import { Buffer } from "node:buffer";
import { FakeWorkloadApi } from "../testing/fake_workload_api.ts";
import { TestCa } from "../testing/test_ca.ts";
import { SECURITY_HEADER, WorkloadApiClient, type X509Context } from "./client.ts";
import { GrpcChannel } from "./grpc.ts";
import { WorkloadApiError } from "./errors.ts";
import { encodeEmpty } from "./proto.ts";
import { workloadServiceDefinition } from "../testing/workload_service.ts";

const ca = TestCa.create({ trustDomain: "td" });

const withFake = FakeWorkloadApi.using;

async function rejectsKind(p: Promise<unknown>, kind: string, message?: RegExp): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof WorkloadApiError, String(err));
    assert.equal(err.kind, kind, err.message);
    if (message) assert.match(err.message, message);
    return true;
  });
}

Deno.test("fetchX509Context returns the SVIDs and bundles, sending the security header", async () => {
  await withFake(async (fake) => {
    const a = ca.issue({ spiffeId: "spiffe://td/a" });
    const b = ca.issue({ spiffeId: "spiffe://td/b" });
    const fed = TestCa.create({ trustDomain: "other.org" });
    fake.setX509Svids([a, { ...b, hint: "second" }], { td: a.bundleDer, "other.org": fed.rootDer });
    const client = new WorkloadApiClient({ env: { SPIFFE_ENDPOINT_SOCKET: fake.address } });
    try {
      const ctx = await client.fetchX509Context();
      assert.deepEqual(ctx.svids.map((s) => s.id.toString()), ["spiffe://td/a", "spiffe://td/b"]);
      assert.equal(ctx.svids[1].hint, "second");
      assert.deepEqual(ctx.bundles.bundles().map((x) => x.trustDomain.name), ["other.org", "td"]);
      assert.equal(ctx.bundles.get("td")?.toPem(), ca.rootPem);
      const bundles = await client.fetchX509Bundles();
      assert.equal(bundles.size, 2);
      assert.ok(fake.calls.every((c) => c.hasHeader));
      assert.deepEqual(fake.calls.map((c) => c.method), ["FetchX509SVID", "FetchX509Bundles"]);
    } finally {
      client.close();
    }
  });
});

Deno.test("the fake enforces the security header like SPIRE", async () => {
  await withFake(async (fake) => {
    fake.setX509Svids([ca.issue({ spiffeId: "spiffe://td/a" })], { td: ca.rootDer });
    const Ctor = grpc.makeGenericClientConstructor(workloadServiceDefinition, "SpiffeWorkloadAPI");
    const raw = new Ctor(
      `unix://${fake.socketPath}`,
      grpc.credentials.createInsecure(),
    ) as unknown as {
      FetchX509SVID(req: Uint8Array, md: grpc.Metadata): grpc.ClientReadableStream<Buffer>;
      close(): void;
    };
    try {
      const err = await new Promise<grpc.ServiceError>((resolve) => {
        const call = raw.FetchX509SVID(encodeEmpty(), new grpc.Metadata());
        call.on("data", () => {});
        call.on("error", resolve);
      });
      assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
      assert.equal(err.details, "security header missing from request");
      assert.deepEqual(fake.calls, [{ method: "FetchX509SVID", hasHeader: false }]);
    } finally {
      raw.close();
    }
  });
});

Deno.test("errors name the cause: socket missing, no identity issued", async () => {
  const dir = await Deno.makeTempDir();
  const missing = new WorkloadApiClient({ address: `unix://${dir}/nope.sock` });
  try {
    await rejectsKind(
      missing.fetchX509Context(),
      "socket-missing",
      new RegExp(`^the Workload API socket ${dir}/nope\\.sock does not exist`),
    );
  } finally {
    missing.close();
    await Deno.remove(dir, { recursive: true });
  }
  await withFake(async (fake) => {
    const client = new WorkloadApiClient({ address: fake.address });
    try {
      await rejectsKind(
        client.fetchX509Context(),
        "no-identity",
        /PermissionDenied: no identity issued/,
      );
    } finally {
      client.close();
    }
  });
});

Deno.test("a bad response is a clear bad-response error", async () => {
  await withFake(async (fake) => {
    const a = ca.issue({ spiffeId: "spiffe://td/a" });
    const b = ca.issue({ spiffeId: "spiffe://td/b" });
    fake.setX509Svids([{ chainDer: a.chainDer, keyDer: b.keyDer }], { td: ca.rootDer });
    const client = new WorkloadApiClient({ address: fake.address });
    try {
      await rejectsKind(
        client.fetchX509Context(),
        "bad-response",
        /^bad X509SVIDResponse: X\.509 SVID private key does not match the public key of the leaf certificate spiffe:\/\/td\/a$/,
      );
    } finally {
      client.close();
    }
  });
});

Deno.test("watchX509Context receives pushed rotations and resolves on abort", async () => {
  await withFake(async (fake) => {
    fake.setX509Svids([ca.issue({ spiffeId: "spiffe://td/a" })], { td: ca.rootDer });
    const client = new WorkloadApiClient({ address: fake.address });
    const seen: X509Context[] = [];
    const ac = new AbortController();
    let second!: () => void;
    const gotTwo = new Promise<void>((r) => (second = r));
    const done = client.watchX509Context({
      onUpdate: (ctx) => {
        seen.push(ctx);
        if (seen.length === 1) fake.setX509Svids([ca.issue({ spiffeId: "spiffe://td/rotated" })]);
        if (seen.length === 2) second();
      },
    }, { signal: ac.signal });
    await gotTwo;
    ac.abort();
    await done;
    client.close();
    assert.deepEqual(seen.map((c) => c.svids[0].id.toString()), [
      "spiffe://td/a",
      "spiffe://td/rotated",
    ]);
  });
});

Deno.test("watchX509Context stops for good on InvalidArgument", async () => {
  await withFake(async (fake) => {
    fake.setX509Svids([ca.issue({ spiffeId: "spiffe://td/a" })], { td: ca.rootDer });
    const client = new WorkloadApiClient({ address: fake.address });
    const errors: WorkloadApiError[] = [];
    const call = GrpcChannel.prototype.call;
    // Drop the header for this test's calls only (restored below).
    GrpcChannel.prototype.call = function (this: GrpcChannel, path, req, md, handlers, opts) {
      const { [SECURITY_HEADER]: _dropped, ...rest } = md;
      return call.call(this, path, req, rest, handlers, opts);
    };
    try {
      await rejectsKind(
        client.watchX509Context({ onUpdate: () => {}, onError: (e) => errors.push(e) }),
        "missing-header",
        /security header missing from request \(InvalidArgument\)/,
      );
    } finally {
      GrpcChannel.prototype.call = call;
      client.close();
    }
    assert.equal(errors.length, 1);
    assert.equal(fake.calls.length, 1, "no retry after InvalidArgument");
  });
});

Deno.test("JWT-SVIDs, JWT bundles and validation", async () => {
  await withFake(async (fake) => {
    const payload = Buffer.from(
      JSON.stringify({ sub: "spiffe://td/a", aud: ["mqtt"], exp: 2000000000 }),
    )
      .toString("base64url");
    const token = `eyJhbGciOiJFUzI1NiJ9.${payload}.sig`;
    fake.setJwtSvids([{ spiffeId: "spiffe://td/a", token, hint: "h" }]);
    fake.setJwtBundles({ td: '{"keys":[{"kty":"EC"}]}' });
    fake.acceptJwt(token, "spiffe://td/a", { sub: "spiffe://td/a", aud: ["mqtt"] });
    const client = new WorkloadApiClient({ address: fake.address });
    try {
      const svid = await client.fetchJwtSvid({ audience: "mqtt" });
      assert.equal(svid.id.toString(), "spiffe://td/a");
      assert.deepEqual(svid.audience, ["mqtt"]);
      assert.equal(svid.expiry.toISOString(), "2033-05-18T03:33:20.000Z");
      assert.equal(svid.hint, "h");
      assert.deepEqual(fake.calls.at(-1)?.request, { audience: ["mqtt"], spiffeId: "" });
      await rejectsKind(
        client.fetchJwtSvid({ audience: "mqtt", spiffeId: "spiffe://td/zzz" }),
        "no-identity",
      );
      const bundles = await client.fetchJwtBundles();
      assert.deepEqual(bundles.get("td")?.jwks, { keys: [{ kty: "EC" }] });
      const v = await client.validateJwtSvid(token, "mqtt");
      assert.equal(v.id.toString(), "spiffe://td/a");
      assert.deepEqual(v.claims, { sub: "spiffe://td/a", aud: ["mqtt"] });
      await rejectsKind(
        client.validateJwtSvid(token, "other"),
        "invalid-argument",
        /unable to validate JWT-SVID/,
      );
    } finally {
      client.close();
    }
  });
});

Deno.test("a closed client refuses calls", async () => {
  const client = new WorkloadApiClient({ address: "unix:///nonexistent.sock" });
  client.close();
  await rejectsKind(client.fetchX509Context(), "cancelled", /closed/);
});
