import assert from "node:assert/strict";
import type { Check, CheckResult } from "./check.ts";
import { exitCode, runChecks } from "./runner.ts";
import { fakeContext } from "./testing.ts";

function check(id: string, run: () => Promise<CheckResult>, extra: Partial<Check> = {}): Check {
  return {
    id,
    group: "tools",
    title: id,
    timeout: { hint: () => `${id} hung: run ${id} --by-hand` },
    run,
    ...extra,
  };
}
const okAfter = (ms: number, log?: string[], name?: string) => () =>
  new Promise<CheckResult>((r) =>
    setTimeout(() => {
      log?.push(name ?? "");
      r({ status: "ok", detail: "fine" });
    }, ms)
  );

Deno.test("runner: all checks start at once (concurrency)", async () => {
  let running = 0, peak = 0;
  const gate = Promise.withResolvers<void>();
  const mk = (id: string) =>
    check(id, async () => {
      running++;
      peak = Math.max(peak, running);
      if (running === 3) gate.resolve();
      await gate.promise; // only resolves once all three are in flight at the same time
      running--;
      return { status: "ok", detail: id };
    });
  const report = await runChecks([mk("a"), mk("b"), mk("c")], fakeContext(), { timeoutMs: 2000 });
  assert.equal(peak, 3);
  assert.deepEqual(report.summary, { ok: 3, warn: 0, fail: 0, skip: 0, crash: 0 });
});

Deno.test("runner: a check that hangs fails with 'timed out after N ms'", async () => {
  const hang = check("slow", () => new Promise(() => {}), { timeoutMs: 30 });
  const report = await runChecks([hang], fakeContext(), { timeoutMs: 2000 });
  assert.equal(report.checks[0].status, "fail");
  assert.equal(report.checks[0].detail, "timed out after 30 ms");
  assert.equal(exitCode(report), 1);
});

Deno.test("runner: a timeout carries the check's timeout hint (what the hang means, what to run)", async () => {
  const hang = check("slow", () => new Promise(() => {}), {
    timeoutMs: 30,
    timeout: { hint: (ctx) => `spire-agent on ${ctx.robot.agentSocket} never answered: ps` },
  });
  const report = await runChecks([hang], fakeContext(), { timeoutMs: 2000 });
  assert.equal(report.checks[0].status, "fail");
  assert.equal(
    report.checks[0].hint,
    "spire-agent on /tmp/spire-agent/agent.sock never answered: ps",
  );
});

Deno.test("runner: a timed-out check whose peer is stopped (T in /proc/PID/stat) names it and hints kill -CONT", async () => {
  const asked: unknown[] = [];
  const ctx = fakeContext({
    proc: {
      unixSocketOwner: (path) => (asked.push(path), Promise.resolve(4242)),
      stat: (pid) => Promise.resolve({ pid, comm: "spire-agent", state: "T" }),
    },
  });
  const hang = check("spire-agent.health", () => new Promise(() => {}), {
    timeoutMs: 30,
    timeout: {
      hint: () => "spire-agent is stopped or hung: k8s4r devenv status",
      peer: (c) => ({ name: "spire-agent", unixSocket: c.robot.agentSocket }),
    },
  });
  const r = (await runChecks([hang], ctx, { timeoutMs: 2000 })).checks[0];
  assert.deepEqual(asked, ["/tmp/spire-agent/agent.sock"]);
  assert.equal(r.status, "fail");
  assert.equal(
    r.detail,
    "timed out after 30 ms: spire-agent (pid 4242) serving /tmp/spire-agent/agent.sock is stopped (state T in /proc/4242/stat)",
  );
  assert.match(r.hint!, /^spire-agent \(pid 4242\) is stopped .*kill -CONT 4242/);

  // Control: the same peer, running (state S): no kill -CONT, the check's own hint.
  const running = fakeContext({
    proc: {
      unixSocketOwner: () => Promise.resolve(4242),
      stat: (pid) => Promise.resolve({ pid, comm: "spire-agent", state: "S" }),
    },
  });
  const s = (await runChecks([hang], running, { timeoutMs: 2000 })).checks[0];
  assert.match(
    s.detail,
    /spire-agent \(pid 4242\) serving \S+ is running \(state S\) but did not answer/,
  );
  assert.doesNotMatch(s.hint!, /kill -CONT/);
  assert.match(s.hint!, /k8s4r devenv status/);
});

