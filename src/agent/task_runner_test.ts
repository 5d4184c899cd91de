import assert from "node:assert/strict";
import { join } from "node:path";
import { waitFor } from "../process/mod.ts";
import {
  type TaskReport,
  TaskRunner,
  type TaskRunnerOptions,
  type TaskSpec,
} from "./task_runner.ts";
import { isAllowed } from "./task_sandbox.ts";
import { processesWith } from "./testing/processes.ts";

const PATH = "/usr/local/bin:/usr/bin:/bin";

async function withRunner(
  allow: string[],
  fn: (r: TaskRunner, dir: string) => Promise<void>,
  extra: Partial<TaskRunnerOptions> = {},
) {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-tasks-" });
  const r = new TaskRunner({
    allow,
    stateDir: join(dir, "state"),
    defaultCwd: dir,
    killGraceMs: 200,
    path: PATH,
    baseEnv: { PATH, HOME: "/home/nobody-test" },
    ...extra,
  });
  try {
    await fn(r, dir);
  } finally {
    await r.ids.close();
    await Deno.remove(dir, { recursive: true });
  }
}

function task(id: string, command: string[], more: Partial<TaskSpec> = {}): TaskSpec {
  return { id, command, env: {}, timeoutSeconds: 30, ...more };
}

async function run(r: TaskRunner, t: TaskSpec): Promise<TaskReport[]> {
  const reports: TaskReport[] = [];
  await r.handle(t, (x) => reports.push(x));
  return reports;
}

Deno.test("allow-list: * allows all; a name allows the file it resolves to; paths exactly", () => {
  assert.equal(isAllowed(["*"], "/bin/rm", PATH), true);
  assert.equal(isAllowed(["echo"], "/usr/bin/echo", PATH), true);
  assert.equal(isAllowed(["echo"], "/tmp/evil/echo", PATH), false);
  assert.equal(isAllowed(["/bin/echo"], "/bin/echo", PATH), true);
  assert.equal(isAllowed(["/bin/echo"], "/usr/bin/echo", PATH), false);
  assert.equal(isAllowed([], "/usr/bin/echo", PATH), false);
});

Deno.test("no shell: $HOME is passed literally, env comes from the task", async () => {
  await withRunner(["*"], async (r) => {
    const reports = await run(r, task("t1", ["echo", "$HOME", "a;b", "`id`"]));
    assert.deepEqual(reports.map((x) => x.state), ["accepted", "running", "done"]);
    const done = reports[2];
    assert.equal(done.exitCode, 0);
    assert.equal(done.stdout, "$HOME a;b `id`\n");
    const env = await run(
      r,
      task("t2", ["sh", "-c", 'echo "$FOO:$HOME"'], { env: { FOO: "bar" } }),
    );
    assert.equal(env[2].stdout, "bar:/home/nobody-test\n");
  }, { allowEnv: ["FOO"] });
});

Deno.test("a refused executable is reported, not dropped; empty list refuses all", async () => {
  await withRunner(["echo"], async (r) => {
    const reports = await run(r, task("t1", ["/bin/echo", "x"]));
    assert.deepEqual(reports, [{
      taskId: "t1",
      state: "refused",
      error:
        `executable "/bin/echo" is not one tasks.allow permits (echo; a name there permits only the program the agent's PATH finds for it)`,
    }]);
    // Positive control: the name itself runs.
    assert.deepEqual((await run(r, task("t2", ["echo", "x"]))).map((x) => x.state), [
      "accepted",
      "running",
      "done",
    ]);
  });
  await withRunner([], async (r) => {
    const reports = await run(r, task("t1", ["echo"]));
    assert.equal(reports[0].state, "refused");
    assert.equal(reports[0].error, "no task may run: tasks.allow is empty in the agent config");
  });
});

