import assert from "node:assert/strict";
import { ConfigError } from "../cli/errors.ts";
import {
  allows,
  parseRolesYaml,
  readRolesFile,
  removeOperatorRole,
  RolesFile,
  setOperatorRole,
} from "./roles.ts";

Deno.test("roles: metrics only scrapes, viewer reads, operator also writes, nothing else exists", () => {
  assert.equal(allows("metrics", "metrics"), true);
  assert.equal(allows("metrics", "read"), false);
  assert.equal(allows("metrics", "write"), false);
  assert.equal(allows("viewer", "metrics"), true);
  assert.equal(allows("operator", "metrics"), true);
  assert.equal(allows("root" as never, "read"), false);
  assert.equal(allows("viewer", "read"), true);
  assert.equal(allows("viewer", "write"), false);
  assert.equal(allows("operator", "read"), true);
  assert.equal(allows("operator", "write"), true);
});

Deno.test("roles YAML: valid files, and errors that name file:line: key", () => {
  const ok = parseRolesYaml("# c\noperators:\n  admin: operator\n  alice: viewer\n", "r.yaml");
  assert.deepEqual([...ok.operators], [["admin", "operator"], ["alice", "viewer"]]);
  assert.equal(parseRolesYaml("", "r.yaml").operators.size, 0);
  assert.equal(parseRolesYaml("operators:\n", "r.yaml").operators.size, 0);
  // The long form, with the time before which the operator's certificates are refused.
  const long = parseRolesYaml(
    "operators:\n  alice:\n    role: viewer\n    issuedAfter: 2026-12-01T10:00:00.000Z\n",
    "r.yaml",
  );
  assert.equal(long.operators.get("alice"), "viewer");
  assert.equal(long.issuedAfter?.get("alice")?.toISOString(), "2026-12-01T10:00:00.000Z");
  assert.equal(ok.issuedAfter?.size, 0);
  const cases: [string, string][] = [
    [
      "operators:\n  alice:\n    role: viewer\n    issuedAfter: yesterday\n",
      'r.yaml:4: operators.alice.issuedAfter: expected an RFC 3339 time like 2026-12-01T10:00:00Z, got "yesterday"',
    ],
    [
      "operators:\n  alice:\n    issuedAfter: 2026-12-01T10:00:00Z\n",
      "r.yaml:3: operators.alice.role: missing",
    ],
    [
      "operators:\n  alice:\n    role: viewer\n    until: 2026-12-01T10:00:00Z\n",
      "r.yaml:4: operators.alice.until: unknown key; expected role, issuedAfter",
    ],
    [
      "operators:\n  admin: root\n",
      'r.yaml:2: operators.admin: expected a role, one of metrics, viewer, operator, got "root"',
    ],
    [
      "operators:\n  admin:\n",
      "r.yaml:2: operators.admin: expected a role, one of metrics, viewer, operator, got nothing",
    ],
    [
      "operators:\n  Admin: viewer\n",
      "r.yaml:2: operators.Admin: expected an operator name matching [a-z0-9][a-z0-9._-]{0,62}",
    ],
    ["operators:\n  ../x: viewer\n", "r.yaml:2: operators.../x: expected an operator name"],
    ["roles:\n  a: viewer\n", "r.yaml:1: roles: unknown key; expected operators"],
    ["operators:\n  - admin\n", "r.yaml:2: operators: expected a mapping of operator name to role"],
    ["- a\n", "r.yaml:1: expected a mapping with the key operators, got a list"],
    ["operators:\n  a: viewer\n  a: operator\n", "r.yaml:3: invalid YAML: Map keys must be unique"],
    ["operators: [\n", "r.yaml:"],
  ];
  for (const [text, want] of cases) {
    assert.throws(() => parseRolesYaml(text, "r.yaml"), (err: unknown) => {
      assert.ok(err instanceof ConfigError, String(err));
      assert.ok(err.message.startsWith(want), `${JSON.stringify(text)}: ${err.message}`);
      assert.equal(err.exitCode, 2);
      return true;
    });
  }
});

