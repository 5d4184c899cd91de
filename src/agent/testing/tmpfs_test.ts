import assert from "node:assert/strict";
import { join } from "node:path";
import { realRunner } from "../../process/mod.ts";
import { withTmpfs } from "./tmpfs.ts";

const mounted = async (dir: string) =>
  (await Deno.readTextFile("/proc/self/mounts")).split("\n").some((l) => l.split(" ")[1] === dir);

Deno.test("withTmpfs: no mount outlives the test, also one that fails with a file still open in it", async () => {
  for (const leaveOpen of [false, true]) {
    let dir = "";
    let file: Deno.FsFile | undefined;
    try {
      await assert.rejects(
        withTmpfs(8 * 4096, async (mnt) => {
          dir = mnt;
          assert.ok(await mounted(mnt), "the control: it is mounted inside");
          file = await Deno.open(join(mnt, "x"), { write: true, create: true });
          if (!leaveOpen) file.close();
          throw new Error("the test failed");
        }),
        /the test failed/,
      );
      assert.ok(!(await mounted(dir)), `leaveOpen=${leaveOpen}: ${dir} is still mounted`);
    } finally {
      if (leaveOpen) file?.close();
      if (dir && (await mounted(dir))) {
        await realRunner.output("umount", [dir], { check: false, timeoutMs: 10_000 });
        await Deno.remove(dir, { recursive: true }).catch(() => {});
      }
    }
  }
});
