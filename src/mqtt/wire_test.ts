import assert from "node:assert/strict";
import { encodeConnect, parseConnack, remainingLength } from "./wire.ts";

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

Deno.test("CONNACK decoding", () => {
  assert.equal(parseConnack(new Uint8Array([0x20])), undefined);
  assert.equal(parseConnack(new Uint8Array([0x20, 2, 0, 0])), 0);
  assert.equal(parseConnack(new Uint8Array([0x20, 2, 0, 5])), 5);
  assert.throws(() => parseConnack(new Uint8Array([0x30, 2, 0, 0])), /expected CONNACK/);
});
