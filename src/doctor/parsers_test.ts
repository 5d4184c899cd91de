import assert from "node:assert/strict";
import { createServer } from "node:net";
import { realNet } from "./adapters.ts";
import { decodeAddress, parseProcNetTcp } from "./proc_net.ts";

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
    const owner = await realNet.listeningOwner(port);
    assert.equal(owner?.pid, Deno.pid);
    assert.equal(owner?.address, "127.0.0.1");
  } finally {
    await new Promise((r) => srv.close(r));
  }
});
