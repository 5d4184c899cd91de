/**
 * The README's command blocks that tests run verbatim. A block is the first ```sh fence after a
 * `<!-- e2e:NAME -->` marker; its `# HOST...` comments say where the lines below them run
 * (`control host`, or a robot id), "copy FILE here" says what comes from the other host first,
 * and every `k8s4r ...` line is one step. tests/e2e/remote_robots_test.ts runs them in order;
 * tests/readme_commands_test.ts parses each one with the CLI.
 */
import { fileURLToPath } from "node:url";

export const README = fileURLToPath(new URL("../../README.md", import.meta.url));

export interface ReadmeStep {
  /** `control host` or a robot id. */
  host: string;
  /** Files to copy to this host before the step (from whoever has them). */
  copy: string[];
  /** argv, starting with `k8s4r`. */
  argv: string[];
  /** The line in README.md, 1-based. */
  line: number;
  text: string;
}

export function readmeSteps(name: string, text = Deno.readTextFileSync(README)): ReadmeStep[] {
  const lines = text.split("\n");
  const at = lines.findIndex((l) => l.trim() === `<!-- e2e:${name} -->`);
  if (at < 0) throw new Error(`README.md: no <!-- e2e:${name} --> marker`);
  const open = lines.findIndex((l, i) => i > at && l.trim() === "```sh");
  const close = lines.findIndex((l, i) => i > open && l.trim() === "```");
  if (open < 0 || close < 0) throw new Error(`README.md:${at + 1}: no \`\`\`sh block after it`);
  const steps: ReadmeStep[] = [];
  let host: string | undefined;
  let copy: string[] = [];
  for (let i = open + 1; i < close; i++) {
    const l = lines[i].trim();
    if (!l) continue;
    const h = /^# (control host|robot-[a-z0-9-]+)\b(.*)$/.exec(l);
    if (h) {
      host = h[1];
      copy = [...h[2].matchAll(/copy (\S+) here/g)].map((m) => m[1]);
      continue;
    }
    if (l.startsWith("#")) throw new Error(`README.md:${i + 1}: a comment that names no host`);
    if (!l.startsWith("k8s4r ")) {
      throw new Error(`README.md:${i + 1}: expected a k8s4r command, got '${l}'`);
    }
    if (!host) throw new Error(`README.md:${i + 1}: a command before any '# HOST' line`);
    steps.push({ host, copy, argv: l.split(/\s+/), line: i + 1, text: l });
    copy = [];
  }
  return steps;
}
