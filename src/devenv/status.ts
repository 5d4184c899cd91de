/**
 * `devenv status`: every row of the component table that has a status: whether it runs (pid
 * alive AND the very process devenv started: the pid file's start time must match), whether it
 * is healthy (its own probe), its endpoint, and for the broker and the agents the SVID expiry;
 * plus whether the exported trust bundle equals SPIRE's current one. Rows are asked
 * concurrently and printed in table order.
 */
import { colorEnabled } from "../cli/io.ts";
import { devenvComponents, type StackView, stackView } from "./components.ts";
import type { DevenvContext } from "./context.ts";
import { type ComponentStatus, renderJson, renderTable } from "./render.ts";

/** The status rows of `view`'s table (default: every robot this stack knows). */
export async function collectStatus(view: StackView): Promise<ComponentStatus[]> {
  const rows = devenvComponents(view).flatMap((c) => (c.status ? [c.status] : []));
  return await Promise.all(rows.map((status) => status(view)));
}

export async function devenvStatus(ctx: DevenvContext, json: boolean): Promise<number> {
  const rows = await collectStatus(stackView(ctx));
  ctx.io.stdout.write(json ? renderJson(rows) : renderTable(rows, colorEnabled(ctx.io)));
  return rows.every((r) => r.running && r.healthy) ? 0 : 1;
}
