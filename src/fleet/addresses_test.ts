import assert from "node:assert/strict";
import { isLoopbackHost } from "./addresses.ts";

Deno.test("isLoopbackHost", () => {
  for (const h of ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]) {
    assert.equal(isLoopbackHost(h), true, h);
  }
  for (const h of ["0.0.0.0", "::", "10.0.0.1", "example.org", "128.0.0.1"]) {
    assert.equal(isLoopbackHost(h), false, h);
  }
});
