import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import * as net from "node:net";
import { probeMqttPassword } from "./probes.ts";

Deno.test("password probe against a fake broker that refuses the login", async () => {
  let got = Buffer.alloc(0);
  const server = net.createServer((s) => {
    s.on("data", (d: Buffer) => {
      got = Buffer.concat([got, d]);
      s.write(Buffer.from([0x20, 2, 0, 4]));
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as net.AddressInfo).port;
  try {
    const r = await probeMqttPassword(port, "user", "secret");
    assert.equal(r.ok, false);
    assert.equal(r.detail, `127.0.0.1:${port}: CONNACK 4 (bad user name or password)`);
    assert.ok(got.includes(Buffer.from("secret")));
  } finally {
    await new Promise((r) => server.close(r));
  }
});
