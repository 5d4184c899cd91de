import assert from "node:assert/strict";
import {
  BEGIN_MARKER,
  END_MARKER,
  figure,
  mergeResults,
  renderMarkdown,
  type Results,
  spliceGenerated,
} from "./report.ts";

function results(figs: ReturnType<typeof figure>[]): Results {
  return {
    generatedAt: "2025-01-01T00:00:00.000Z",
    machine: { cpus: 2, cpuModel: "cpu", kernel: "6.1", memTotalMb: 1000, deno: "2.9.6" },
    options: { quick: false, robots: 1000 },
    benchmarks: {
      startup: {
        name: "startup",
        ok: true,
        startedAt: "2025-01-01T00:00:00.000Z",
        durationMs: 1000,
        figures: figs,
        notes: ["a note"],
      },
    },
  };
}

Deno.test("figure computes the statistics and whether the target is met", () => {
  const f = figure("x", "X", "ms", [10, 20, 30], {
    target: { op: "<=", value: 25, on: "median" },
  });
  assert.equal(f.runs, 3);
  assert.equal(f.median, 20);
  assert.equal(f.min, 10);
  assert.equal(f.max, 30);
  assert.equal(f.met, true);
  const g = figure("y", "Y", "ms", [10, 20, 30], {
    target: { op: "<=", value: 25, on: "max" },
    runs: 1,
  });
  assert.equal(g.met, false);
  assert.equal(g.runs, 1);
  assert.equal(g.samples, 3);
  const h = figure("z", "Z", "msg/s", [100], { target: { op: ">=", value: 50, on: "median" } });
  assert.equal(h.met, true);
});

Deno.test("the table shows runs, median, spread, target and verdict", () => {
  const md = renderMarkdown(results([
    figure("x", "Total", "s", [1, 2, 3], { target: { op: "<=", value: 1.5, on: "median" } }),
  ]));
  assert.match(md, /\| startup \| Total \| 3 \| 2 s \| 1 s – 3 s \|/);
  assert.match(md, /≤ 1.5 s \| ✗ missed \|/);
  assert.match(md, /- a note/);
});

Deno.test("spliceGenerated keeps the hand-written text around the markers", () => {
  const doc = `# Title\n\nMethod.\n\n${BEGIN_MARKER}\nold\n${END_MARKER}\n\nAfter.\n`;
  const out = spliceGenerated(doc, "NEW TABLE");
  assert.ok(out.startsWith("# Title\n\nMethod.\n\n"));
  assert.ok(out.includes("NEW TABLE"));
  assert.ok(!out.includes("old"));
  assert.ok(out.endsWith("\n\nAfter.\n"));
  const appended = spliceGenerated("# Doc\n", "T");
  assert.ok(appended.startsWith("# Doc\n"));
  assert.ok(appended.includes(BEGIN_MARKER) && appended.includes("T"));
});

Deno.test("mergeResults keeps benchmarks the newest run did not repeat", () => {
  const a = results([figure("x", "X", "s", [1])]);
  const b: Results = { ...results([]), benchmarks: {} };
  b.benchmarks.doctor = { ...a.benchmarks.startup, name: "doctor" };
  const m = mergeResults(a, b);
  assert.deepEqual(Object.keys(m.benchmarks).sort(), ["doctor", "startup"]);
  assert.equal(mergeResults(undefined, b), b);
});
