import assert from "node:assert/strict";
import { checkGraph, type GraphNode, runGraph, SkippedError } from "./graph.ts";

const n = (name: string, ...needs: string[]): GraphNode => ({ name, needs });

Deno.test("checkGraph: duplicates, unknown needs and cycles are refused, naming the nodes", () => {
  checkGraph([n("a"), n("b", "a"), n("c", "a", "b")]); // a well-formed table passes
  assert.throws(() => checkGraph([n("a"), n("a")]), /'a' appears twice/);
  assert.throws(() => checkGraph([n("a", "x")]), /'a' needs unknown 'x'/);
  assert.throws(
    () => checkGraph([n("a", "c"), n("b", "a"), n("c", "b")]),
    /dependency cycle a -> c -> b -> a/,
  );
  assert.throws(() => checkGraph([n("a", "a")]), /cycle a -> a/);
});

/** A promise with its resolve function. */
function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void;
  const promise = new Promise<void>((r) => (open = r));
  return { promise, open };
}

Deno.test("runGraph: independent nodes run at the same time, a node waits for all it needs", async () => {
  const log: string[] = [];
  const started = { a: gate(), b: gate() };
  // a and b each wait until the other has started: this only finishes if they overlap.
  await runGraph([n("a"), n("b"), n("c", "a", "b")], async (node) => {
    log.push(`start ${node.name}`);
    if (node.name === "a") {
      started.a.open();
      await started.b.promise;
    } else if (node.name === "b") {
      started.b.open();
      await started.a.promise;
    }
    log.push(`end ${node.name}`);
  });
  assert.deepEqual(log.slice(0, 2).sort(), ["start a", "start b"]);
  assert.deepEqual(log.slice(-2), ["start c", "end c"]);
});

Deno.test("runGraph: a failure skips what needs it, lets the rest run, and is what it throws", async () => {
  const ran: string[] = [];
  const err = await runGraph(
    [n("a"), n("b", "a"), n("c", "b"), n("d")],
    (node) => {
      ran.push(node.name);
      return node.name === "a" ? Promise.reject(new Error("a broke")) : Promise.resolve();
    },
  ).then(() => undefined, (e) => e);
  assert.ok(err instanceof Error);
  assert.equal(err.message, "a broke");
  assert.deepEqual(ran.sort(), ["a", "d"]);
  // What was skipped names the root cause, also two levels down.
  assert.equal(new SkippedError("c", "a").message, "c: not started because a failed");
});

Deno.test("runGraph: needsNow lets a node skip a need it does not have this time", async () => {
  const order: string[] = [];
  const slow = gate();
  const brokerRan = gate();
  const done = runGraph(
    [n("cert"), n("broker", "cert"), n("other", "cert")],
    async (node) => {
      if (node.name === "cert") await slow.promise;
      order.push(node.name);
      if (node.name === "broker") brokerRan.open();
    },
    { needsNow: (node) => Promise.resolve(node.name === "broker" ? [] : node.needs) },
  );
  // broker runs while cert is still busy; other still waits for it.
  await brokerRan.promise;
  assert.deepEqual(order, ["broker"]);
  slow.open();
  await done;
  assert.deepEqual(order, ["broker", "cert", "other"]);
});
