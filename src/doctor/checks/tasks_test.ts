import assert from "node:assert/strict";
import { AGENT_UNIT_PATH, robotHostPaths } from "../../fleet/paths.ts";
import { fakeContext, type FakeOptions } from "../testing.ts";
import { taskChecks } from "./tasks.ts";

const UNIFIED = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev - cgroup2 cgroup2 rw\n";
const V1 = "40 31 0:37 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
const SESSION = "/sys/fs/cgroup/user.slice/user-0.slice/session-1.scope";
const check = taskChecks[0];

function host(o: FakeOptions & { mountinfo?: string; owner?: number; kill?: boolean } = {}) {
  const { mountinfo = UNIFIED, owner = 0, kill = true, ...rest } = o;
  return fakeContext({
    ...rest,
    files: {
      "/proc/self/mountinfo": mountinfo,
      "/proc/self/cgroup": "0::/user.slice/user-0.slice/session-1.scope\n",
      ...rest.files,
    },
    stats: {
      [SESSION]: { isDirectory: true, uid: owner },
      ...(kill ? { [`${SESSION}/cgroup.kill`]: { isFile: true, uid: owner } } : {}),
      ...rest.stats,
    },
  });
}

Deno.test("tasks.containment: root on cgroup v2 contains; a non-root agent without delegation is warned", async () => {
  const good = await check.run(host());
  assert.equal(good.status, "ok", good.detail);
  assert.match(good.detail, new RegExp(`a cgroup under ${SESSION}, killed whole`));
  const user = await check.run({ ...host(), uid: 1000 });
  assert.equal(user.status, "warn");
  assert.match(
    user.detail,
    /^tasks are not contained: .* belongs to uid 0, not to the agent \(uid 1000\): what a task moves out of its process group \(setsid\) outlives/,
  );
  assert.match(user.hint!, /Delegate=yes/);
  // Positive control: a delegated cgroup (owned by the agent's uid) contains.
  const delegated = await check.run({ ...host({ owner: 1000 }), uid: 1000 });
  assert.equal(delegated.status, "ok", delegated.detail);
  assert.ok(delegated.info?.some((l) => /without tasks\.user a task .* could leave it/.test(l)));
  const v1 = await check.run(host({ mountinfo: V1 }));
  assert.equal(v1.status, "warn");
  assert.match(v1.detail, /cgroup v1 only/);
  assert.match(v1.hint!, /cgroup v2/);
  const old = await check.run(host({ kill: false }));
  assert.equal(old.status, "warn");
  assert.match(old.detail, /older than Linux 5\.14/);
  const ro = await check.run(host({ mountinfo: UNIFIED.replace(" rw,nosuid", " ro,nosuid") }));
  assert.equal(ro.status, "warn");
  assert.match(ro.detail, /read-only/);
});

Deno.test("tasks.containment on a robot host: the unit must delegate its cgroup", async () => {
  const robotHost = { paths: robotHostPaths("/srv/robot"), reason: "--robot" };
  const unit = (delegate: boolean) =>
    host({
      robotHost,
      files: {
        [AGENT_UNIT_PATH]: `[Service]\nKillMode=mixed\n${delegate ? "Delegate=yes\n" : ""}`,
      },
    });
  const without = await check.run(unit(false));
  assert.equal(without.status, "warn");
  assert.match(without.detail, /does not delegate its cgroup \(no Delegate=yes\)/);
  assert.match(without.hint!, /^k8s4r agent service --install/);
  const withIt = await check.run(unit(true));
  assert.equal(withIt.status, "ok", withIt.detail);
  assert.match(withIt.detail, /Delegate=yes on cgroup v2/);
});
