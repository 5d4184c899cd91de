import assert from "node:assert/strict";
import { AddressError, parseWorkloadAddress, resolveWorkloadAddress } from "./address.ts";

Deno.test("parseWorkloadAddress accepts the spec's forms", () => {
  assert.deepEqual(parseWorkloadAddress("unix:///tmp/spire-agent/agent.sock"), {
    kind: "unix",
    path: "/tmp/spire-agent/agent.sock",
    original: "unix:///tmp/spire-agent/agent.sock",
    grpcTarget: "unix:///tmp/spire-agent/agent.sock",
  });
  assert.equal(parseWorkloadAddress("unix:/tmp/a.sock").grpcTarget, "unix:///tmp/a.sock");
  assert.equal(parseWorkloadAddress("/tmp/a.sock").grpcTarget, "unix:///tmp/a.sock");
  const tcp = parseWorkloadAddress("tcp://127.0.0.1:8000");
  assert.equal(tcp.kind, "tcp");
  assert.equal(tcp.grpcTarget, "127.0.0.1:8000");
  assert.equal(parseWorkloadAddress("tcp:127.0.0.1:9").grpcTarget, "127.0.0.1:9");
});

Deno.test("parseWorkloadAddress rejects bad addresses with the reason", () => {
  const cases: Array<[string, string]> = [
    ["", "address is empty"],
    ["agent.sock", "expected unix:///path/to/socket or tcp://IP:PORT"],
    ["unix://host/tmp/a.sock", "a unix address has no host (got 'host'); use unix:///path"],
    ["unix:tmp/a.sock", "the socket path must be absolute"],
    ["unix:///tmp/a.sock?x=1", "query and fragment are not allowed"],
    ["tcp://localhost:80", "the host must be an IPv4 address, got 'localhost'"],
    ["tcp://127.0.0.1", "expected tcp://IP:PORT"],
    ["tcp://127.0.0.1:0", "port 0 is out of range"],
    ["tcp://127.0.0.1:80/x", "a tcp address has no path"],
    ["http://127.0.0.1:80", "unsupported scheme 'http' (expected unix or tcp)"],
  ];
  for (const [input, reason] of cases) {
    assert.throws(() => parseWorkloadAddress(input), {
      name: "AddressError",
      message: `invalid Workload API address ${JSON.stringify(input)}: ${reason}`,
    });
  }
});

Deno.test("resolveWorkloadAddress prefers the option, then the env passed in", () => {
  const env = { SPIFFE_ENDPOINT_SOCKET: "unix:///env.sock" };
  assert.equal(resolveWorkloadAddress("unix:///opt.sock", env).original, "unix:///opt.sock");
  assert.equal(resolveWorkloadAddress(undefined, env).original, "unix:///env.sock");
  assert.throws(() => resolveWorkloadAddress(undefined, {}), AddressError);
  assert.throws(() => resolveWorkloadAddress(undefined, {}), /set SPIFFE_ENDPOINT_SOCKET/);
});
