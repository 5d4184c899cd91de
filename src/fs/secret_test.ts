import assert from "node:assert/strict";
import { join } from "node:path";
import { readSecretFile } from "./secret.ts";

Deno.test("readSecretFile: 0600/0400 of this user; readable by others, another user's, not a file, missing: refused", async () => {
  if (Deno.uid() !== 0) throw new Error("chowns a file to another user: run as root");
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-secret-" });
  try {
    const f = join(dir, "pw");
    await Deno.writeTextFile(f, "s3cret\n");
    await Deno.chmod(f, 0o600);
    assert.equal(await readSecretFile(f, "test password"), "s3cret\n", "the control: 0600, ours");
    await Deno.chmod(f, 0o400);
    assert.equal(await readSecretFile(f, "test password"), "s3cret\n");
    for (const m of [0o640, 0o604, 0o644, 0o620]) {
      await Deno.chmod(f, m);
      await assert.rejects(
        readSecretFile(f, "test password"),
        new RegExp(
          `^Error: ${f}: test password is readable by group or others \\(mode ${
            m.toString(8)
          }, expected 600\\); run chmod 600 ${f}$`,
        ),
      );
    }
    await Deno.chmod(f, 0o600);
    await Deno.chown(f, 65534, 65534);
    await assert.rejects(
      readSecretFile(f, "test password"),
      /belongs to uid 65534, not to this user \(uid 0\) or root; run chown 0/,
    );
    await assert.rejects(readSecretFile(dir, "test password"), /is not a regular file/);
    await assert.rejects(
      readSecretFile(join(dir, "nope"), "test password"),
      /test password not found/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