Deno.test("RolesFile: missing, then edited (no restart), invalid = nobody, fixed again", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-roles-" });
  try {
    const path = `${dir}/etc/roles.yaml`;
    const roles = new RolesFile(path);
    const changes: string[] = [];
    roles.onChange = (s) => changes.push(s.ok ? `ok ${s.config.operators.size}` : "error");
    let s = roles.current();
    assert.ok(s.ok && s.missing && s.config.operators.size === 0);

    await setOperatorRole(path, "admin", "operator");
    s = roles.current();
    assert.ok(s.ok && !s.missing);
    assert.equal(s.config.operators.get("admin"), "operator");
    const created = await Deno.readTextFile(path);
    assert.match(created, /^# Roles of the k8s4r fleet server/, "a new file explains itself");
    assert.equal((await Deno.stat(path)).mode! & 0o777, 0o644);

    // A comment and a role added by hand survive the next edit; the mode is kept.
    await Deno.writeTextFile(path, created + "  # bob reads\n  bob: viewer\n");
    await Deno.chmod(path, 0o640);
    await setOperatorRole(path, "alice", "viewer");
    const text = await Deno.readTextFile(path);
    assert.match(text, /# bob reads/);
    assert.equal((await Deno.stat(path)).mode! & 0o777, 0o640);
    s = roles.current();
    assert.ok(s.ok);
    assert.deepEqual([...s.config.operators.keys()].sort(), ["admin", "alice", "bob"]);

    // Changing a role, removing one.
    await setOperatorRole(path, "alice", "operator");
    assert.ok(await removeOperatorRole(path, "bob"));
    assert.equal(await removeOperatorRole(path, "bob"), false);
    s = roles.current();
    assert.ok(s.ok);
    assert.deepEqual([...s.config.operators], [["admin", "operator"], ["alice", "operator"]]);

    // A broken file: nobody, not the last good version.
    await Deno.writeTextFile(path, "operators:\n  admin: god\n");
    s = roles.current();
    assert.ok(!s.ok);
    assert.match(s.error, /roles\.yaml:2: operators\.admin: expected a role/);
    // Edits refuse to touch it, and say where it is broken.
    await assert.rejects(() => setOperatorRole(path, "carol", "viewer"), /roles\.yaml:2/);
    await Deno.writeTextFile(path, "operators:\n  admin: viewer\n");
    s = roles.current();
    assert.ok(s.ok && s.config.operators.get("admin") === "viewer");
    assert.equal((await readRolesFile(path)).operators.get("admin"), "viewer");
    assert.equal((await readRolesFile(`${dir}/none.yaml`)).operators.size, 0);
    assert.deepEqual(changes, ["ok 0", "ok 1", "ok 3", "ok 2", "error", "ok 1"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("roles file edits do not lose updates: remove bob and add carolN at once, 20 rounds", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-roles-race-" });
  try {
    const path = `${dir}/roles.yaml`;
    await setOperatorRole(path, "admin", "operator");
    const lost: string[] = [];
    for (let i = 0; i < 20; i++) {
      await setOperatorRole(path, "bob", "operator");
      // Two operators' commands at the same moment: `operator remove bob`, `operator add carolN`.
      await Promise.all([
        removeOperatorRole(path, "bob"),
        setOperatorRole(path, `carol${i}`, "viewer"),
      ]);
      const ops = (await readRolesFile(path)).operators;
      if (ops.has("bob")) lost.push(`round ${i}: bob's removal was undone`);
      for (let j = 0; j <= i; j++) {
        if (!ops.has(`carol${j}`)) lost.push(`round ${i}: carol${j} is missing`);
      }
    }
    assert.deepEqual(lost, [], "an edit of roles.yaml was lost");
    // The control: the edits themselves work (sequentially they always did).
    const ops = (await readRolesFile(path)).operators;
    assert.equal(ops.get("admin"), "operator");
    assert.equal(ops.get("carol19"), "viewer");
    assert.equal(ops.size, 21);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
