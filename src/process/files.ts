/** Files k8s4r's processes keep (state, keys, certificates): written atomically, with a mode. */
import { dirname } from "node:path";

/** Writes a file atomically (temp file + rename) with the given mode; creates the directory. */
export async function writeFileAtomic(
  path: string,
  data: string | Uint8Array,
  mode: number,
  dirMode = 0o700,
): Promise<void> {
  await Deno.mkdir(dirname(path), { recursive: true, mode: dirMode });
  const tmp = `${path}.tmp-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
  try {
    if (typeof data === "string") await Deno.writeTextFile(tmp, data, { mode });
    else await Deno.writeFile(tmp, data, { mode });
    await Deno.chmod(tmp, mode);
    await Deno.rename(tmp, path);
  } catch (err) {
    await Deno.remove(tmp).catch(() => {});
    throw err;
  }
}
