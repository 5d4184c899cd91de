import assert from "node:assert/strict";
import { join } from "node:path";
import {
  agentPath,
  allowEnvEntryError,
  CGROUP_EXIT,
  CGROUP_STEP_ERROR,
  checkTaskEnv,
  DEFAULT_ALLOW_ENV,
  DEFAULT_TASK_PATH,
  envAllowed,
  minimalEnv,
  PRLIMIT,
  resolveExecutable,
  sandboxArgv,
  SETPRIV,
  SH,
} from "./task_sandbox.ts";

Deno.test("allowEnv: only the names listed pass; hooks of the start chain can never be listed", () => {
  // The default: locale and time zone, nothing else.
  assert.deepEqual(DEFAULT_ALLOW_ENV, ["LANG", "LANGUAGE", "LC_*", "TZ"]);
  for (const name of ["LANG", "LC_ALL", "LC_TIME", "TZ"]) {
    assert.equal(envAllowed(DEFAULT_ALLOW_ENV, name), true, name);
  }
  for (
    const name of ["TAR_OPTIONS", "HOME", "XDG_CONFIG_HOME", "GOFLAGS", "PYTHONPATH", "FOO", "lang"]
  ) {
    assert.equal(envAllowed(DEFAULT_ALLOW_ENV, name), false, name);
  }
  assert.equal(
    checkTaskEnv({ LANG: "C", TAR_OPTIONS: "--x" }),
    'environment variable TAR_OPTIONS is not in tasks.allowEnv (LANG, LANGUAGE, LC_*, TZ; see docs/PROTOCOL.md, "Task sandbox")',
  );
  assert.equal(
    checkTaskEnv({ A: "1" }, []),
    'environment variable A is not in tasks.allowEnv (empty: a task may set no variable; see docs/PROTOCOL.md, "Task sandbox")',
  );
  assert.equal(checkTaskEnv({ LANG: "C", LC_ALL: "C" }), undefined);
  assert.equal(checkTaskEnv({ MYAPP_MODE: "x" }, ["MYAPP_*"]), undefined);
  // Entries: names and prefixes; nothing that would let a loader or shell hook through, since
  // the start chain (sh, prlimit, setpriv) runs as the agent with the task's environment.
  for (const ok of ["FOO", "LC_*", "MYAPP_*", "_X"]) {
    assert.equal(allowEnvEntryError(ok), undefined);
  }
  for (
    const [bad, why] of [
      ["PATH", /"PATH" can never be allowed \(PATH: the agent resolves/],
      ["LD_PRELOAD", /"LD_PRELOAD" can never be allowed \(LD_PRELOAD: LD_\* variables/],
      ["LD_*", /"LD_\*" would allow LD_\*/],
      ["L*", /"L\*" would allow LOCALDOMAIN/],
      ["*", /"\*" would allow PATH/],
      ["BASH_FUNC_x%%", /expected variable names or prefixes ending in \* \(LC_\*\)/],
      ["SHELLOPTS", /can never be allowed/],
      ["A-B", /expected variable names/],
    ] as const
  ) {
    assert.match(allowEnvEntryError(bad) ?? "(accepted)", why, bad);
  }
  // Even a list that names them (it cannot come from a config) lets no hook through.
  assert.equal(envAllowed(["LD_PRELOAD", "PATH"], "LD_PRELOAD"), false);
  assert.equal(envAllowed(["LD_PRELOAD", "PATH"], "PATH"), false);
});

Deno.test("minimal environment: PATH, HOME, USER, LOGNAME, LANG, TZ; nothing else leaks", () => {
  const agentEnv = {
    PATH: "/bin",
    HOME: "/root",
    USER: "root",
    TZ: "UTC",
    SECRET: "s",
    LANG: "de_DE.UTF-8",
  };
  assert.deepEqual(minimalEnv({ path: "/usr/bin:/bin", agentEnv }), {
    PATH: "/usr/bin:/bin",
    HOME: "/root",
    USER: "root",
    LOGNAME: "root",
    LANG: "de_DE.UTF-8",
    TZ: "UTC",
  });
  assert.deepEqual(
    minimalEnv({ path: "/bin", user: { name: "k8s4r-task", home: "/nonexistent" }, agentEnv: {} }),
    {
      PATH: "/bin",
      HOME: "/nonexistent",
      USER: "k8s4r-task",
      LOGNAME: "k8s4r-task",
      LANG: "C.UTF-8",
    },
  );
});

Deno.test("agent PATH: only absolute directories; a default when there are none", () => {
  assert.equal(agentPath({ PATH: "/a::./b:/c:" }), "/a:/c");
  assert.equal(agentPath({ PATH: ".:" }), DEFAULT_TASK_PATH);
  assert.equal(agentPath({}), DEFAULT_TASK_PATH);
});

Deno.test("resolveExecutable: names in PATH order, absolute paths normalized, relative refused", async () => {
  assert.deepEqual(resolveExecutable("sh", "/nonexistent:/bin"), { ok: true, path: "/bin/sh" });
  assert.deepEqual(resolveExecutable("/usr/bin/../bin/sh", "/x"), {
    ok: true,
    path: "/usr/bin/sh",
  });
  assert.equal(resolveExecutable("bin/sh", "/").ok, false);
  assert.equal(resolveExecutable("/etc", "/").ok, false);
  const f = await Deno.makeTempFile({ prefix: "k8s4r-noexec-" });
  try {
    await Deno.chmod(f, 0o644);
    assert.deepEqual(resolveExecutable(f, "/"), {
      ok: false,
      error: `executable not runnable (permission denied): ${f}`,
    });
  } finally {
    await Deno.remove(f);
  }
});

Deno.test("sandbox argv: prlimit then setpriv, the user, no caps, no_new_privs, death signal", () => {
  const limits = { cpuSeconds: 60, memoryBytes: 1 << 30, openFiles: 1024, processes: 256 };
  assert.deepEqual(
    sandboxArgv({
      exe: "/usr/bin/id",
      args: ["-u"],
      limits,
      user: { uid: 999, gid: 998 },
      dropBoundingSet: true,
    }),
    {
      cmd: PRLIMIT,
      args: [
        "--cpu=60:65",
        "--data=1073741824",
        "--nofile=1024",
        "--core=0",
        "--nproc=256",
        "--",
        SETPRIV,
        "--reuid=999",
        "--regid=998",
        "--clear-groups",
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--no-new-privs",
        "--pdeathsig=KILL",
        "--",
        "/usr/bin/id",
        "-u",
      ],
    },
  );
  // Without a task user: no uid switch and no RLIMIT_NPROC (it would count the agent's own).
  const plain = sandboxArgv({ exe: "/bin/true", args: [], limits });
  assert.ok(!plain.args.some((a) => a.startsWith("--reuid") || a.startsWith("--nproc")));
  assert.ok(plain.args.includes("--no-new-privs"));
  // ... but the bounding set is emptied all the same when the agent may (no capability).
  const root = sandboxArgv({ exe: "/bin/true", args: [], limits, dropBoundingSet: true });
  assert.ok(root.args.includes("--bounding-set=-all"));
  // With a cgroup: /bin/sh moves itself into it, then execs prlimit with the same argv.
  const procs = "/sys/fs/cgroup/k8s4r-task-1-t1/cgroup.procs";
  const contained = sandboxArgv({ exe: "/bin/true", args: [], limits, cgroupProcs: procs });
  assert.equal(contained.cmd, SH);
  assert.equal(contained.args[0], "-c");
  assert.deepEqual(contained.args.slice(2), [procs, PRLIMIT, ...plain.args]);
});

Deno.test("the cgroup step: moves itself into cgroup.procs, then execs; refuses to go on if it cannot", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-cgstep-" });
  try {
    const limits = { cpuSeconds: 60, memoryBytes: 1 << 30, openFiles: 1024 };
    const procs = join(dir, "cgroup.procs");
    await Deno.writeTextFile(procs, "");
    const step = (p: string) => {
      const a = sandboxArgv({ exe: "/bin/echo", args: ["ran"], limits, cgroupProcs: p });
      return new Deno.Command(a.cmd, { args: a.args, stdout: "piped", stderr: "piped" }).output();
    };
    // A plain file stands in for cgroup.procs: "0" is written to it, then the task runs.
    const ok = await step(procs);
    assert.equal(new TextDecoder().decode(ok.stdout), "ran\n");
    assert.equal(await Deno.readTextFile(procs), "0\n");
    // It cannot be written: exit 125 with the step's message, and the task never ran.
    const bad = await step(join(dir, "missing", "cgroup.procs"));
    assert.equal(bad.code, CGROUP_EXIT);
    assert.equal(new TextDecoder().decode(bad.stdout), "");
    assert.match(new TextDecoder().decode(bad.stderr), CGROUP_STEP_ERROR);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
