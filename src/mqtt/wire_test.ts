import assert from "node:assert/strict";
import { encodeConnect, encodeConnect5, parseConnack, remainingLength } from "./wire.ts";

Deno.test("CONNECT encoding (MQTT 3.1.1) with and without credentials", () => {
  assert.deepEqual(
    [...encodeConnect({ clientId: "c" })],
    [0x10, 13, 0, 4, 77, 81, 84, 84, 4, 0x02, 0, 10, 0, 1, 99],
  );
  // username + password + clean session; the strings follow the client id
  assert.deepEqual(
    [...encodeConnect({ clientId: "c", username: "u", password: "p" })],
    [0x10, 19, 0, 4, 77, 81, 84, 84, 4, 0xc2, 0, 10, 0, 1, 99, 0, 1, 117, 0, 1, 112],
  );
  assert.deepEqual([...remainingLength(321)], [0xc1, 0x02]);
});

Deno.test("CONNECT encoding (MQTT 5) with an authentication method, no credentials", () => {
  assert.deepEqual(
    [...encodeConnect5({ clientId: "c", authMethod: "m" })],
    // MQTT, level 5, clean start, keepalive 10, properties (4 bytes: 0x15 "m"), client id "c"
    [0x10, 18, 0, 4, 77, 81, 84, 84, 5, 0x02, 0, 10, 4, 0x15, 0, 1, 109, 0, 1, 99],
  );
});

Deno.test("CONNACK decoding", () => {
  assert.equal(parseConnack(new Uint8Array([0x20])), undefined);
  assert.equal(parseConnack(new Uint8Array([0x20, 2, 0, 0])), 0);
  assert.equal(parseConnack(new Uint8Array([0x20, 2, 0, 5])), 5);
  assert.throws(() => parseConnack(new Uint8Array([0x30, 2, 0, 0])), /expected CONNACK/);
  // MQTT 5: reason code, then properties; incomplete until the whole packet is there.
  assert.equal(parseConnack(new Uint8Array([0x20, 3, 0, 0x8c])), undefined);
  assert.equal(parseConnack(new Uint8Array([0x20, 3, 0, 0x8c, 0])), 0x8c);
  assert.equal(parseConnack(new Uint8Array([0x20, 6, 0, 0x86, 3, 0x1f, 0, 0])), 0x86);
});
