import assert from "node:assert/strict";
import {
  applyHeartbeat,
  firstHeartbeat,
  type HeartbeatWindow,
  openGaps,
  WINDOW,
} from "./heartbeat_window.ts";

function run(seqs: number[]): { state: HeartbeatWindow; received: number; dups: number } {
  let state = firstHeartbeat(seqs[0]);
  let received = 1;
  let dups = 0;
  for (const s of seqs.slice(1)) {
    const v = applyHeartbeat(state, s);
    if (v.kind === "new") {
      state = v.state;
      received++;
    } else dups++;
  }
  return { state, received, dups };
}

const missing = (w: HeartbeatWindow) => w.lost + openGaps(w.max, w.window, w.low);

Deno.test("heartbeat window: any order of 1..n counts n, none missing", () => {
  const seqs = Array.from({ length: 300 }, (_, i) => i + 1);
  for (let k = 0; k < 20; k++) {
    const shuffled = [...seqs].sort(() => Math.random() - 0.5);
    const r = run([...shuffled, ...shuffled.slice(0, 50)]);
    assert.equal(r.received, 300);
    assert.equal(r.dups, 50);
    assert.equal(missing(r.state), 0);
    assert.equal(r.state.max, 300);
    assert.equal(r.state.low, 1);
  }
});

Deno.test("heartbeat window: gaps are open until filled, final once out of the window", () => {
  let r = run([1, 2, 5]);
  assert.equal(missing(r.state), 2);
  r = run([1, 2, 5, 3]);
  assert.equal(missing(r.state), 1);
  // 4 leaves the window unseen: lost for good, and too old afterwards.
  r = run([1, 2, 3, 5, 5 + WINDOW]);
  assert.equal(r.state.lost, 1, "4 left the window unseen");
  assert.equal(missing(r.state), 1 + WINDOW - 1, "and 6 .. 4 + WINDOW are open gaps");
  const late = applyHeartbeat(r.state, 4);
  assert.equal(late.kind, "too-old");
});

Deno.test("heartbeat window: a jump far ahead counts the skipped seqs once", () => {
  const r = run([1, 10_001]);
  assert.equal(missing(r.state), 9_999);
  assert.equal(r.received, 2);
  // The window after a jump holds only the new seq; earlier in-window seqs can fill it.
  const back = applyHeartbeat(r.state, 10_000);
  assert.equal(back.kind, "new");
  if (back.kind === "new") assert.equal(missing(back.state), 9_998);
});

Deno.test("heartbeat window: a row written before the window (null) knows only its max", () => {
  const v = applyHeartbeat({ max: 7, window: null, low: null, lost: 3 }, 7);
  assert.equal(v.kind, "duplicate");
  const n = applyHeartbeat({ max: 7, window: null, low: null, lost: 3 }, 9);
  assert.equal(n.kind, "new");
  if (n.kind === "new") assert.equal(missing(n.state), 3 + 1);
  assert.equal(openGaps(7, null, null), 0);
});
