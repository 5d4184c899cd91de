/**
 * Test support: finding a test's own processes by an argv marker, with everything they started
 * (a /proc scan). Not used by production code.
 */
import { parseProcStat } from "../../process/mod.ts";

/** The pids of live processes whose argv carries `marker`, and of all their descendants. */
export function processesWith(marker: string): number[] {
  const parent = new Map<number, number>();
  const found = new Set<number>();
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const st = parseProcStat(Deno.readTextFileSync(`/proc/${e.name}/stat`));
      if (!st || st.state === "Z" || st.state === "X") continue; // zombies are gone
      parent.set(Number(e.name), st.ppid);
      if (Deno.readTextFileSync(`/proc/${e.name}/cmdline`).includes(marker)) {
        found.add(Number(e.name));
      }
    } catch { /* gone */ }
  }
  for (let grew = true; grew;) {
    grew = false;
    for (const [pid, ppid] of parent) {
      if (!found.has(pid) && found.has(ppid)) {
        found.add(pid);
        grew = true;
      }
    }
  }
  return [...found].sort((a, b) => a - b);
}
