import assert from "node:assert/strict";
import { renderHuman, renderJson } from "./render.ts";
import type { Report } from "./runner.ts";

const report: Report = {
  checks: [
    {
      id: "tools.a",
      group: "tools",
      title: "A",
      status: "ok",
      detail: "fine",
      ms: 3,
      info: ["v1"],
    },
    {
      id: "tools.b",
      group: "tools",
      title: "B",
      status: "warn",
      detail: "hmm",
      hint: "do b",
      ms: 4,
    },
    {
      id: "broker.c",
      group: "broker",
      title: "C",
      status: "fail",
      detail: "bad",
      hint: "do c",
      ms: 5,
    },
    {
      id: "broker.d",
      group: "broker",
      title: "D",
      status: "skip",
      detail: "skipped: broker.c failed",
      ms: 0,
    },
    { id: "broker.e", group: "broker", title: "E", status: "crash", detail: "kaput", ms: 1 },
  ],
  summary: { ok: 1, warn: 1, fail: 1, skip: 1, crash: 1 },
  ms: 12,
};

Deno.test("render: human output, colour off, one snapshot covering every status", () => {
  assert.equal(
    renderHuman(report, { color: false, verbose: false }),
    [
      "[tools]",
      "✓ A",
      "    fine",
      "! B",
      "    hmm",
      "    hint: do b",
      "",
      "[broker]",
      "✗ C",
      "    bad",
      "    hint: do c",
      "- D",
      "    skipped: broker.c failed",
      "☠ E",
      "    kaput",
      "",
      "1 ok, 1 warnings, 1 failed, 1 skipped, 1 crashed in 12 ms",
      "",
    ].join("\n"),
  );
});

Deno.test("render: --verbose adds timings and info lines", () => {
  const out = renderHuman(report, { color: false, verbose: true });
  assert.ok(out.startsWith("[tools]\n✓ A (3 ms)\n    fine\n      v1\n! B (4 ms)\n"), out);
});

Deno.test("render: colour codes only when asked", () => {
  assert.ok(renderHuman(report, { color: true, verbose: false }).includes("\x1b[32m✓\x1b[0m A"));
  assert.ok(!renderHuman(report, { color: false, verbose: false }).includes("\x1b["));
});

Deno.test("render: JSON has exactly the documented shape", () => {
  const j = JSON.parse(renderJson(report));
  assert.deepEqual(Object.keys(j), ["checks", "summary"]);
  assert.deepEqual(j.checks[0], {
    id: "tools.a",
    group: "tools",
    title: "A",
    status: "ok",
    detail: "fine",
    hint: null,
    ms: 3,
  });
  assert.deepEqual(j.checks[2], {
    id: "broker.c",
    group: "broker",
    title: "C",
    status: "fail",
    detail: "bad",
    hint: "do c",
    ms: 5,
  });
  assert.deepEqual(j.summary, { ok: 1, warn: 1, fail: 1, skip: 1, crash: 1 });
});
