import assert from "node:assert/strict";
import { redactJoinTokens } from "./redact.ts";

Deno.test("join tokens are redacted from SPIRE log lines", () => {
  const token = "3f1c2a9e-5b7d-4e0f-9a8b-1c2d3e4f5a6b";
  const cases: [string, string][] = [
    [
      `level=info msg="Node attestation was successful" spiffe_id="spiffe://td/spire/agent/join_token/${token}"`,
      `level=info msg="Node attestation was successful" spiffe_id="spiffe://td/spire/agent/join_token/<redacted>"`,
    ],
    [`joinToken=${token} rest`, `joinToken=<redacted> rest`],
    [`{"join_token": "${token}"}`, `{"join_token": "<redacted>"}`],
    [`the token ${token} alone`, `the token <redacted> alone`],
    [`nothing secret here`, `nothing secret here`],
  ];
  for (const [line, want] of cases) assert.equal(redactJoinTokens(line, [token]), want);
});
