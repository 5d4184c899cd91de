import assert from "node:assert/strict";
import { x509popSerialHex } from "./node_attestor.ts";

Deno.test("x509popSerialHex: lowercase hex padded to whole bytes, as SPIRE's SerialNumberHex", () => {
  assert.equal(x509popSerialHex(0x0a19c2cfn), "0a19c2cf");
  assert.equal(x509popSerialHex(0xab01n), "ab01");
  assert.equal(x509popSerialHex(1n), "01");
  assert.equal(x509popSerialHex(0x100n), "0100");
  assert.equal(x509popSerialHex(0n), "00");
  assert.throws(() => x509popSerialHex(-1n), RangeError);
});
