import assert from "node:assert/strict";
import { createServer } from "node:net";
import { realNet, realProc } from "./adapters.ts";
import { decodeAddress, parseProcNetTcp, parseProcNetUnix } from "./proc_net.ts";

Deno.test("proc_net: parses LISTEN sockets and addresses", () => {
  const text =
    `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0
   1: 0100007F:1F91 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 999 1 0`;
  assert.deepEqual(parseProcNetTcp(text), [{ address: "127.0.0.1", port: 8081, inode: 4242 }]);
  assert.equal(decodeAddress("00000000000000000000000000000000"), "::");
  assert.equal(decodeAddress("00000000000000000000000001000000"), "::1");
});

Deno.test("proc_net: finds this very process listening on a free port", async () => {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", () => r()));
  const port = (srv.address() as { port: number }).port;
  try {
    const owner = await realNet({}).listeningOwner(port);
    assert.equal(owner?.pid, Deno.pid);
    assert.equal(owner?.address, "127.0.0.1");
  } finally {
    await new Promise((r) => srv.close(r));
  }
});

Deno.test("proc_net: parses listening unix sockets (paths with spaces; connected ones left out)", () => {
  const text = `Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 31337 /tmp/spire-agent/agent.sock
0000000000000000: 00000003 00000000 00000000 0001 03 31338 /tmp/spire-agent/agent.sock
0000000000000000: 00000002 00000000 00010000 0001 01 99 /tmp/a b.sock
0000000000000000: 00000002 00000000 00000000 0002 01 100`;
  assert.deepEqual(parseProcNetUnix(text), [
    { path: "/tmp/spire-agent/agent.sock", inode: 31337 },
    { path: "/tmp/a b.sock", inode: 99 },
  ]);
});

Deno.test("proc_net: finds this very process serving a unix socket", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-unix-" });
  const path = `${dir}/s.sock`;
  const l = Deno.listen({ transport: "unix", path });
  try {
    assert.equal(await realProc.unixSocketOwner(path), Deno.pid);
    assert.equal(await realProc.unixSocketOwner(`${dir}/none.sock`), undefined);
    const me = await realProc.stat(Deno.pid);
    assert.equal(me?.pid, Deno.pid);
    assert.match(me!.state, /^[RS]$/);
  } finally {
    l.close();
    await Deno.remove(dir, { recursive: true });
  }
});