Deno.test("a refusal by tasks.allow does not show task viewers where the agent's PATH found a program", async () => {
  const bin = await Deno.makeTempDir({ prefix: "k8s4r-private-bin-" });
  try {
    await Deno.writeTextFile(join(bin, "vendor-tool"), "#!/bin/sh\necho tool\n", { mode: 0o755 });
    const path = `${bin}:${PATH}`;
    const logs: { event: string; fields: Record<string, unknown> }[] = [];
    const extra = {
      path,
      baseEnv: { PATH: path },
      log: (event: string, fields: Record<string, unknown>) => logs.push({ event, fields }),
    };
    // Control: allowed by name, the program in the private directory runs.
    await withRunner(["vendor-tool"], async (r) => {
      const ok = await run(r, task("t1", ["vendor-tool"]));
      assert.equal(ok.at(-1)?.state, "done", JSON.stringify(ok));
      assert.equal(ok.at(-1)?.stdout, "tool\n");
    }, extra);
    await withRunner(["echo", "vendor-tool"], async (r) => {
      // Not allowed: /bin/echo is not the echo of the PATH; sh is not in the list at all.
      for (const [id, exe] of [["t2", "/bin/echo"], ["t3", "sh"]]) {
        const refused = await run(r, task(id, [exe]));
        assert.equal(refused[0].state, "refused", JSON.stringify(refused));
        const error = refused[0].error ?? "";
        assert.match(error, new RegExp(`"${exe}" .*tasks\\.allow`), error);
        assert.ok(!error.includes(bin), `the refusal shows the private directory: ${error}`);
        assert.ok(
          !error.includes("/usr/bin"),
          `the refusal shows where PATH found a program: ${error}`,
        );
      }
    }, extra);
    // The robot's own log keeps the detail.
    const local = logs.filter((l) => l.event === "task.refused_not_allowed");
    assert.equal(local.length, 2, JSON.stringify(logs));
    assert.match(JSON.stringify(local[1].fields), new RegExp(`${bin}/vendor-tool`));
  } finally {
    await Deno.remove(bin, { recursive: true });
  }
});

Deno.test("a missing executable is refused, a missing cwd fails, with a clear error", async () => {
  await withRunner(["*"], async (r, dir) => {
    const a = await run(r, task("t1", ["no-such-program-k8s4r"]));
    assert.deepEqual(a.map((x) => x.state), ["refused"]);
    assert.equal(
      a[0].error,
      "executable not found in the agent's PATH: no-such-program-k8s4r",
    );
    const b = await run(r, task("t2", ["/nonexistent/bin/x"]));
    assert.equal(b[0].error, "executable not found: /nonexistent/bin/x");
    const rel = await run(r, task("t2b", ["./x"]));
    assert.equal(rel[0].error, 'executable "./x": expected a program name or an absolute path');
    const c = await run(r, task("t3", ["echo"], { cwd: join(dir, "missing") }));
    assert.deepEqual(c.map((x) => x.state), ["accepted", "failed"]);
    assert.equal(c[1].error, `working directory ${join(dir, "missing")}: does not exist`);
  });
});

Deno.test("non-zero exit is done with its exit code and stderr", async () => {
  await withRunner(["*"], async (r) => {
    const rep = await run(r, task("t1", ["sh", "-c", "echo oops >&2; exit 3"]));
    assert.equal(rep[2].state, "done");
    assert.equal(rep[2].exitCode, 3);
    assert.equal(rep[2].stderr, "oops\n");
  });
});

Deno.test("a task id runs at most once, also across runner restarts", async () => {
  await withRunner(["*"], async (r, dir) => {
    const first = await run(r, task("same", ["echo", "1"]));
    assert.equal(first.length, 3);
    const again: TaskReport[] = [];
    assert.equal(await r.handle(task("same", ["echo", "1"]), (x) => again.push(x)), "replay");
    assert.deepEqual(again, [], "the runner reports nothing for an id seen before");
    const r2 = new TaskRunner({
      allow: ["*"],
      stateDir: join(dir, "state"),
      defaultCwd: dir,
      killGraceMs: 100,
      path: PATH,
    });
    assert.equal(await r2.handle(task("same", ["echo", "1"]), () => {}), "replay");
    await r2.ids.close();
    const mode = (await Deno.stat(join(dir, "state", "task-ids.log"))).mode! & 0o777;
    assert.equal(mode, 0o600);
  });
});

Deno.test("a copy arriving while the task runs is a duplicate; afterwards a replay", async () => {
  await withRunner(["*"], async (r) => {
    const reports: TaskReport[] = [];
    const first = r.handle(task("d1", ["sleep", "0.3"]), (x) => reports.push(x));
    assert.equal(await r.handle(task("d1", ["sleep", "0.3"]), (x) => reports.push(x)), "duplicate");
    assert.equal(await first, "run");
    assert.deepEqual(reports.map((x) => x.state), ["accepted", "running", "done"]);
    assert.equal(await r.handle(task("d1", ["sleep", "0.3"]), () => {}), "replay");
  });
});

