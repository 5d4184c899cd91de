/**
 * Backup and restore of a control host's state: SPIRE's datastore, SPIRE's keys, the root CA
 * (when there is one), the factory CA (when there is one), the fleet registry and the MQTT
 * credentials. What that is on disk is handed in (`BackupSources`, from the CLI composition),
 * so this module knows nothing of devenv's layout.
 *
 * A backup is a directory (0700) of files (0600) and `manifest.json`, which lists each item
 * with its SHA-256; restore checks every hash before it writes anything.
 *
 * Consistent while running:
 * - a SQLite database (SPIRE's `datastore.sqlite3`, the fleet registry) is copied with
 *   `VACUUM INTO` over its own read connection: one read transaction, so the copy is a
 *   snapshot of committed data even while SPIRE or the fleet server write (WAL or not), never
 *   a torn file;
 * - a PostgreSQL database is dumped with `pg_dump -Fc`, which reads one repeatable-read
 *   snapshot; its password comes from a 0600 pgpass file;
 * - other files (keys, CA, credentials) are read whole; their writers replace them atomically.
 *   The datastore is copied before SPIRE's keys: a CA key SPIRE makes in between is then in
 *   the copy of the keys without its certificate in the bundle, which SPIRE treats as a key to
 *   prepare a CA with again, never as a CA it cannot sign with.
 *
 * Restore writes every file back with mode 0600 (the directories 0700) onto a clean control
 * host (nothing of it may exist, and nothing may run, unless `force`), and only where this host
 * keeps that state: each item must match one of its sources by name, kind and path; the
 * manifest's paths are never trusted on their own. A PostgreSQL dump is put
 * where the component that creates the database on the next start restores it from
 * (`pg_restore`), since restoring needs a running PostgreSQL.
 */
import { createHash } from "node:crypto";
import { DatabaseSync } from "node:sqlite";
import { dirname, join, relative } from "node:path";
import { CliError } from "../cli/errors.ts";
import type { ProcessRunner } from "../process/mod.ts";
import { fileMode, writeFileAtomic } from "../fs/atomic.ts";
import { describeTarget, findPgBinaries, pgEnv, type PgTarget } from "../postgres/local_cluster.ts";
import { VERSION } from "../version.ts";

export const MANIFEST = "manifest.json";
export const FORMAT = "k8s4r-backup";
export const FORMAT_VERSION = 1;

/** One piece of state. `required` ones must exist; the others are backed up if present. */
export type BackupSource =
  | { kind: "sqlite"; name: string; path: string; required?: boolean }
  | { kind: "file"; name: string; path: string; required?: boolean }
  | {
    kind: "postgres";
    name: string;
    target: PgTarget;
    /** libpq's password file for `target` (0600). */
    pgpassFile: string;
    /** Where restore puts the dump for the next start to load. */
    restoreTo: string;
    required?: boolean;
  };

export interface BackupSources {
  /** Paths in the manifest are relative to this (the project directory). */
  root: string;
  /** How this control host runs (for the manifest and the restore's next step). */
  mode: string;
  /** The command that starts a control host of `mode` after a restore. */
  startCommand(mode: string): string;
  sources: BackupSource[];
  /**
   * The sources of a control host of `mode` (a restore checks a manifest against those of its
   * own mode: the clean host it goes onto has none yet). Throws a CliError for a mode it does
   * not know.
   */
  sourcesOf(mode: string): BackupSource[];
  /** Names of the components running now: restore refuses to write under them. */
  running(): string[];
}

export interface ManifestItem {
  name: string;
  kind: BackupSource["kind"];
  /** The file inside the backup directory. */
  file: string;
  /** Where it is restored to, relative to the project directory. */
  restoreTo: string;
  bytes: number;
  sha256: string;
  /** PostgreSQL: what was dumped (no password). */
  database?: string;
}

export interface Manifest {
  format: typeof FORMAT;
  version: number;
  createdAt: string;
  k8s4rVersion: string;
  mode: string;
  items: ManifestItem[];
  /** Optional sources that were not there (e.g. no root CA). */
  absent: string[];
}