Deno.test("runner: a TCP peer is looked up through the port's listener", async () => {
  const ctx = fakeContext({
    net: {
      listeningOwner: (port) =>
        Promise.resolve({ address: "127.0.0.1", port, pid: 77, comm: "mosquitto" }),
    },
    proc: { stat: (pid) => Promise.resolve({ pid, comm: "mosquitto", state: "T" }) },
  });
  const hang = check("broker.plain", () => new Promise(() => {}), {
    timeoutMs: 30,
    timeout: {
      hint: () => "mosquitto hung: ps",
      peer: () => ({ name: "mosquitto", tcpPort: 1883 }),
    },
  });
  const r = (await runChecks([hang], ctx, { timeoutMs: 2000 })).checks[0];
  assert.match(r.detail, /mosquitto \(pid 77\) listening on port 1883 is stopped \(state T/);
  assert.match(r.hint!, /kill -CONT 77/);
});

Deno.test("runner: a crash, and a failure without a hint, still get a hint", async () => {
  const report = await runChecks(
    [
      check("boom", () => Promise.reject(new Error("kaput"))),
      check("bare", () => Promise.resolve({ status: "fail", detail: "no" })),
      check("nothing", () => Promise.resolve(undefined as unknown as CheckResult)),
    ],
    fakeContext(),
    { timeoutMs: 2000 },
  );
  for (const c of report.checks) {
    assert.ok(c.status === "fail" || c.status === "crash", c.id);
    assert.ok(c.hint && c.hint.length > 10, `${c.id} has no hint`);
    assert.match(c.hint!, /k8s4r doctor --only tools --verbose/);
  }
});

Deno.test("runner: a thrown error becomes crash with its message", async () => {
  const boom = check("boom", () => Promise.reject(new Error("kaput\nstack...")));
  const report = await runChecks([boom], fakeContext(), { timeoutMs: 2000 });
  assert.deepEqual(
    { status: report.checks[0].status, detail: report.checks[0].detail },
    { status: "crash", detail: "kaput" },
  );
  assert.equal(exitCode(report), 1);
});

Deno.test("runner: dependents of a failed check are skipped with the reason", async () => {
  const report = await runChecks(
    [
      check(
        "agent.socket",
        () => Promise.resolve({ status: "fail", detail: "no socket", hint: "start" }),
      ),
      check("agent.health", () => Promise.resolve({ status: "ok", detail: "?" }), {
        dependsOn: ["agent.socket"],
      }),
      check("agent.svid", () => Promise.resolve({ status: "ok", detail: "?" }), {
        dependsOn: ["agent.health"],
      }),
      check("other", () => Promise.resolve({ status: "warn", detail: "meh", hint: "x" })),
      check("after-warn", () => Promise.resolve({ status: "ok", detail: "ran" }), {
        dependsOn: ["other"],
      }),
    ],
    fakeContext(),
    { timeoutMs: 2000 },
  );
  assert.deepEqual(report.checks.map((c) => [c.id, c.status, c.detail]), [
    ["agent.socket", "fail", "no socket"],
    ["agent.health", "skip", "skipped: agent.socket failed"],
    ["agent.svid", "skip", "skipped: agent.health was skipped"],
    ["other", "warn", "meh"],
    ["after-warn", "ok", "ran"],
  ]);
  assert.deepEqual(report.summary, { ok: 1, warn: 1, fail: 1, skip: 2, crash: 0 });
});

Deno.test("runner: results keep the declared order, not the finish order", async () => {
  const finished: string[] = [];
  const report = await runChecks(
    [
      check("first", okAfter(40, finished, "first")),
      check("second", okAfter(1, finished, "second")),
    ],
    fakeContext(),
    { timeoutMs: 2000 },
  );
  assert.deepEqual(finished, ["second", "first"]);
  assert.deepEqual(report.checks.map((c) => c.id), ["first", "second"]);
  assert.equal(exitCode(report), 0);
});

Deno.test("runner: a dependency outside the selection is ignored; a dependency declared later is awaited", async () => {
  const report = await runChecks(
    [
      check("b", () => Promise.resolve({ status: "ok", detail: "b" }), {
        dependsOn: ["missing", "a"],
      }),
      check("a", () => Promise.resolve({ status: "crash", detail: "x" })),
    ],
    fakeContext(),
    { timeoutMs: 2000 },
  );
  assert.equal(report.checks[0].detail, "skipped: a crashed");
});

Deno.test("runner: each check gets its own abort signal when it times out", async () => {
  let aborted = false;
  const c = check("slow", (ctx?: unknown) => {
    const sig = (ctx as { signal: AbortSignal }).signal;
    return new Promise((resolve) =>
      sig.addEventListener("abort", () => {
        aborted = true;
        resolve({ status: "ok", detail: "late" });
      })
    );
  }, { timeoutMs: 20 });
  const report = await runChecks([c], fakeContext(), { timeoutMs: 2000 });
  assert.equal(report.checks[0].status, "fail");
  assert.equal(aborted, true);
});