Deno.test("output is bounded to the last bytes", async () => {
  await withRunner(["*"], async (r) => {
    const rep = await run(
      r,
      task("big", ["sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done"]),
    );
    const out = rep[2].stdout!;
    assert.ok(out.length <= 1024, `kept ${out.length}`);
    assert.ok(out.endsWith("line1999\n"));
    assert.ok(!out.includes("line0\n"));
  }, { maxOutputBytes: 1024 });
});

Deno.test("timeout: SIGTERM first; SIGKILL after the grace when SIGTERM is ignored", async () => {
  await withRunner(["*"], async (r) => {
    const polite = await run(r, task("t1", ["sleep", "30"], { timeoutSeconds: 1 }));
    const last = polite[polite.length - 1];
    assert.equal(last.state, "failed");
    assert.equal(last.exitCode, null);
    assert.equal(last.error, "timed out after 1s; stopped with SIGTERM");
    const stubborn = await run(
      r,
      task("t2", ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"], {
        timeoutSeconds: 1,
      }),
    );
    const l2 = stubborn[stubborn.length - 1];
    assert.equal(l2.state, "failed");
    assert.equal(
      l2.error,
      "timed out after 1s; stopped with SIGKILL (SIGTERM was ignored for 300 ms)",
    );
    assert.equal(l2.stdout, "ready\n");
  }, { killGraceMs: 300 });
});

Deno.test("stopAll cancels running tasks and reports them", async () => {
  await withRunner(["*"], async (r) => {
    const reports: TaskReport[] = [];
    const p = r.handle(task("long", ["sleep", "30"]), (x) => reports.push(x));
    await waitFor(() => reports.some((x) => x.state === "running"), { timeoutMs: 10_000 });
    await r.stopAll();
    await p;
    assert.equal(reports[reports.length - 1].error, "agent stopping; stopped with SIGTERM");
    assert.equal(r.runningCount, 0);
  });
});

Deno.test("a task id that cannot be recorded is refused and never run", async () => {
  await withRunner(["*"], async (r, dir) => {
    // Positive control: the same runner records and runs a task.
    const ok = await run(r, task("ok", ["touch", join(dir, "ran-ok")]));
    assert.deepEqual(ok.map((x) => x.state), ["accepted", "running", "done"]);
    await Deno.stat(join(dir, "ran-ok"));
    // A runner whose id file cannot be read (a directory took its place).
    const state = join(dir, "state2");
    await Deno.mkdir(join(state, "task-ids.log"), { recursive: true });
    const broken = new TaskRunner({
      allow: ["*"],
      stateDir: state,
      defaultCwd: dir,
      killGraceMs: 100,
      path: PATH,
    });
    const rep = await run(broken, task("t2", ["touch", join(dir, "ran-t2")]));
    assert.equal(rep.length, 1);
    assert.equal(rep[0].state, "refused");
    assert.match(rep[0].error!, /^cannot record task id: /);
    await assert.rejects(Deno.stat(join(dir, "ran-t2")), Deno.errors.NotFound);
  });
});

// ---------------------------------------------------------------------------------------------
// Results bounded by their encoded size (issue 10, item 3)

import {
  decodeUp,
  encode,
  MAX_PAYLOAD_BYTES,
  now,
  PROTOCOL_VERSION,
  type TaskStatusMessage,
} from "../mqtt/messages.ts";

/** The longest robot id: the worst case for the envelope. */
const LONG_ROBOT = "r".repeat(63);

function asMessage(r: TaskReport): Uint8Array {
  const msg = {
    v: PROTOCOL_VERSION,
    type: "task-status",
    robotId: LONG_ROBOT,
    ts: now(),
    ...r,
  } as TaskStatusMessage;
  return encode(msg);
}

function assertFits(r: TaskReport): TaskStatusMessage {
  const bytes = asMessage(r);
  assert.ok(bytes.byteLength <= MAX_PAYLOAD_BYTES, `${bytes.byteLength} bytes`);
  const d = decodeUp(`k8s4r/robots/${LONG_ROBOT}/up/task`, bytes);
  assert.ok(d.ok, d.ok ? "" : `${d.reason}: ${d.error}`);
  return d.message as TaskStatusMessage;
}

