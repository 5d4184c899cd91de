/**
 * The dependency graph of the devenv component table, independent of what a component is: a
 * check that the table is well formed, and a runner that starts every node as soon as the nodes
 * it needs are done, so independent components come up in parallel.
 */

export interface GraphNode {
  name: string;
  /** Names of the nodes this one waits for. */
  needs: readonly string[];
}

/** Throws when a name is used twice, a need names no node, or the needs form a cycle. */
export function checkGraph(nodes: readonly GraphNode[]): void {
  const byName = new Map<string, GraphNode>();
  for (const n of nodes) {
    if (byName.has(n.name)) throw new Error(`component table: '${n.name}' appears twice`);
    byName.set(n.name, n);
  }
  for (const n of nodes) {
    for (const d of n.needs) {
      if (!byName.has(d)) throw new Error(`component table: '${n.name}' needs unknown '${d}'`);
    }
  }
  const state = new Map<string, "visiting" | "done">();
  const visit = (n: GraphNode, path: string[]) => {
    if (state.get(n.name) === "done") return;
    if (state.get(n.name) === "visiting") {
      const cycle = [...path.slice(path.indexOf(n.name)), n.name];
      throw new Error(`component table: dependency cycle ${cycle.join(" -> ")}`);
    }
    state.set(n.name, "visiting");
    for (const d of n.needs) visit(byName.get(d)!, [...path, n.name]);
    state.set(n.name, "done");
  };
  for (const n of nodes) visit(n, []);
}

/** A node that did not run because one it needs failed. */
export class SkippedError extends Error {
  constructor(readonly node: string, readonly because: string) {
    super(`${node}: not started because ${because} failed`);
    this.name = "SkippedError";
  }
}

export interface RunGraphOptions<N extends GraphNode> {
  /**
   * Which of `node.needs` to wait for this time (default: all). Lets a node skip a dependency
   * it does not need right now, e.g. a broker whose certificate on disk is still good.
   */
  needsNow?: (node: N) => Promise<readonly string[]>;
}

/**
 * Runs `run(node)` for every node, each as soon as the nodes it needs have succeeded, all others
 * concurrently. When a node fails, the nodes that need it are not run (they are reported as
 * `SkippedError`); independent nodes go on. Resolves once every node has settled; rejects with
 * the first real failure in table order.
 */
export async function runGraph<N extends GraphNode>(
  nodes: readonly N[],
  run: (node: N) => Promise<void>,
  opts: RunGraphOptions<N> = {},
): Promise<void> {
  checkGraph(nodes);
  const done = new Map<string, Promise<void>>();
  const byName = new Map(nodes.map((n) => [n.name, n]));
  const start = (n: N): Promise<void> => {
    const existing = done.get(n.name);
    if (existing) return existing;
    const p = (async () => {
      // needsNow may drop needs, never add one the table does not declare.
      const needs = opts.needsNow
        ? (await opts.needsNow(n)).filter((d) => n.needs.includes(d))
        : n.needs;
      const results = await Promise.allSettled(needs.map((d) => start(byName.get(d)!)));
      const failed = results.findIndex((r) => r.status === "rejected");
      if (failed >= 0) {
        const err = (results[failed] as PromiseRejectedResult).reason;
        throw new SkippedError(n.name, err instanceof SkippedError ? err.because : needs[failed]);
      }
      await run(n);
    })();
    done.set(n.name, p);
    return p;
  };
  const settled = await Promise.allSettled(nodes.map(start));
  const errors = settled.flatMap((r) => (r.status === "rejected" ? [r.reason] : []));
  const real = errors.find((e) => !(e instanceof SkippedError));
  if (real !== undefined) throw real;
  if (errors.length) throw errors[0];
}
