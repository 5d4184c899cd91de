import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { CliError } from "../cli/errors.ts";
import { realRunner } from "../process/mod.ts";
import { type BackupSources, createBackup, readBackup, restoreBackup } from "./mod.ts";

async function withDirs(fn: (project: string, out: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-backup-" });
  try {
    await Deno.mkdir(`${dir}/p/data`, { recursive: true });
    await fn(`${dir}/p`, `${dir}/backup`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function sources(root: string, running: string[] = []): BackupSources {
  const list: BackupSources["sources"] = [
    { kind: "sqlite", name: "datastore", path: `${root}/data/ds.sqlite3`, required: true },
    { kind: "file", name: "keys", path: `${root}/data/keys.json`, required: true },
    { kind: "file", name: "root-ca.key", path: `${root}/ca/root.key` },
  ];
  return {
    root,
    mode: "plain",
    startCommand: () => "k8s4r devenv start",
    sources: list,
    sourcesOf: (mode) => {
      if (mode !== "plain") throw new CliError(`unknown mode ${mode}`);
      return list;
    },
    running: () => running,
  };
}

const io = { runner: realRunner, env: {} };
const mode = (p: string) => Deno.statSync(p).mode! & 0o777;

Deno.test("backup of a live SQLite database in WAL mode (uncheckpointed rows included), files 0600, restore checks every hash", async () => {
  await withDirs(async (p, out) => {
    // A writer that keeps its connection open with rows only in the WAL, as SPIRE does.
    const live = new DatabaseSync(`${p}/data/ds.sqlite3`);
    live.exec("PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0");
    live.exec("CREATE TABLE entries (id TEXT PRIMARY KEY); BEGIN");
    for (let i = 0; i < 100; i++) live.prepare("INSERT INTO entries VALUES (?)").run(`e${i}`);
    live.exec("COMMIT");
    // An open write transaction that never commits must not be in the copy.
    live.exec("BEGIN; INSERT INTO entries VALUES ('uncommitted')");
    await Deno.writeTextFile(`${p}/data/keys.json`, '{"keys":[]}', { mode: 0o600 });
    const m = await createBackup(sources(p), out, io);
    live.exec("ROLLBACK");
    live.close();
    assert.deepEqual(m.items.map((i) => i.name), ["datastore", "keys"]);
    assert.deepEqual(m.absent, ["root-ca.key"]);
    assert.equal(mode(out), 0o700);
    for (const e of Deno.readDirSync(out)) assert.equal(mode(`${out}/${e.name}`), 0o600, e.name);
    const copy = new DatabaseSync(`${out}/datastore.sqlite3`, { readOnly: true });
    const n = copy.prepare("SELECT count(*) AS n FROM entries").get() as { n: number };
    const un = copy.prepare("SELECT count(*) AS n FROM entries WHERE id = 'uncommitted'")
      .get() as { n: number };
    copy.close();
    assert.equal(n.n, 100, "the WAL's rows are not in the copy");
    assert.equal(un.n, 0, "an uncommitted row is in the copy");
    assert.equal(m.items[0].restoreTo, "data/ds.sqlite3");

    // Restore: refused onto a host that has the state, and while something runs.
    await assert.rejects(() => restoreBackup(out, sources(p)), /not a clean control host/);
    await assert.rejects(
      () => restoreBackup(out, sources(p, ["spire-server"])),
      (e: CliError) => /while spire-server runs/.test(e.message) && /stop/.test(e.hint ?? ""),
    );
    // A clean host: everything back, 0600.
    await Deno.remove(`${p}/data`, { recursive: true });
    const r = await restoreBackup(out, sources(p));
    assert.equal(r.restored.length, 2);
    assert.equal(mode(`${p}/data/ds.sqlite3`), 0o600);
    assert.equal(mode(`${p}/data`), 0o700);
    assert.equal(await Deno.readTextFile(`${p}/data/keys.json`), '{"keys":[]}');
    const back = new DatabaseSync(`${p}/data/ds.sqlite3`, { readOnly: true });
    assert.equal((back.prepare("SELECT count(*) AS n FROM entries").get() as { n: number }).n, 100);
    back.close();
    // --force overwrites.
    assert.equal((await restoreBackup(out, sources(p), { force: true })).restored.length, 2);
  });
});

Deno.test("a damaged or foreign backup is refused before anything is written", async () => {
  await withDirs(async (p, out) => {
    new DatabaseSync(`${p}/data/ds.sqlite3`).exec("CREATE TABLE t (x)");
    await Deno.writeTextFile(`${p}/data/keys.json`, "{}");
    await createBackup(sources(p), out, io);
    await assert.rejects(() => createBackup(sources(p), out, io), /exists and is not empty/);
    await Deno.remove(`${p}/data`, { recursive: true });
    // One flipped byte.
    const k = await Deno.readFile(`${out}/keys`);
    k[0] ^= 1;
    await Deno.writeFile(`${out}/keys`, k);
    await assert.rejects(() => restoreBackup(out, sources(p)), /keys does not match its SHA-256/);
    assert.throws(() => Deno.statSync(`${p}/data/ds.sqlite3`), Deno.errors.NotFound);
    // A manifest that points outside the project.
    const m = JSON.parse(await Deno.readTextFile(`${out}/manifest.json`));
    k[0] ^= 1;
    await Deno.writeFile(`${out}/keys`, k);
    m.items[1].restoreTo = "../../etc/passwd";
    await Deno.writeTextFile(`${out}/manifest.json`, JSON.stringify(m));
    await assert.rejects(() => readBackup(out), /restoreTo: expected a path inside the project/);
    m.version = 9;
    await Deno.writeTextFile(`${out}/manifest.json`, JSON.stringify(m));
    await assert.rejects(() => readBackup(out), /version: expected 1, got 9/);
    // A required source that is missing.
    await assert.rejects(
      () => createBackup(sources(p), `${out}-2`, io),
      /datastore is missing/,
    );
  });
});

Deno.test("restore writes only the configured sources: an item under another name, kind or restoreTo is refused before anything is written", async () => {
  await withDirs(async (p, out) => {
    new DatabaseSync(`${p}/data/ds.sqlite3`).exec("CREATE TABLE t (x)");
    await Deno.writeTextFile(`${p}/data/keys.json`, "{}");
    await createBackup(sources(p), out, io);
    await Deno.remove(`${p}/data`, { recursive: true });
    const original = await Deno.readTextFile(`${out}/manifest.json`);
    const tampered = async (edit: (m: { items: Record<string, unknown>[] }) => void) => {
      const m = JSON.parse(original);
      edit(m);
      await Deno.writeTextFile(`${out}/manifest.json`, JSON.stringify(m));
    };
    // Inside the project, but not where "keys" belongs (a hash-valid file, a path the old check
    // let through): e.g. the project's code or another component's secret.
    await tampered((m) => (m.items[1].restoreTo = "main.ts"));
    await assert.rejects(
      () => restoreBackup(out, sources(p)),
      /items\[1\] \(keys\): restoreTo: expected data\/keys\.json \(where this control host keeps keys\), got main\.ts/,
    );
    assert.throws(() => Deno.statSync(`${p}/main.ts`), Deno.errors.NotFound);
    assert.throws(() => Deno.statSync(`${p}/data/ds.sqlite3`), Deno.errors.NotFound);
    // An item this control host has no source for.
    await Deno.copyFile(`${out}/keys`, `${out}/evil`);
    await tampered((m) => m.items.push({ ...m.items[1], name: "evil", file: "evil" }));
    await assert.rejects(
      () => restoreBackup(out, sources(p)),
      /items\[2\] \(evil\): name: not a source of this control host \(expected one of datastore, keys, root-ca\.key\)/,
    );
    // The right name and path, another kind.
    await tampered((m) => (m.items[1].kind = "sqlite"));
    await assert.rejects(
      () => restoreBackup(out, sources(p)),
      /items\[1\] \(keys\): kind: expected file, got sqlite/,
    );
    // Twice the same source.
    await tampered((m) => m.items.push(m.items[1]));
    await assert.rejects(() => restoreBackup(out, sources(p)), /items\[2\] \(keys\): listed twice/);
    assert.throws(() => Deno.statSync(`${p}/data`), Deno.errors.NotFound, "something was written");
    // The control: the manifest as made restores.
    await Deno.writeTextFile(`${out}/manifest.json`, original);
    assert.equal((await restoreBackup(out, sources(p))).restored.length, 2);
  });
});

Deno.test("backup create: an existing out dir must be this user's, 0700, a real directory, and empty", async () => {
  if (Deno.uid() !== 0) {
    throw new Error("this test chowns a directory to another user: run it as root (CI does)");
  }
  await withDirs(async (p, out) => {
    new DatabaseSync(`${p}/data/ds.sqlite3`).exec("CREATE TABLE t (x)");
    await Deno.writeTextFile(`${p}/data/keys.json`, "{}");
    // Someone else's empty directory (made in advance where the backup is expected).
    await Deno.mkdir(out, { mode: 0o700 });
    await Deno.chown(out, 65534, 65534);
    await assert.rejects(
      () => createBackup(sources(p), out, io),
      new RegExp(`${out}: belongs to uid 65534, not to this user \\(uid 0\\)`),
    );
    assert.deepEqual([...Deno.readDirSync(out)], [], "something was written into it");
    await Deno.chown(out, 0, 0);
    // Ours, but others may enter it.
    await Deno.chmod(out, 0o755);
    await assert.rejects(
      () => createBackup(sources(p), out, io),
      new RegExp(`${out}: mode 0755, expected 0700`),
    );
    assert.deepEqual([...Deno.readDirSync(out)], []);
    // A symbolic link to a directory that would pass.
    await Deno.chmod(out, 0o700);
    await Deno.symlink(out, `${out}-link`);
    await assert.rejects(
      () => createBackup(sources(p), `${out}-link`, io),
      /-link: is a symbolic link, expected a directory/,
    );
    // The controls: our own empty 0700 directory, and one that does not exist yet.
    assert.equal((await createBackup(sources(p), out, io)).items.length, 2);
    assert.equal((await createBackup(sources(p), `${out}-new`, io)).items.length, 2);
    assert.equal(mode(`${out}-new`), 0o700);
  });
});