const utf8Bytes = (s: string) => new TextEncoder().encode(s).byteLength;

Deno.test("70000 NUL bytes: the result fits 256 KiB encoded, tail kept, cut marked", async () => {
  await withRunner(["*"], async (r) => {
    const rep = await run(r, task("nul", ["head", "-c", "70000", "/dev/zero"]));
    const done = rep[rep.length - 1];
    assert.equal(done.state, "done");
    const m = assertFits(done);
    assert.ok(m.stdout!.length > 1000, `kept ${m.stdout!.length}`);
    assert.match(m.stdout!, /^\0+$/);
    assert.equal(m.stdoutTruncatedBytes! + utf8Bytes(m.stdout!), 70000);
    assert.equal(m.stderrTruncatedBytes, undefined);
  });
});

Deno.test("both streams at their limit: each bounded, the sum fits", async () => {
  await withRunner(["*"], async (r) => {
    const rep = await run(
      r,
      task("both", ["sh", "-c", "head -c 70000 /dev/zero; head -c 70000 /dev/zero >&2"]),
    );
    const m = assertFits(rep[rep.length - 1]);
    assert.equal(m.stdoutTruncatedBytes! + utf8Bytes(m.stdout!), 70000);
    assert.equal(m.stderrTruncatedBytes! + utf8Bytes(m.stderr!), 70000);
    // Split fairly: neither stream is starved.
    assert.ok(m.stdout!.length > 10_000 && m.stderr!.length > 10_000);
  });
});

Deno.test("multi-byte UTF-8 and control characters: a whole-character tail that fits", async () => {
  await withRunner(["*"], async (r) => {
    // stdout: 70000 control bytes (6 bytes each in JSON); stderr: 2-, 3-, 4-byte characters
    // with a control byte between them, 110000 bytes in all.
    const unit = "\u0001é€😀"; // 1 + 2 + 3 + 4 bytes
    const script = `head -c 70000 /dev/zero | tr '\\000' '\\001'; ` +
      `i=0; while [ $i -lt 11000 ]; do printf '${unit}' >&2; i=$((i+1)); done`;
    const rep = await run(r, task("mb", ["sh", "-c", script]));
    const done = rep[rep.length - 1];
    assert.equal(done.state, "done", done.error ?? "");
    const m = assertFits(done);
    const full = unit.repeat(11000);
    assert.ok(m.stderr!.length > 1000);
    assert.ok(full.endsWith(m.stderr!), "stderr is a tail of the output");
    assert.ok(!m.stderr!.includes("\ufffd"), "no character cut in half");
    assert.equal(m.stderrTruncatedBytes! + utf8Bytes(m.stderr!), utf8Bytes(full));
    assert.equal(m.stdoutTruncatedBytes! + utf8Bytes(m.stdout!), 70000);
  });
});

// ---------------------------------------------------------------------------------------------
// The sandbox (issue 11, item 3)

Deno.test("env: PATH, LD_PRELOAD and other hooks are refused and never run; others pass", async () => {
  await withRunner(["*"], async (r, dir) => {
    for (
      const [i, name] of [
        "PATH",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "PYTHONPATH",
        "BASH_ENV",
        "NODE_OPTIONS",
        "GLIBC_TUNABLES",
        "IFS",
        "HOME",
        "XDG_CONFIG_HOME",
        "GOFLAGS",
        "MAKEFLAGS",
        "npm_config_script_shell",
        "GST_PLUGIN_PATH",
        "QT_PLUGIN_PATH",
        "AMENT_PREFIX_PATH",
        "VK_LAYER_PATH",
        "LIBGL_DRIVERS_PATH",
      ].entries()
    ) {
      const marker = join(dir, `ran-${i}`);
      const rep = await run(r, task(`env-${i}`, ["touch", marker], { env: { [name]: "/tmp/x" } }));
      assert.deepEqual(rep.map((x) => x.state), ["refused"], name);
      assert.match(rep[0].error!, new RegExp(`^environment variable ${name}[: ]`), name);
      await assert.rejects(Deno.stat(marker), Deno.errors.NotFound, `${name}: it ran`);
    }
    // Positive control: an allowed variable reaches the task.
    const ok = await run(
      r,
      task("env-ok", ["sh", "-c", 'echo "$GREETING"'], { env: { GREETING: "hi" } }),
    );
    assert.equal(ok[2].stdout, "hi\n");
  }, { allowEnv: ["GREETING", "LANG", "LC_*", "TZ"] });
});

