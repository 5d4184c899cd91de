/**
 * tasks: whether the agent can contain each task (one cgroup v2 each, src/agent/task_cgroup.ts):
 * where it cannot, what a task moves out of its process group (`setsid`, a double fork) outlives
 * its timeout, its cancel and the agent, and this says so.
 *
 * On a robot host whose agent runs from the systemd unit (`k8s4r agent service --install`): the
 * unit must delegate its cgroup (Delegate=yes) on a cgroup v2 host. Otherwise (devenv, an agent
 * started by hand): judged for this process, as the agent started from here would be.
 */
import { join } from "node:path";
import { judgeCgroup, locateCgroup } from "../../agent/task_cgroup.ts";
import { errorMessage } from "../../cli/errors.ts";
import { AGENT_UNIT_PATH } from "../../fleet/paths.ts";
import { type Check, type CheckResult, ok, warn } from "../check.ts";
import { fsHangHint } from "./common.ts";

const ESCAPES =
  "what a task moves out of its process group (setsid) outlives its timeout, cancel and the agent";

const containment: Check = {
  id: "tasks.containment",
  group: "tasks",
  title: "each task in a cgroup of its own",
  timeout: { hint: (ctx) => fsHangHint(ctx, "/proc/self/mountinfo") },
  async run(ctx): Promise<CheckResult> {
    let mountinfo: string;
    let procCgroup: string;
    try {
      mountinfo = await ctx.fs.readTextFile("/proc/self/mountinfo");
      procCgroup = await ctx.fs.readTextFile("/proc/self/cgroup");
    } catch (err) {
      return warn(
        `cannot tell whether tasks are contained: ${errorMessage(err)}`,
        "run the doctor on the Linux host that runs the agent (it reads /proc/self/mountinfo)",
      );
    }
    const loc = locateCgroup(mountinfo, procCgroup);
    const unit = ctx.robotHost
      ? await ctx.fs.readTextFile(AGENT_UNIT_PATH).catch(() => undefined)
      : undefined;
    if (unit !== undefined) {
      // The agent runs as root from the unit: its cgroup is the unit's, not this shell's.
      if (!loc.ok && /cgroup v1 only/.test(loc.reason)) {
        return warn(`tasks are not contained: ${loc.reason}: ${ESCAPES}`, loc.hint);
      }
      if (!/^Delegate=yes\s*$/m.test(unit)) {
        return warn(
          `tasks are not contained: ${AGENT_UNIT_PATH} does not delegate its cgroup (no Delegate=yes): ${ESCAPES}`,
          "k8s4r agent service --install; systemctl daemon-reload; systemctl restart k8s4r-agent",
        );
      }
      return ok(
        `${AGENT_UNIT_PATH}: Delegate=yes on cgroup v2: each task gets a cgroup, killed whole (cgroup.kill)`,
        ["the agent logs tasks.containment at start (tasks.uncontained with the reason if not)"],
      );
    }
    if (!loc.ok) return warn(`tasks are not contained: ${loc.reason}: ${ESCAPES}`, loc.hint);
    const parentOwner = (await ctx.fs.stat(loc.parent))?.uid;
    const hasKill = (await ctx.fs.stat(join(loc.parent, "cgroup.kill"))) !== undefined;
    const j = judgeCgroup(loc, ctx.uid, parentOwner, hasKill);
    if (j.kind === "none") return warn(`tasks are not contained: ${j.reason}: ${ESCAPES}`, j.hint);
    return ok(
      `an agent started here (uid ${ctx.uid}) gives each task a cgroup under ${j.parent}, killed whole (cgroup.kill)`,
      [
        "the agent probes it at start and logs tasks.containment (tasks.uncontained with the reason if the probe fails)",
        ...(ctx.uid === 0 ? [] : [
          "without tasks.user a task runs as the agent's uid, owns its cgroup and could leave it",
        ]),
      ],
    );
  },
};

export const taskChecks: Check[] = [containment];

/** On a robot host: after its config (not enrolled: nothing to judge). */
export const robotTaskChecks: Check[] = [{ ...containment, dependsOn: ["enrollment.config"] }];
