/** Where a secret value shows up: files under a directory, and processes' argv. */
import { join } from "node:path";

/** Every file under `dir` (recursively) whose content contains `needle`. */
export function filesContaining(dir: string, needle: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    let entries: Deno.DirEntry[] = [];
    try {
      entries = [...Deno.readDirSync(d)];
    } catch {
      return;
    }
    for (const e of entries) {
      const p = join(d, e.name);
      if (e.isDirectory) walk(p);
      else if (e.isFile) {
        try {
          if (Deno.readTextFileSync(p).includes(needle)) out.push(p);
        } catch { /* unreadable or binary */ }
      }
    }
  };
  walk(dir);
  return out;
}

/** Every process whose argv contains `needle`. */
export function cmdlinesContaining(needle: string): number[] {
  const pids: number[] = [];
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      if (Deno.readTextFileSync(`/proc/${e.name}/cmdline`).includes(needle)) {
        pids.push(Number(e.name));
      }
    } catch { /* gone */ }
  }
  return pids;
}

/** Files under `dirs` holding `secret` that are logs, or readable by group or others. */
export function exposedIn(dirs: string[], secret: string): string[] {
  return dirs.flatMap((d) => filesContaining(d, secret)).filter((f) =>
    f.endsWith(".log") || ((Deno.statSync(f).mode ?? 0) & 0o077) !== 0
  );
}