Deno.test("env: TAR_OPTIONS on an allowed fixed script is refused; the script runs without it", async () => {
  await withRunner([], async (_r, dir) => {
    const script = join(dir, "archive.sh");
    await Deno.writeTextFile(script, "#!/bin/sh\nexec tar cf /dev/null /etc/hostname\n");
    await Deno.chmod(script, 0o755);
    const pwned = join(dir, "pwned");
    const attack = {
      TAR_OPTIONS: `--checkpoint=1 --checkpoint-action=exec=/usr/bin/touch\\ ${pwned}`,
    };
    const runner = (allowEnv?: string[]) =>
      new TaskRunner({
        allow: [script],
        stateDir: join(dir, `state-${allowEnv?.length ?? "default"}`),
        defaultCwd: dir,
        killGraceMs: 200,
        path: PATH,
        baseEnv: { PATH },
        ...(allowEnv ? { allowEnv } : {}),
      });
    const r = runner();
    try {
      // The default allow-list (locale and time zone) does not name it: refused, never run.
      const rep = await run(r, task("tar-1", [script], { env: attack }));
      assert.deepEqual(rep.map((x) => x.state), ["refused"]);
      assert.match(rep[0].error!, /^environment variable TAR_OPTIONS is not in tasks\.allowEnv /);
      await assert.rejects(Deno.stat(pwned), Deno.errors.NotFound, "TAR_OPTIONS ran its command");
      // Positive control: the same script runs without it, and with a default-allowed LANG.
      const ok = await run(r, task("tar-2", [script], { env: { LANG: "C.UTF-8" } }));
      assert.equal(ok[ok.length - 1].state, "done", ok[ok.length - 1].stderr ?? "");
      assert.equal(ok[ok.length - 1].exitCode, 0);
    } finally {
      await r.ids.close();
    }
    // The attack is real: an operator who allows TAR_OPTIONS lets a task run any command.
    const lax = runner(["TAR_OPTIONS"]);
    try {
      const rep = await run(lax, task("tar-3", [script], { env: attack }));
      assert.equal(rep[rep.length - 1].state, "done", rep[rep.length - 1].stderr ?? "");
      await Deno.stat(pwned);
    } finally {
      await lax.ids.close();
    }
  });
});

Deno.test("the executable is resolved with the agent's PATH, never the task's", async () => {
  await withRunner(["echo"], async (r, dir) => {
    // The bypass of issue 11: allow ["echo"], a task naming its own echo.
    const evil = join(dir, "evil");
    await Deno.mkdir(evil);
    await Deno.writeTextFile(join(evil, "echo"), "#!/bin/sh\ntouch " + join(dir, "pwned") + "\n");
    await Deno.chmod(join(evil, "echo"), 0o755);
    const rep = await run(r, task("p1", [join(evil, "echo"), "x"]));
    assert.equal(rep[0].state, "refused");
    await assert.rejects(Deno.stat(join(dir, "pwned")), Deno.errors.NotFound);
    // The task's PATH cannot even be set; a runner whose own PATH starts with that directory
    // does run that echo (the agent's PATH decides).
    const r2 = new TaskRunner({
      allow: ["echo"],
      stateDir: join(dir, "s2"),
      defaultCwd: dir,
      killGraceMs: 100,
      path: `${evil}:${PATH}`,
      baseEnv: { PATH },
    });
    const rep2 = await run(r2, task("p2", ["echo", "x"]));
    assert.equal(rep2[rep2.length - 1].state, "done");
    await Deno.stat(join(dir, "pwned"));
    await r2.ids.close();
  });
});

