import assert from "node:assert/strict";
import { mean, median, percentile, rateInWindow, round, summarize } from "./stats.ts";

Deno.test("percentile interpolates between closest ranks", () => {
  const v = [1, 2, 3, 4];
  assert.equal(percentile(v, 0), 1);
  assert.equal(percentile(v, 100), 4);
  assert.equal(percentile(v, 50), 2.5);
  assert.equal(percentile(v, 25), 1.75);
  assert.equal(percentile([7], 99), 7);
});

Deno.test("percentile does not depend on input order and does not mutate it", () => {
  const v = [9, 1, 5, 3, 7];
  assert.equal(median(v), 5);
  assert.deepEqual(v, [9, 1, 5, 3, 7]);
  assert.equal(percentile(v, 90), 8.2);
});

Deno.test("percentile rejects empty lists, bad q and non-finite values", () => {
  assert.throws(() => percentile([], 50), RangeError);
  assert.throws(() => percentile([1], 101), RangeError);
  assert.throws(() => percentile([1], -1), RangeError);
  assert.throws(() => percentile([1, NaN], 50), RangeError);
});

Deno.test("summarize gives count, median, spread and tail", () => {
  const v = Array.from({ length: 100 }, (_, i) => i + 1); // 1..100
  const s = summarize(v);
  assert.equal(s.n, 100);
  assert.equal(s.median, 50.5);
  assert.equal(s.min, 1);
  assert.equal(s.max, 100);
  assert.equal(round(s.p10, 4), 10.9);
  assert.equal(round(s.p90, 4), 90.1);
  assert.equal(round(s.p99, 4), 99.01);
  assert.equal(s.mean, 50.5);
  assert.throws(() => summarize([]), RangeError);
  assert.equal(mean([2, 4]), 3);
});

Deno.test("round keeps significant digits", () => {
  assert.equal(round(1234.567), 1235);
  assert.equal(round(0.012345), 0.0123);
  assert.equal(round(1.5, 2), 1.5);
  assert.equal(round(0), 0);
});

Deno.test("rateInWindow uses the samples inside the window", () => {
  const s = [
    { t: 0, count: 0 },
    { t: 1000, count: 100 },
    { t: 2000, count: 300 },
    { t: 3000, count: 600 },
  ];
  assert.equal(rateInWindow(s, 1000, 3000), 250);
  assert.equal(rateInWindow(s, 0, 1000), 100);
  assert.equal(rateInWindow(s, 1500, 2500), undefined);
});
