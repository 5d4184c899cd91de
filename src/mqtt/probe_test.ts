import assert from "node:assert/strict";
import { connectPacket } from "./probe.ts";

Deno.test("connectPacket encodes an MQTT 3.1.1 CONNECT with credentials", () => {
  const p = connectPacket("c1", { username: "u", password: "pw" });
  // fixed header, remaining length, "MQTT", level 4, flags (user+pass+clean), keepalive 10
  assert.deepEqual(
    [...p],
    [0x10, 21, 0, 4, 77, 81, 84, 84, 4, 0xc2, 0, 10, 0, 2, 99, 49, 0, 1, 117, 0, 2, 112, 119],
  );
  assert.equal(connectPacket("c1")[9], 0x02);
});
