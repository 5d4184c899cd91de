import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import * as net from "node:net";
import { connackResult, probeMqttPassword } from "./probes.ts";

Deno.test("CONNACK becomes a probe result", () => {
  assert.equal(connackResult(new Uint8Array([0x20, 0x02])), undefined);
  assert.deepEqual(connackResult(new Uint8Array([0x20, 2, 0, 0])), {
    ok: true,
    detail: "CONNACK accepted",
  });
  assert.deepEqual(connackResult(new Uint8Array([0x20, 2, 0, 5])), {
    ok: false,
    detail: "CONNACK not authorized",
  });
  assert.match(connackResult(new Uint8Array([0x30, 2, 0, 0]))!.detail, /expected CONNACK/);
});

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
    assert.match(r.detail, /bad user name or password/);
    assert.ok(got.includes(Buffer.from("secret")));
  } finally {
    await new Promise((r) => server.close(r));
  }
});
