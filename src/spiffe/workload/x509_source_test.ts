import assert from "node:assert/strict";
import { FakeWorkloadApi } from "../testing/fake_workload_api.ts";
import { TestCa } from "../testing/test_ca.ts";
import { WorkloadApiError } from "./errors.ts";
import { X509Source } from "./x509_source.ts";

const ca = TestCa.create({ trustDomain: "td" });

const withFake = FakeWorkloadApi.using;

/** Resolves when `cond()` holds, polling on a short timer (a readiness probe, not a sleep). */
async function until(cond: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

Deno.test("X509Source resolves on the first SVID and bundle, then follows rotations", async () => {
  await withFake(async (fake) => {
    fake.setX509Svids([ca.issue({ spiffeId: "spiffe://td/a" })], { td: ca.rootDer });
    let t = 100;
    const src = await X509Source.create({ address: fake.address, clock: () => (t += 7) });
    try {
      assert.equal(src.getX509Svid().id.toString(), "spiffe://td/a");
      assert.equal(src.getX509BundleForTrustDomain("td")?.toPem(), ca.rootPem);
      assert.equal(src.getX509BundleForTrustDomain("other"), undefined);
      assert.equal(src.firstUpdateMs, 7);
      assert.equal(src.updates, 1);
      let fired = 0;
      const off = src.onUpdate(() => fired++);
      const rotated = ca.issue({ spiffeId: "spiffe://td/a" });
      fake.setX509Svids([rotated]);
      await until(() => fired === 1, "the rotation update");
      assert.equal(src.getX509Svid().serialNumber, rotated.certificate.serialNumber);
      off();
      fake.setX509Svids([ca.issue({ spiffeId: "spiffe://td/a" })]);
      await until(() => src.updates === 3, "the third update");
      assert.equal(fired, 1, "unsubscribed listener is not called");
    } finally {
      await src.close();
    }
  });
});

Deno.test("X509Source collapses a burst of updates into one emitted update", async () => {
  await withFake(async (fake) => {
    fake.setX509Svids([ca.issue({ spiffeId: "spiffe://td/a" })], { td: ca.rootDer });
    const src = await X509Source.create({ address: fake.address, coalesceMs: 300 });
    try {
      let fired = 0;
      src.onUpdate(() => fired++);
      const burst = Array.from({ length: 5 }, () => ca.issue({ spiffeId: "spiffe://td/a" }));
      for (const s of burst) fake.setX509Svids([s]);
      await until(() => src.updates === 6 && src.emitted === 1, "the burst");
      assert.equal(fired, 1);
      assert.equal(src.getX509Svid().serialNumber, burst[4].certificate.serialNumber);
    } finally {
      await src.close();
    }
  });
});

Deno.test("X509Source does not emit when the agent re-sends the same SVID", async () => {
  await withFake(async (fake) => {
    const s = ca.issue({ spiffeId: "spiffe://td/a" });
    fake.setX509Svids([s], { td: ca.rootDer });
    const src = await X509Source.create({ address: fake.address, coalesceMs: 1 });
    try {
      let fired = 0;
      src.onUpdate(() => fired++);
      fake.setX509Svids([s]);
      fake.setX509Svids([ca.issue({ spiffeId: "spiffe://td/a" })]);
      await until(() => src.updates === 3 && src.emitted === 1, "two updates, one change");
      assert.equal(fired, 1);
    } finally {
      await src.close();
    }
  });
});

Deno.test("X509Source picks by SPIFFE ID and by picker", async () => {
  await withFake(async (fake) => {
    fake.setX509Svids([
      ca.issue({ spiffeId: "spiffe://td/a" }),
      ca.issue({ spiffeId: "spiffe://td/b" }),
    ], { td: ca.rootDer });
    const byId = await X509Source.create({ address: fake.address, spiffeId: "spiffe://td/b" });
    const byPicker = await X509Source.create({
      address: fake.address,
      picker: (svids) => svids.find((s) => s.id.path === "/a"),
    });
    try {
      assert.equal(byId.getX509Svid().id.toString(), "spiffe://td/b");
      assert.equal(byId.getX509Svids().length, 2);
      assert.equal(byPicker.getX509Svid().id.toString(), "spiffe://td/a");
    } finally {
      await byId.close();
      await byPicker.close();
    }
  });
});

Deno.test("X509Source rejects clearly when the wanted SPIFFE ID never arrives", async () => {
  await withFake(async (fake) => {
    fake.setX509Svids([
      ca.issue({ spiffeId: "spiffe://td/a" }),
      ca.issue({ spiffeId: "spiffe://td/b" }),
    ], { td: ca.rootDer });
    const errors: Error[] = [];
    await assert.rejects(
      X509Source.create({
        address: fake.address,
        spiffeId: "spiffe://td/robot/robot-001",
        // Long enough for a loaded machine to connect and get the first answer, which the error
        // names. The wanted ID never comes, so the test always waits out the whole timeout.
        timeoutMs: 1500,
        onError: (e) => errors.push(e),
      }),
      {
        name: "WorkloadApiError",
        message:
          "no X.509 SVID for spiffe://td/robot/robot-001 within 1.5 s (the Workload API returned: spiffe://td/a, spiffe://td/b)",
      },
    );
    assert.match(errors[0].message, /^no X\.509 SVID for spiffe:\/\/td\/robot\/robot-001/);
    await assert.rejects(
      X509Source.create({ address: fake.address, spiffeId: "nope" }),
      /invalid SPIFFE ID/,
    );
  });
});

Deno.test("X509Source times out naming the last error when there is no identity", async () => {
  await withFake(async (fake) => {
    await assert.rejects(
      X509Source.create({
        address: fake.address,
        timeoutMs: 1500,
        backoff: { initialMs: 50, stepMs: 50 },
      }),
      (err: unknown) => {
        assert.ok(err instanceof WorkloadApiError);
        assert.match(
          err.message,
          /^no X\.509 SVID from the Workload API at unix:\/\/.*agent\.sock within 1\.5 s \(last error: the Workload API at .* issued no identity to this process \(PermissionDenied: no identity issued\)/,
        );
        return true;
      },
    );
  });
});

Deno.test("X509Source reconnects after a restart and keeps the last SVID meanwhile", async () => {
  await withFake(async (fake) => {
    const first = ca.issue({ spiffeId: "spiffe://td/a" });
    fake.setX509Svids([first], { td: ca.rootDer });
    const errors: WorkloadApiError[] = [];
    const src = await X509Source.create({
      address: fake.address,
      backoff: { initialMs: 20, stepMs: 20, maxMs: 100 },
      coalesceMs: 1,
      onError: (e) => errors.push(e as WorkloadApiError),
    });
    try {
      await fake.stop();
      await until(() => errors.length >= 2, "reconnect attempts to fail");
      assert.ok(src.lastError instanceof WorkloadApiError);
      assert.ok(
        ["unavailable", "socket-missing"].includes((src.lastError as WorkloadApiError).kind),
      );
      assert.equal(
        src.getX509Svid().serialNumber,
        first.certificate.serialNumber,
        "keeps the last SVID",
      );
      const second = ca.issue({ spiffeId: "spiffe://td/a" });
      fake.setX509Svids([second]);
      await fake.restart();
      await until(
        () => src.getX509Svid().serialNumber === second.certificate.serialNumber,
        "the new SVID",
      );
      assert.equal(src.lastError, undefined);
      assert.ok(src.watching);
    } finally {
      await src.close();
    }
    assert.ok(!src.watching);
  });
});

Deno.test("X509Source reports and skips a bad message, keeping the stream", async () => {
  await withFake(async (fake) => {
    fake.setX509Svids([ca.issue({ spiffeId: "spiffe://td/a" })], { td: ca.rootDer });
    const errors: Error[] = [];
    const src = await X509Source.create({
      address: fake.address,
      coalesceMs: 1,
      onError: (e) => errors.push(e),
    });
    try {
      const a = ca.issue({ spiffeId: "spiffe://td/a" });
      const b = ca.issue({ spiffeId: "spiffe://td/b" });
      fake.pushRawX509Response(new Uint8Array([0x0a, 0x05, 1]));
      fake.pushRawX509Response({
        svids: [{
          spiffeId: "spiffe://td/a",
          x509Svid: a.chainDer,
          x509SvidKey: b.keyDer,
          bundle: ca.rootDer,
          hint: "",
        }],
        crl: [],
        federatedBundles: new Map(),
      });
      const good = ca.issue({ spiffeId: "spiffe://td/a" });
      fake.setX509Svids([good]);
      await until(
        () => src.getX509Svid().serialNumber === good.certificate.serialNumber,
        "the good update",
      );
      assert.equal(errors.length, 2);
      assert.match(
        errors[0].message,
        /^bad FetchX509SVID response: X509SVIDResponse: field 1 at byte 0 declares 5 bytes/,
      );
      assert.match(errors[1].message, /private key does not match/);
      assert.equal(fake.calls.length, 1, "the same stream went on");
    } finally {
      await src.close();
    }
  });
});

Deno.test("X509Source stops on abort and rejects creation when aborted", async () => {
  await withFake(async (fake) => {
    const ac = new AbortController();
    ac.abort();
    await assert.rejects(X509Source.create({ address: fake.address, signal: ac.signal }), {
      message: "X509Source creation was cancelled",
    });
    fake.setX509Svids([ca.issue({ spiffeId: "spiffe://td/a" })], { td: ca.rootDer });
    const ac2 = new AbortController();
    const src = await X509Source.create({ address: fake.address, signal: ac2.signal });
    ac2.abort();
    await until(() => !src.watching && fake.openX509Streams === 0, "the stream to end");
    assert.equal(src.getX509Svid().id.toString(), "spiffe://td/a");
    await src.close();
  });
});