Deno.test("maxConcurrent: tasks beyond it are refused busy; a slot frees when one ends", async () => {
  await withRunner(["*"], async (r) => {
    const reports: TaskReport[] = [];
    const first = r.handle(task("c1", ["sleep", "1"]), (x) => reports.push(x));
    await waitFor(() => reports.some((x) => x.state === "running"), { timeoutMs: 10_000 });
    const second = await run(r, task("c2", ["echo"]));
    assert.deepEqual(second, [{
      taskId: "c2",
      state: "refused",
      error: "busy: 1 tasks running (tasks.maxConcurrent 1)",
    }]);
    await first;
    assert.deepEqual((await run(r, task("c3", ["echo"]))).map((x) => x.state), [
      "accepted",
      "running",
      "done",
    ]);
  }, { maxConcurrent: 1 });
});

Deno.test("rlimits: open files, data memory and CPU time are set; memory and CPU are enforced", async () => {
  const limits = { cpuSeconds: 1, memoryBytes: 256 * 1024 * 1024, openFiles: 64 };
  await withRunner(["*"], async (r) => {
    const rep = await run(
      r,
      task("l1", [
        "sh",
        "-c",
        "ulimit -n; ulimit -d; ulimit -t; grep NoNewPrivs /proc/self/status",
      ]),
    );
    assert.equal(rep[2].stdout, `64\n${256 * 1024}\n1\nNoNewPrivs:\t1\n`);
    // Memory: doubling a string to 128 MiB fits in 256 MiB (control), to 512 MiB does not.
    const grow = (n: number) => `BEGIN{s="x"; while (length(s) < ${n}) s = s s; print length(s)}`;
    const fits = await run(r, task("m1", ["awk", grow(100_000_000)]));
    assert.equal(fits[2].stdout, "134217728\n", fits[2].stderr ?? "");
    const big = await run(r, task("m2", ["awk", grow(400_000_000)]));
    assert.notEqual(big[2].exitCode, 0);
    assert.match(big[2].stderr!, /out of memory/);
    // A busy loop is stopped by the kernel after 1 s of CPU time (SIGXCPU).
    const spin = await run(
      r,
      task("l2", ["sh", "-c", "while :; do :; done"], { timeoutSeconds: 60 }),
    );
    const last = spin[spin.length - 1];
    assert.equal(last.state, "failed");
    assert.equal(last.error, "killed by SIGXCPU");
  }, { limits });
});

Deno.test("cancel: a running task is stopped and reported cancelled", async () => {
  await withRunner(["*"], async (r) => {
    const reports: TaskReport[] = [];
    const p = r.handle(
      task("k1", ["sleep", "600"], { timeoutSeconds: 900 }),
      (x) => reports.push(x),
    );
    await waitFor(() => reports.some((x) => x.state === "running"), { timeoutMs: 10_000 });
    assert.equal(
      await r.cancel("k1", "cancelled by the fleet server", () => {}, new Date().toISOString()),
      "cancelling",
    );
    await p;
    const last = reports[reports.length - 1];
    assert.equal(last.state, "cancelled");
    assert.equal(last.exitCode, null);
    assert.equal(last.error, "cancelled by the fleet server; stopped with SIGTERM");
    // Finished: a second cancel finds nothing to do and reports nothing.
    const more: TaskReport[] = [];
    assert.equal(
      await r.cancel("k1", "again", (x) => more.push(x), new Date().toISOString()),
      "not-running",
    );
    assert.deepEqual(more, []);
  });
});

Deno.test("cancel before arrival: reported cancelled at once, the task never runs later", async () => {
  await withRunner(["*"], async (r, dir) => {
    const reports: TaskReport[] = [];
    const outcome = await r.cancel(
      "early",
      "cancelled by the fleet server",
      (x) => reports.push(x),
      new Date().toISOString(),
    );
    assert.equal(outcome, "cancelled-before-arrival");
    assert.deepEqual(reports.map((x) => x.state), ["cancelled"]);
    const late = await run(r, task("early", ["touch", join(dir, "ran-early")]));
    assert.deepEqual(late, []);
    await assert.rejects(Deno.stat(join(dir, "ran-early")), Deno.errors.NotFound);
  });
});

