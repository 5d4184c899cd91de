/**
 * The README's runnable command blocks: a `<!-- e2e: NAME -->` marker line followed by a ```sh
 * block. Each `deno task k8s4r ARGS...` line of it is one k8s4r command, which the e2e suite
 * runs, so the README cannot drift from what works. Comment lines (`#`) are skipped; a line
 * that is not a k8s4r command is an error (the README would show what the test cannot run).
 */
import { fileURLToPath } from "node:url";

export const README = fileURLToPath(new URL("../../README.md", import.meta.url));

export function readmeCommands(text: string, name: string): string[][] {
  const marker = `<!-- e2e: ${name} -->`;
  const at = text.indexOf(marker);
  if (at < 0) throw new Error(`README.md: no '${marker}' block`);
  // `deno fmt` puts a blank line between the marker and the block.
  const lines = text.slice(at + marker.length).split("\n").slice(1);
  while (lines.length && lines[0].trim() === "") lines.shift();
  if (!lines[0]?.startsWith("```sh")) {
    throw new Error(`README.md: '${marker}' is not followed by a \`\`\`sh block`);
  }
  const out: string[][] = [];
  for (const l of lines.slice(1)) {
    if (l.startsWith("```")) return out;
    const t = l.replace(/\s+#.*$/, "").trim();
    if (t === "" || t.startsWith("#")) continue;
    const m = /^deno task k8s4r (.+)$/.exec(t);
    if (!m) throw new Error(`README.md, block '${name}': not a k8s4r command: ${l}`);
    out.push(m[1].split(/\s+/));
  }
  throw new Error(`README.md: the '${name}' block is not closed`);
}
