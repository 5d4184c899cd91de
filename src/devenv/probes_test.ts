import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import * as net from "node:net";
import { encodeConnect, encodeRemainingLength, parseConnack, probeMqttPassword } from "./probes.ts";

Deno.test("CONNECT encoding (MQTT 3.1.1) with and without credentials", () => {
  const anon = Buffer.from(encodeConnect("c", undefined, undefined, 10));
  assert.deepEqual([...anon], [
    0x10,
    13,
    0,
    4,
    0x4d,
    0x51,
    0x54,
    0x54,
    4,
    0x02,
    0,
    10,
    0,
    1,
    0x63,
  ]);
  const auth = Buffer.from(encodeConnect("c", "u", "p", 10));
  assert.equal(auth[9], 0xc2); // username + password + clean session
  assert.deepEqual([...auth.subarray(auth.length - 6)], [0, 1, 0x75, 0, 1, 0x70]);
  assert.deepEqual([...encodeRemainingLength(321)], [0xc1, 0x02]);
});

Deno.test("CONNACK parsing", () => {
  assert.equal(parseConnack(new Uint8Array([0x20, 0x02])), undefined);
  assert.deepEqual(parseConnack(new Uint8Array([0x20, 2, 0, 0])), {
    ok: true,
    detail: "CONNACK accepted",
  });
  assert.deepEqual(parseConnack(new Uint8Array([0x20, 2, 0, 5])), {
    ok: false,
    detail: "CONNACK not authorized",
  });
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
