import assert from "node:assert/strict";
import {
  agentPath,
  checkTaskEnv,
  DEFAULT_TASK_PATH,
  deniedEnvName,
  minimalEnv,
  PRLIMIT,
  resolveExecutable,
  sandboxArgv,
  SETPRIV,
} from "./task_sandbox.ts";

Deno.test("deny list: loader, shell and interpreter hooks; ordinary names pass", () => {
  for (
    const name of [
      "PATH",
      "LD_PRELOAD",
      "LD_LIBRARY_PATH",
      "LD_AUDIT",
      "GCONV_PATH",
      "GLIBC_TUNABLES",
      "MALLOC_CHECK_",
      "PYTHONPATH",
      "PYTHONSTARTUP",
      "PERL5LIB",
      "PERL5OPT",
      "RUBYOPT",
      "NODE_OPTIONS",
      "DENO_DIR",
      "JAVA_TOOL_OPTIONS",
      "_JAVA_OPTIONS",
      "BASH_ENV",
      "ENV",
      "IFS",
      "PS4",
      "SHELLOPTS",
      "LESSOPEN",
      "GIT_SSH_COMMAND",
      "OPENSSL_CONF",
      "TMPDIR",
    ]
  ) {
    assert.ok(deniedEnvName(name), name);
  }
  for (
    const name of ["HOME", "LANG", "TZ", "FOO", "path", "MY_LD_THING", "SPIFFE_ENDPOINT_SOCKET"]
  ) {
    assert.equal(deniedEnvName(name), undefined, name);
  }
  assert.equal(
    checkTaskEnv({ A: "1", LD_PRELOAD: "/x.so" }),
    'environment variable LD_PRELOAD: LD_* variables are loader or interpreter hooks (see docs/PROTOCOL.md, "Task sandbox")',
  );
  assert.equal(checkTaskEnv({ A: "1" }), undefined);
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
});
