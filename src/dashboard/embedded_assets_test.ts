import assert from "node:assert/strict";
import { assetNames, render } from "../../scripts/embed_dashboard.ts";
import { DASHBOARD_ASSETS } from "./embedded_assets.ts";

Deno.test("the embedded dashboard assets are those of src/dashboard/assets/", async () => {
  const expected = await render();
  const actual = await Deno.readTextFile(new URL("./embedded_assets.ts", import.meta.url));
  assert.ok(
    actual === expected,
    "src/dashboard/embedded_assets.ts is stale: run `deno run -A scripts/embed_dashboard.ts`",
  );
  // Positive control: the module holds every file, and the page names its script and style.
  assert.deepEqual(Object.keys(DASHBOARD_ASSETS).sort(), await assetNames());
  assert.match(DASHBOARD_ASSETS["index.html"], /src="\/dashboard\/assets\/app\.js"/);
  assert.match(DASHBOARD_ASSETS["index.html"], /href="\/dashboard\/assets\/style\.css"/);
});
