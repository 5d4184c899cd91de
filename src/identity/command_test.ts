import assert from "node:assert/strict";
import { join } from "node:path";
import { resolve as resolveCli } from "../cli/mod.ts";
import { bufferIo } from "../cli/io.ts";
import { CliError, UsageError } from "../cli/errors.ts";
import { FakeWorkloadApi } from "../spiffe/testing/fake_workload_api.ts";
import { TestCa } from "../spiffe/testing/test_ca.ts";
import { formatDuration, identityCommand, runIdentityFetch } from "./command.ts";

const ca = TestCa.create({
  trustDomain: "td",
  notBefore: new Date("2029-12-31T00:00:00Z"),
  notAfter: new Date("2030-01-02T00:00:00Z"),
});
const validity = {
  notBefore: new Date("2030-01-01T00:00:00Z"),
  notAfter: new Date("2030-01-01T01:00:00Z"),
};
const robot = ca.issue({
  spiffeId: "spiffe://td/robot/robot-001",
  dnsNames: ["robot-001"],
  ...validity,
});
const other = ca.issue({ spiffeId: "spiffe://td/other", ...validity });

function args(argv: string[]) {
  return resolveCli(identityCommand, argv).args;
}

function deps() {
  let t = 1000;
  return { now: () => new Date("2030-01-01T00:10:00Z"), clock: () => (t += 12) - 12 };
}

const withFake = FakeWorkloadApi.using;

Deno.test("identity fetch prints each SVID, the CA validity and the response time", async () => {
  await withFake(async (fake) => {
    fake.setX509Svids([robot, { ...other, hint: "ops" }], { td: ca.rootDer });
    const io = bufferIo();
    const code = await runIdentityFetch(args(["fetch", "--socket", fake.address]), io, deps());
    assert.equal(code, 0);
    assert.equal(
      io.out(),
      `Workload API ${fake.address} answered in 12 ms
SVID spiffe://td/robot/robot-001
  dns names   robot-001
  not before  2030-01-01T00:00:00.000Z
  not after   2030-01-01T01:00:00.000Z (50m 0s left)
SVID spiffe://td/other
  hint        ops
  not before  2030-01-01T00:00:00.000Z
  not after   2030-01-01T01:00:00.000Z (50m 0s left)
Bundle spiffe://td (1 CA)
  CA O=SPIFFE, CN=td test root CA
    not before  2029-12-31T00:00:00.000Z
    not after   2030-01-02T00:00:00.000Z (23h 50m left)
`,
    );
    assert.equal(io.err(), "");
  });
});

Deno.test("identity fetch --json --spiffe-id gives the same facts as JSON", async () => {
  await withFake(async (fake) => {
    fake.setX509Svids([robot, other], { td: ca.rootDer });
    const io = bufferIo({ env: { SPIFFE_ENDPOINT_SOCKET: fake.address } });
    await runIdentityFetch(
      args(["fetch", "--json", "--spiffe-id", "spiffe://td/other"]),
      io,
      deps(),
    );
    assert.deepEqual(JSON.parse(io.out()), {
      address: fake.address,
      firstResponseMs: 12,
      svids: [{
        spiffeId: "spiffe://td/other",
        hint: "",
        dnsNames: [],
        notBefore: "2030-01-01T00:00:00.000Z",
        notAfter: "2030-01-01T01:00:00.000Z",
        secondsLeft: 3000,
        chainLength: 1,
        serialNumber: other.certificate.serialNumber,
      }],
      bundles: [{
        trustDomain: "spiffe://td",
        authorities: [{
          subject: "O=SPIFFE, CN=td test root CA",
          notBefore: "2029-12-31T00:00:00.000Z",
          notAfter: "2030-01-02T00:00:00.000Z",
          secondsLeft: 85800,
        }],
      }],
    });
  });
});

