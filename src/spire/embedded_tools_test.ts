import assert from "node:assert/strict";
import { render } from "../../scripts/embed_spire_tools.ts";

Deno.test("embedded SPIRE tools module matches scripts/spire-tools (regenerate if not)", async () => {
  const current = await Deno.readTextFile(new URL("./embedded_tools.ts", import.meta.url));
  assert.ok(
    current === await render(),
    "src/spire/embedded_tools.ts is stale: run `deno run -A scripts/embed_spire_tools.ts`",
  );
});
