/**
 * `devenv logs [component...] [-f] [-n N]`: every component logs to `.dev-env/<component>.log`;
 * this prints them with a `component | ` prefix like `docker compose logs`, coloured only on a
 * TTY without NO_COLOR. `-f` keeps following (growth of each file, polled) until the command's
 * signal fires.
 */
import { UsageError } from "../cli/errors.ts";
import { colorEnabled } from "../cli/io.ts";
import { delay, tailFile } from "../process/mod.ts";
import { closest } from "../cli/mod.ts";
import { devenvComponents, type LogSource, stackView } from "./components.ts";
import type { DevenvContext } from "./context.ts";
import { logPrefix, prefixLines } from "./render.ts";

export type { LogSource };

/** Every log of the component table, in table order. */
export function logSources(ctx: DevenvContext): LogSource[] {
  return devenvComponents(stackView(ctx)).flatMap((c) => c.logs ?? []);
}

/** Picks the requested components (all by default); unknown names are a usage error. */
export function selectSources(all: LogSource[], names: string[]): LogSource[] {
  if (names.length === 0) return all;
  return names.map((n) => {
    const s = all.find((x) => x.name === n);
    if (!s) {
      const c = closest(n, all.map((x) => x.name));
      throw new UsageError(
        `devenv logs: unknown component '${n}'${c ? ` (did you mean '${c}'?)` : ""}; known: ${
          all.map((x) => x.name).join(", ")
        }`,
      );
    }
    return s;
  });
}

async function fileSize(path: string): Promise<number> {
  try {
    return (await Deno.stat(path)).size;
  } catch {
    return 0;
  }
}

export async function devenvLogs(
  ctx: DevenvContext,
  names: string[],
  follow: boolean,
  lines: number,
): Promise<number> {
  const { io } = ctx;
  if (!Number.isInteger(lines) || lines < 0) {
    throw new UsageError(`devenv logs: -n expects a whole number >= 0, got ${lines}`);
  }
  const sources = selectSources(logSources(ctx), names);
  const color = colorEnabled(io);
  const width = Math.max(...sources.map((s) => s.name.length));
  const prefixes = new Map(sources.map((s, i) => [s.name, logPrefix(s.name, width, i, color)]));
  const offsets = new Map<string, number>();
  for (const s of sources) {
    // Record the size before reading the tail, so following never skips a line.
    offsets.set(s.name, await fileSize(s.file));
    if (lines > 0) {
      io.stdout.write(prefixLines(await tailFile(s.file, lines), prefixes.get(s.name)!));
    }
  }
  if (!follow) return 0;
  const partial = new Map<string, string>();
  const decoder = new TextDecoder();
  while (!io.signal.aborted) {
    for (const s of sources) {
      const size = await fileSize(s.file);
      let off = offsets.get(s.name)!;
      if (size < off) off = 0; // truncated or recreated (clean + start)
      if (size === off) continue;
      let chunk: Uint8Array;
      try {
        using f = await Deno.open(s.file, { read: true });
        await f.seek(off, Deno.SeekMode.Start);
        chunk = new Uint8Array(size - off);
        let read = 0;
        while (read < chunk.length) {
          const n = await f.read(chunk.subarray(read));
          if (n === null) break;
          read += n;
        }
        chunk = chunk.subarray(0, read);
      } catch {
        continue;
      }
      offsets.set(s.name, off + chunk.length);
      const text = (partial.get(s.name) ?? "") + decoder.decode(chunk);
      const cut = text.lastIndexOf("\n");
      partial.set(s.name, text.slice(cut + 1));
      if (cut >= 0) io.stdout.write(prefixLines(text.slice(0, cut + 1), prefixes.get(s.name)!));
    }
    try {
      await delay(200, io.signal);
    } catch {
      break;
    }
  }
  return 0;
}