Deno.test("identity fetch --write saves svid.pem, svid.key (0600) and bundle.pem", async () => {
  await withFake(async (fake) => {
    fake.setX509Svids([robot], { td: ca.rootDer });
    const cwd = await Deno.makeTempDir();
    try {
      const io = bufferIo({ cwd });
      await runIdentityFetch(
        args(["fetch", "--socket", fake.address, "--write", "out"]),
        io,
        deps(),
      );
      const dir = join(cwd, "out");
      assert.equal(await Deno.readTextFile(join(dir, "svid.pem")), robot.chainPem);
      assert.equal(await Deno.readTextFile(join(dir, "svid.key")), robot.keyPem);
      assert.equal(await Deno.readTextFile(join(dir, "bundle.pem")), ca.rootPem);
      assert.equal((await Deno.stat(join(dir, "svid.key"))).mode! & 0o777, 0o600);
      assert.ok(
        io.out().endsWith(
          `Wrote ${join(dir, "svid.pem")}, ${join(dir, "svid.key")}, ${join(dir, "bundle.pem")}\n`,
        ),
      );
    } finally {
      await Deno.remove(cwd, { recursive: true });
    }
  });
});

async function failsWith(
  argv: string[],
  env: Record<string, string>,
  message: string | RegExp,
  hint?: RegExp,
) {
  const io = bufferIo({ env });
  await assert.rejects(runIdentityFetch(args(argv), io, deps()), (err: unknown) => {
    assert.ok(err instanceof CliError, String(err));
    if (typeof message === "string") assert.equal(err.message, message);
    else assert.match(err.message, message);
    if (hint) assert.match(err.hint ?? "", hint);
    return true;
  });
}

Deno.test("identity fetch errors name the cause", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await failsWith(
      ["fetch", "--socket", `unix://${dir}/agent.sock`],
      {},
      `identity fetch: the Workload API socket ${dir}/agent.sock does not exist (is the SPIRE agent running? is the path right?)`,
      /start the SPIRE agent/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  await withFake(async (fake) => {
    await failsWith(
      ["fetch"],
      { SPIFFE_ENDPOINT_SOCKET: fake.address },
      `identity fetch: the Workload API at ${fake.address} issued no identity to this process (PermissionDenied: no identity issued); check that a registration entry's selectors match this workload`,
      /registration entry/,
    );
    fake.setX509Svids([robot], { td: ca.rootDer });
    await failsWith(
      ["fetch", "--socket", fake.address, "--spiffe-id", "spiffe://td/nope"],
      {},
      "identity fetch: no X.509 SVID for spiffe://td/nope (the Workload API returned: spiffe://td/robot/robot-001)",
    );
  });
});

Deno.test("identity fetch usage errors", async () => {
  const bad = async (argv: string[], env: Record<string, string>, message: string) => {
    await assert.rejects(
      runIdentityFetch(args(argv), bufferIo({ env }), deps()),
      (err: unknown) => {
        assert.ok(err instanceof UsageError);
        assert.equal(err.message, message);
        return true;
      },
    );
  };
  await bad(
    ["fetch", "--socket", "agent.sock"],
    {},
    `identity fetch: --socket: invalid Workload API address "agent.sock": expected unix:///path/to/socket or tcp://IP:PORT`,
  );
  await bad(
    ["fetch"],
    { SPIFFE_ENDPOINT_SOCKET: "tcp://localhost:1" },
    `identity fetch: SPIFFE_ENDPOINT_SOCKET: invalid Workload API address "tcp://localhost:1": the host must be an IPv4 address, got 'localhost'`,
  );
  await bad(
    ["fetch", "--timeout", "0"],
    {},
    "identity fetch: --timeout expects a positive number of seconds, got 0",
  );
  await bad(
    ["fetch", "--spiffe-id", "spiffe://td/a/"],
    {},
    `identity fetch: --spiffe-id: invalid SPIFFE ID "spiffe://td/a/": path cannot have a trailing slash`,
  );
});

Deno.test("formatDuration", () => {
  assert.equal(formatDuration(4_000), "4s");
  assert.equal(formatDuration(3_599_000), "59m 59s");
  assert.equal(formatDuration(3_661_000), "1h 1m");
  assert.equal(formatDuration(90_061_000), "1d 1h");
  assert.equal(formatDuration(-65_000), "1m 5s");
});