Deno.test("task user: a task runs with the user's uid and gid, no groups (root only)", async () => {
  assert.equal(Deno.uid(), 0, "this test switches users: run it as root (CI does)");
  const nobody = {
    name: "nobody",
    uid: 65534,
    gid: 65534,
    home: "/nonexistent",
    dropBoundingSet: true,
  };
  await withRunner(["*"], async (r) => {
    const rep = await run(
      r,
      task("u1", [
        "sh",
        "-c",
        "id -u; id -g; grep -E '^(Groups|CapEff|CapBnd):' /proc/self/status",
      ]),
    );
    const done = rep[rep.length - 1];
    assert.equal(done.state, "done", done.error ?? done.stderr ?? "");
    assert.equal(
      done.stdout,
      "65534\n65534\nGroups:\t \nCapEff:\t0000000000000000\nCapBnd:\t0000000000000000\n",
    );
  }, {
    user: nobody,
    limits: { cpuSeconds: 10, memoryBytes: 1 << 30, openFiles: 64, processes: 64 },
  });
});

// ---------------------------------------------------------------------------------------------
// Containment: nothing a task starts outlives it (security review, finding A)

/**
 * Runs `fn` with a fresh argv marker; afterwards kills whatever still carries it (only this
 * test's own processes carry it), so a failing test leaves nothing behind.
 */
async function withMarker(fn: (marker: string) => Promise<void>) {
  const marker = `k8s4r-marker-${crypto.randomUUID()}`;
  try {
    await fn(marker);
  } finally {
    for (const pid of processesWith(marker)) {
      try {
        Deno.kill(pid, "SIGKILL");
      } catch { /* gone */ }
    }
  }
}

/**
 * Shell text that expands to `marker` when it runs, without carrying it literally: the task's
 * own argv does not match, only the processes it starts with it do.
 */
function atRuntime(marker: string): string {
  return `"$(echo ${marker.replaceAll("-", "_")} | tr _ -)"`;
}

/** handle(), bounded: a task that never ends fails the test instead of hanging it. */
async function runBounded(r: TaskRunner, t: TaskSpec, boundMs = 20_000): Promise<TaskReport[]> {
  const reports: TaskReport[] = [];
  let ended = false;
  const p = r.handle(t, (x) => reports.push(x)).finally(() => ended = true);
  await waitFor(() => ended, {
    timeoutMs: boundMs,
    what: `handle() of ${t.id} to resolve`,
  });
  await p;
  return reports;
}

const ROOT_ONLY = "containment needs root here (cgroup v2); run the unit tests as root (CI does)";

Deno.test("containment: a setsid daemon a finished task left is killed with it (root)", async () => {
  assert.equal(Deno.uid(), 0, ROOT_ONLY);
  await withRunner(["*"], async (r, dir) => {
    await withMarker(async (marker) => {
      // The task ends only once its daemon runs in a session of its own (it touches a file).
      const up = join(dir, "daemon-up");
      const rep = await runBounded(
        r,
        task("daemon", [
          "sh",
          "-c",
          `setsid sh -c 'touch "$1"; sleep 4242; :' ${
            atRuntime(marker)
          } ${up} </dev/null >/dev/null 2>&1 & ` +
          `while [ ! -e ${up} ]; do sleep 0.01; done; echo started`,
        ]),
      );
      const last = rep[rep.length - 1];
      assert.equal(last.state, "done", last.error ?? "");
      assert.equal(last.stdout, "started\n");
      assert.deepEqual(processesWith(marker), [], "nothing the task started outlives it");
    });
  });
});

Deno.test("containment: a setsid descendant holding the output pipes ends with the timeout (root)", async () => {
  assert.equal(Deno.uid(), 0, ROOT_ONLY);
  await withRunner(["*"], async (r, dir) => {
    await withMarker(async (marker) => {
      const up = join(dir, "holder-up");
      const rep = await runBounded(
        r,
        task("holder", [
          "sh",
          "-c",
          `setsid sh -c 'touch "$1"; sleep 4343; echo late' ${atRuntime(marker)} ${up} & ` +
          `while [ ! -e ${up} ]; do sleep 0.01; done; echo started`,
        ], { timeoutSeconds: 1 }),
      );
      const last = rep[rep.length - 1];
      assert.equal(last.state, "failed");
      assert.match(last.error!, /^timed out after 1s; /);
      assert.equal(last.stdout, "started\n");
      assert.deepEqual(processesWith(marker), [], "nothing the task started outlives it");
      assert.equal(r.runningCount, 0, "the slot is free again");
    });
  });
});

