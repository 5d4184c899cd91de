import assert from "node:assert/strict";
import { Args } from "../cli/mod.ts";
import { UsageError } from "../cli/errors.ts";
import { caTtlSeconds } from "./command.ts";

function args(values: Record<string, number>): Args {
  return new Args(["devenv", "start"], new Map(Object.entries(values)), [], []);
}

Deno.test("caTtlSeconds: flag over env, env when no flag, undefined when neither", () => {
  assert.equal(caTtlSeconds(args({ "ca-ttl": 120 }), { K8S4R_SPIRE_CA_TTL: "300" }), 120);
  assert.equal(caTtlSeconds(args({}), { K8S4R_SPIRE_CA_TTL: "300" }), 300);
  assert.equal(caTtlSeconds(args({}), { K8S4R_SPIRE_CA_TTL: "" }), undefined);
  assert.equal(caTtlSeconds(args({}), {}), undefined);
});

Deno.test("caTtlSeconds: below 60 s or not whole seconds is a usage error naming the source", () => {
  assert.throws(
    () => caTtlSeconds(args({ "ca-ttl": 30 }), {}),
    (e) =>
      e instanceof UsageError && /^--ca-ttl: expected whole seconds >= 60, got 30$/.test(e.message),
  );
  assert.throws(
    () => caTtlSeconds(args({}), { K8S4R_SPIRE_CA_TTL: "2m" }),
    (e) =>
      e instanceof UsageError &&
      e.message ===
        "environment variable K8S4R_SPIRE_CA_TTL: expected whole seconds >= 60, got '2m'",
  );
  assert.throws(() => caTtlSeconds(args({ "ca-ttl": 90.5 }), {}), UsageError);
});