function sha256(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

function exists(path: string): boolean {
  return fileMode(path) !== undefined;
}

/** A safe file name for an item inside the backup. */
function fileName(name: string, kind: BackupSource["kind"]): string {
  const base = name.replace(/[^A-Za-z0-9._-]+/g, "_");
  return kind === "sqlite" ? `${base}.sqlite3` : kind === "postgres" ? `${base}.dump` : base;
}

/** `VACUUM INTO`: a consistent copy of a live SQLite database, through a read-only handle. */
export function sqliteSnapshot(path: string, into: string): void {
  let db: DatabaseSync;
  try {
    db = new DatabaseSync(path, { readOnly: true });
  } catch (err) {
    throw new CliError(`${path}: cannot open the SQLite database (${(err as Error).message})`);
  }
  try {
    db.exec("PRAGMA busy_timeout = 10000");
    db.prepare("VACUUM INTO ?").run(into);
  } catch (err) {
    throw new CliError(`${path}: VACUUM INTO failed (${(err as Error).message})`);
  } finally {
    db.close();
  }
}

/** Opens a copy and asks SQLite to check it: a backup that would not open is caught now. */
function checkSqlite(path: string): void {
  const db = new DatabaseSync(path, { readOnly: true });
  try {
    const r = db.prepare("PRAGMA integrity_check").get() as Record<string, unknown> | undefined;
    const v = r ? Object.values(r)[0] : undefined;
    if (v !== "ok") throw new CliError(`${path}: integrity check says ${String(v)}`);
  } finally {
    db.close();
  }
}

async function pgDump(
  runner: ProcessRunner,
  env: Record<string, string | undefined>,
  s: Extract<BackupSource, { kind: "postgres" }>,
  out: string,
): Promise<void> {
  const bins = await findPgBinaries(runner, env);
  const t = s.target;
  await runner.output(bins.pgDump, [
    "-Fc",
    "--no-owner",
    "--no-privileges",
    "-h",
    t.host,
    "-p",
    String(t.port),
    "-U",
    t.user,
    "-d",
    t.database,
    "-f",
    out,
  ], { env: pgEnv(s.pgpassFile), timeoutMs: 300_000 });
  await Deno.chmod(out, 0o600);
}

/**
 * The backup's directory: made here (0700), or an existing one that is this user's, 0700, a
 * real directory (not a link) and empty. A directory someone else made in advance (or may
 * enter) would give them the secrets, or the chance to swap files while they are written.
 */
async function backupDir(out: string): Promise<void> {
  await Deno.mkdir(dirname(out), { recursive: true, mode: 0o700 });
  try {
    await Deno.mkdir(out, { mode: 0o700 }); // not recursive: an existing one is checked below
  } catch (err) {
    if (!(err instanceof Deno.errors.AlreadyExists)) throw err;
  }
  const st = await Deno.lstat(out);
  const fix = "give a new directory (backup create makes it 0700)";
  if (st.isSymlink) throw new CliError(`${out}: is a symbolic link, expected a directory`, 1, fix);
  if (!st.isDirectory) throw new CliError(`${out}: exists and is not a directory`, 1, fix);
  const uid = Deno.uid();
  if (uid !== null && st.uid !== uid) {
    throw new CliError(
      `${out}: belongs to uid ${st.uid}, not to this user (uid ${uid}): whoever owns it could read or swap the backup's secrets`,
      1,
      fix,
    );
  }
  const m = (st.mode ?? 0) & 0o7777;
  if (m !== 0o700) {
    throw new CliError(
      `${out}: mode ${
        m.toString(8).padStart(4, "0")
      }, expected 0700: the backup holds keys and passwords`,
      1,
      `chmod 700 ${out}, or ${fix}`,
    );
  }
  if ([...Deno.readDirSync(out)].length > 0) {
    throw new CliError(`${out}: exists and is not empty`, 1, "give a new directory");
  }
}

/** Makes a backup of `src` in the new directory `out`. Returns its manifest. */
export async function createBackup(
  src: BackupSources,
  out: string,
  io: { runner: ProcessRunner; env: Record<string, string | undefined> },
  now = new Date(),
): Promise<Manifest> {
  await backupDir(out);
  const manifest: Manifest = {
    format: FORMAT,
    version: FORMAT_VERSION,
    createdAt: now.toISOString(),
    k8s4rVersion: VERSION,
    mode: src.mode,
    items: [],
    absent: [],
  };
  for (const s of src.sources) {
    const file = fileName(s.name, s.kind);
    const dest = join(out, file);
    if (s.kind !== "postgres" && !exists(s.path)) {
      if (s.required) {
        throw new CliError(`${s.path}: ${s.name} is missing; nothing to back up there`);
      }
      manifest.absent.push(s.name);
      continue;
    }
    if (s.kind === "sqlite") {
      sqliteSnapshot(s.path, dest);
      await Deno.chmod(dest, 0o600);
      checkSqlite(dest);
    } else if (s.kind === "file") {
      await writeFileAtomic(dest, await Deno.readFile(s.path), 0o600);
    } else {
      await pgDump(io.runner, io.env, s, dest);
    }
    const bytes = await Deno.readFile(dest);
    manifest.items.push({
      name: s.name,
      kind: s.kind,
      file,
      restoreTo: restorePath(src, s),
      bytes: bytes.length,
      sha256: sha256(bytes),
      ...(s.kind === "postgres"
        ? {
          database: describeTarget(s.target),
        }
        : {}),
    });
  }
  await writeFileAtomic(join(out, MANIFEST), JSON.stringify(manifest, null, 2) + "\n", 0o600);
  return manifest;
}

/** Reads and checks a manifest: its format and version, and every item's file and hash. */
export async function readBackup(dir: string): Promise<Manifest> {
  const path = join(dir, MANIFEST);
  let m: Manifest;
  try {
    m = JSON.parse(await Deno.readTextFile(path));
  } catch (err) {
    throw new CliError(`${path}: not a k8s4r backup manifest (${(err as Error).message})`);
  }
  if (m?.format !== FORMAT) throw new CliError(`${path}: format: expected "${FORMAT}"`);
  if (m.version !== FORMAT_VERSION) {
    throw new CliError(
      `${path}: version: expected ${FORMAT_VERSION}, got ${m.version} (made by k8s4r ${m.k8s4rVersion})`,
    );
  }
  if (!Array.isArray(m.items)) throw new CliError(`${path}: items: expected a list`);
  for (const [i, it] of m.items.entries()) {
    const where = `${path}: items[${i}] (${it?.name})`;
    if (typeof it?.file !== "string" || it.file.includes("/") || it.file.startsWith(".")) {
      throw new CliError(`${where}: file: expected a file name in the backup`);
    }
    if (
      typeof it.restoreTo !== "string" || it.restoreTo.startsWith("/") ||
      it.restoreTo.split("/").includes("..")
    ) {
      throw new CliError(`${where}: restoreTo: expected a path inside the project directory`);
    }
    let bytes: Uint8Array;
    try {
      bytes = await Deno.readFile(join(dir, it.file));
    } catch {
      throw new CliError(`${where}: ${it.file} is missing from the backup`);
    }
    if (sha256(bytes) !== it.sha256) {
      throw new CliError(`${where}: ${it.file} does not match its SHA-256: the backup is damaged`);
    }
  }
  return m;
}

/** Where a source is restored to, relative to the project directory (as in the manifest). */
function restorePath(src: BackupSources, s: BackupSource): string {
  return relative(src.root, s.kind === "postgres" ? s.restoreTo : s.path);
}

/**
 * Every item must be one of this control host's sources: same name, same kind, same place. The
 * manifest is not trusted with paths: restore writes only where this host keeps that state.
 */
function checkItemsAgainstSources(m: Manifest, src: BackupSources, path: string): void {
  const seen = new Set<string>();
  const sources = src.sourcesOf(m.mode);
  for (const [i, it] of m.items.entries()) {
    const where = `${path}: items[${i}] (${it.name})`;
    const s = sources.find((x) => x.name === it.name);
    if (!s) {
      throw new CliError(
        `${where}: name: not a source of this control host (expected one of ${
          sources.map((x) => x.name).join(", ")
        })`,
        1,
        "restore a backup made by k8s4r backup create of this kind of control host",
      );
    }
    if (seen.has(it.name)) throw new CliError(`${where}: listed twice`);
    seen.add(it.name);
    if (it.kind !== s.kind) {
      throw new CliError(`${where}: kind: expected ${s.kind}, got ${it.kind}`);
    }
    const want = restorePath(src, s);
    if (it.restoreTo !== want) {
      throw new CliError(
        `${where}: restoreTo: expected ${want} (where this control host keeps ${s.name}), got ${it.restoreTo}`,
        1,
        "a backup restores onto the same layout it was made from (same project layout and mode)",
      );
    }
  }
}

export interface RestoreReport {
  restored: { name: string; to: string }[];
  /** What to run next. */
  startHint: string;
}

/**
 * Restores the backup in `dir` under `root`. Refuses while components run, and when any
 * target exists already (a control host that is not clean) unless `force`.
 */
export async function restoreBackup(
  dir: string,
  src: BackupSources,
  opts: { force?: boolean } = {},
): Promise<RestoreReport> {
  const m = await readBackup(dir);
  checkItemsAgainstSources(m, src, join(dir, MANIFEST));
  const running = src.running();
  if (running.length) {
    throw new CliError(
      `cannot restore while ${running.join(", ")} run${running.length === 1 ? "s" : ""}`,
      1,
      "stop the stack first (k8s4r devenv stop)",
    );
  }
  const targets = m.items.map((it) => ({ it, to: join(src.root, it.restoreTo) }));
  const present = targets.filter((t) => exists(t.to)).map((t) => t.to);
  if (present.length && !opts.force) {
    throw new CliError(
      `not a clean control host: ${present.join(", ")} exist${present.length === 1 ? "s" : ""}`,
      1,
      "restore onto a clean host, or pass --force to overwrite them",
    );
  }
  const restored: RestoreReport["restored"] = [];
  for (const { it, to } of targets) {
    // SQLite: a database left next to its -wal/-shm of another life would be misread.
    if (it.kind === "sqlite") {
      for (const ext of ["-wal", "-shm", "-journal"]) await Deno.remove(to + ext).catch(() => {});
    }
    await Deno.mkdir(dirname(to), { recursive: true, mode: 0o700 });
    await writeFileAtomic(to, await Deno.readFile(join(dir, it.file)), 0o600);
    restored.push({ name: it.name, to });
  }
  return { restored, startHint: src.startCommand(m.mode) };
}