Deno.test("containment: cancel and stopAll reach setsid descendants (root)", async () => {
  assert.equal(Deno.uid(), 0, ROOT_ONLY);
  await withRunner(["*"], async (r) => {
    for (const how of ["cancel", "stopAll"] as const) {
      await withMarker(async (marker) => {
        const reports: TaskReport[] = [];
        const p = r.handle(
          task(`tree-${how}`, [
            "sh",
            "-c",
            `setsid sh -c 'sleep 4444; :' ${
              atRuntime(marker)
            } </dev/null >/dev/null 2>&1 & exec sleep 600`,
          ], { timeoutSeconds: 900 }),
          (x) => reports.push(x),
        );
        await waitFor(() => processesWith(marker).length > 0, {
          timeoutMs: 10_000,
          what: "the descendant to start",
        });
        if (how === "cancel") {
          await r.cancel(`tree-${how}`, "cancelled", () => {}, new Date().toISOString());
        } else await r.stopAll();
        await p;
        const last = reports[reports.length - 1];
        assert.equal(last.state, how === "cancel" ? "cancelled" : "failed", how);
        assert.match(last.error!, /stopped with SIGTERM$/, how);
        assert.deepEqual(processesWith(marker), [], `${how}: nothing the task started outlives it`);
      });
    }
  });
});

Deno.test("no task user, agent as root: the task still has no capability (CapEff 0, empty bounding set)", async () => {
  assert.equal(Deno.uid(), 0, "this test needs a root agent: run it as root (CI does)");
  await withRunner(["*"], async (r) => {
    const rep = await run(
      r,
      task("caps", [
        "sh",
        "-c",
        "id -u; grep -E '^(CapPrm|CapEff|CapBnd|CapAmb):' /proc/self/status",
      ]),
    );
    const done = rep[rep.length - 1];
    assert.equal(done.state, "done", done.error ?? done.stderr ?? "");
    assert.equal(
      done.stdout,
      "0\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\n",
    );
  });
});

Deno.test("stopping: a task that comes after stopAll began is refused and never runs; the running one is stopped", async () => {
  await withRunner(["*"], async (r, dir) => {
    const reports: TaskReport[] = [];
    const running = r.handle(
      task("before", ["sleep", "600"], { timeoutSeconds: 900 }),
      (x) => reports.push(x),
    );
    await waitFor(() => reports.some((x) => x.state === "running"), { timeoutMs: 10_000 });
    const stopping = r.stopAll();
    const late = await run(r, task("late", ["touch", join(dir, "ran-late")]));
    assert.deepEqual(late, [{
      taskId: "late",
      state: "refused",
      error: "agent stopping: no new task starts",
    }]);
    await stopping;
    await running;
    await assert.rejects(Deno.stat(join(dir, "ran-late")), Deno.errors.NotFound);
    // Positive control: the task already running was stopped and reported.
    const last = reports[reports.length - 1];
    assert.equal(last.state, "failed");
    assert.equal(last.error, "agent stopping; stopped with SIGTERM");
    // The late id was claimed: it does not run after a restart either.
    assert.equal(
      await r.handle(task("late", ["touch", join(dir, "ran-late")]), () => {}),
      "replay",
    );
  });
});

Deno.test("uncontained (no cgroup): a pipe holder cannot hold the task past its timeout; what left the group survives, as documented", async () => {
  await withRunner(["*"], async (r, dir) => {
    await withMarker(async (marker) => {
      const up = join(dir, "up");
      const rep = await runBounded(
        r,
        task("nocg", [
          "sh",
          "-c",
          `setsid sh -c 'touch "$1"; sleep 4646; echo late' ${atRuntime(marker)} ${up} & ` +
          `while [ ! -e ${up} ]; do sleep 0.01; done; echo started`,
        ], { timeoutSeconds: 1 }),
      );
      const last = rep[rep.length - 1];
      assert.equal(last.state, "failed");
      assert.match(last.error!, /^timed out after 1s; the task had exited with 0, but processes/);
      assert.equal(r.runningCount, 0, "the slot is free again");
      // The limit said in README and the doctor: without a cgroup, a session of its own escapes
      // (its sh and the sleep it runs).
      assert.equal(processesWith(marker).length, 2, "the setsid'd process outlived its task");
    });
  }, { containment: { kind: "none", reason: "test", hint: "test" } });
});
