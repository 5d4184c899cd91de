/**
 * The task ids this robot has seen, each kept for as long as a message carrying it could still
 * pass the time rules: until its window ends, measured from its own `createdAt` (a cancel's
 * `ts`) with the window in force NOW (`windowMs`: tasks.maxAgeSeconds + tasks.clockSkewSeconds,
 * applied at every load), so raising the window in the config keeps every id longer. There is no
 * count after which an id drops out early.
 *
 * What was dropped is remembered as one number, `forgotten`: the latest window start of an id
 * this store let go. A message created at or before it may carry a forgotten id, so it is
 * refused (`checkTime`'s `forgottenUpTo`: `replay`), and `claim` answers it as seen. That is
 * what keeps a replay out whatever the robot's clock did: the clock only decides WHEN ids are
 * dropped (a clock ahead drops them early, then their messages are refused as too old for the
 * store), never whether a dropped id's message passes; and `forgotten` is made of the server's
 * times, so a clock that was ahead and is corrected expires nothing and refuses no fresh task.
 *
 * `<stateDir>/task-ids.log`, one record per line, appended and fdatasync'd before a claim
 * resolves (claims that arrive together share one write; writes never overlap):
 *
 *   @v2                                       the format (first line)
 *   @forgotten <ms>                           see above (written when the file is compacted)
 *   <id> <createdAtMs> <seenAtMs>[ c]         c: claimed by a cancel before the task arrived
 *
 * Expired records are dropped when the file is compacted (rewritten atomically, at start and when
 * the dead records outnumber the live ones). A torn last line (a crash while appending) belongs
 * to a claim that never resolved, so no task of it ran: it is skipped. A failed append (a full
 * disk writes short, then fails) is cut off again, so the next record starts on a line of its
 * own; when the cut fails too, the next append ends the torn line first.
 *
 * Older state is read once and rewritten as v2: the first `task-ids.log` (no `@v2`; records
 * `<id> <forgetAfterMs> <seenAtMs>[ c]`, a clock high-water mark `@hw <ms>`): each record's window
 * start is taken to be its forgetAfter (later than its real createdAt: kept longer, never less),
 * and `forgotten` to be the high-water mark − the window (what that format had dropped, unless
 * the window is raised in the same upgrade). The former `task-ids.json` (the last 1000 ids, no
 * times): each of its ids is kept for a whole window from the import.
 */
import { join } from "node:path";
import { removeDurable, syncDir, writeFileDurable } from "./durable.ts";

export const TASK_IDS_FILE = "task-ids.log";
const LEGACY_FILE = "task-ids.json";
/** Default bound on ids within the window (~60 bytes each on disk). */
export const DEFAULT_MAX_TASK_IDS = 1_000_000;

export interface TaskIdRecord {
  /** Where its window starts: the task's `createdAt` (a cancel's `ts`), in ms. */
  createdAt: number;
  /** The robot's clock when it was claimed (for people; no rule uses it). */
  seenAt: number;
  /** Claimed by a cancel that arrived before its task. */
  cancelled: boolean;
}

export interface TaskIdStoreOptions {
  stateDir: string;
  /** The window in force (tasks.maxAgeSeconds + tasks.clockSkewSeconds, in ms). */
  windowMs: number;
  /** Claims beyond this many live ids are refused (with an error). */
  maxIds?: number;
  log?: (event: string, fields: Record<string, unknown>) => void;
  /** Wall clock in ms (tests). */
  clock?: () => number;
}

const ID_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
const V2 = "@v2";

function recordLine(id: string, r: TaskIdRecord): string {
  return `${id} ${r.createdAt} ${r.seenAt}${r.cancelled ? " c" : ""}\n`;
}

export class TaskIdStore {
  readonly file: string;
  private readonly legacy: string;
  private readonly ids = new Map<string, TaskIdRecord>();
  private dropped = 0;
  private loading?: Promise<void>;
  private writing: Promise<void> = Promise.resolve();
  private pending: string[] = [];
  private handle?: Deno.FsFile;
  /** Bytes of the open file that hold whole records (what a failed append is cut back to). */
  private fileSize = 0;
  /** "\n" when the file ends with a torn line: written before the next record. */
  private tail = "";
  /** Records in the file that are not live entries (expired, duplicate, corrupt). */
  private dead = 0;
  private readonly clock: () => number;
  private readonly max: number;
  corrupt = 0;

  constructor(private readonly o: TaskIdStoreOptions) {
    this.file = join(o.stateDir, TASK_IDS_FILE);
    this.legacy = join(o.stateDir, LEGACY_FILE);
    this.clock = o.clock ?? Date.now;
    this.max = o.maxIds ?? DEFAULT_MAX_TASK_IDS;
  }

  /**
   * The latest window start (ms) of an id this store has dropped (0: none): a message created at
   * or before it cannot be vouched for. Persisted across restarts.
   */
  get forgotten(): number {
    return this.dropped;
  }

  get size(): number {
    return this.ids.size;
  }

  /** Reads the file once; every call waits for the same read. A failed read is retried. */
  load(): Promise<void> {
    this.loading ??= this.read().catch((err) => {
      this.loading = undefined;
      throw err;
    });
    return this.loading;
  }

  private async readText(path: string): Promise<string | undefined> {
    try {
      return await Deno.readTextFile(path);
    } catch (err) {
      if (err instanceof Deno.errors.NotFound) return undefined;
      // Unreadable is not empty: refuse tasks rather than risk running one again.
      throw new Error(`cannot read ${path}: ${(err as Error).message}`);
    }
  }

  private async read(): Promise<void> {
    const text = await this.readText(this.file);
    const lines = (text ?? "").split("\n").filter((l) => l !== "");
    // No `@v2` first: the first format (its second field is when the id may be forgotten).
    const v1 = lines.length > 0 && lines[0] !== V2;
    let records = 0;
    let hw = 0;
    for (const line of lines) {
      if (line === V2) continue;
      const mark = /^@(hw|forgotten) (\d+)$/.exec(line);
      if (mark) {
        const ms = Number(mark[2]);
        if (mark[1] === "hw") hw = Math.max(hw, ms);
        else this.dropped = Math.max(this.dropped, ms);
        continue;
      }
      records++;
      const m = /^(\S+) (\d+) (\d+)( c)?$/.exec(line);
      if (!m || !ID_RE.test(m[1])) {
        this.corrupt++;
        continue;
      }
      const rec = { createdAt: Number(m[2]), seenAt: Number(m[3]), cancelled: m[4] === " c" };
      if (v1) hw = Math.max(hw, rec.seenAt);
      const old = this.ids.get(m[1]);
      if (!old || old.createdAt < rec.createdAt) this.ids.set(m[1], rec);
    }
    if (v1) {
      this.dropped = Math.max(0, hw - this.o.windowMs);
      this.o.log?.("task_ids.upgraded", { file: this.file, ids: this.ids.size });
    }
    if (this.corrupt > 0) {
      this.o.log?.("task_ids.corrupt", { file: this.file, lines: this.corrupt });
    }
    const imported = await this.importLegacy();
    this.dead = records - this.ids.size;
    this.prune();
    // At start the rewrite is cheap next to what it saves: compact once a third is dead.
    if (v1 || imported) {
      // Needed: the file is in the old format, or the imported ids are not in it yet.
      await this.compact();
    } else if (this.dead * 2 > this.ids.size || this.corrupt > 0) {
      // Housekeeping only: the file holds every live record as it is, and appends to it stay
      // valid. A rewrite that cannot be made (a full disk: it needs a whole new file, an
      // append only the rest of the file's last page) must not stop the claims.
      await this.compact().catch((err) =>
        this.o.log?.("task_ids.compact_failed", {
          file: this.file,
          error: (err as Error).message,
        })
      );
    }
    if (imported) await removeDurable(this.legacy);
  }

  private async importLegacy(): Promise<boolean> {
    const text = await this.readText(this.legacy);
    if (text === undefined) return false;
    const now = this.clock();
    let n = 0;
    try {
      const parsed = JSON.parse(text);
      if (!Array.isArray(parsed?.ids)) throw new Error("no ids array");
      for (const id of parsed.ids) {
        if (typeof id !== "string" || !ID_RE.test(id) || this.ids.has(id)) continue;
        this.ids.set(id, { createdAt: now, seenAt: now, cancelled: false });
        n++;
      }
    } catch (err) {
      this.o.log?.("task_ids.legacy_corrupt", {
        file: this.legacy,
        error: (err as Error).message,
      });
    }
    this.o.log?.("task_ids.imported", { file: this.legacy, ids: n });
    return true;
  }

  /** The record of an id still remembered, if any. */
  async lookup(id: string): Promise<TaskIdRecord | undefined> {
    await this.load();
    return this.ids.get(id);
  }

  /**
   * Claims `id`, whose window starts at `createdAt` (ms: the task's `createdAt`, a cancel's
   * `ts`). True the first time; false when it was seen before, or may have been (created no
   * later than `forgotten`). Resolves once the claim is on disk. Throws when it cannot be
   * recorded (unreadable or unwritable state, or `maxIds` live ids): the caller must then not
   * run the task.
   */
  async claim(
    id: string,
    createdAt: number,
    opts: { cancelled?: boolean } = {},
  ): Promise<boolean> {
    await this.load();
    if (this.ids.has(id)) return false;
    if (createdAt <= this.dropped) return false;
    if (this.ids.size >= this.max) this.prune();
    if (this.ids.size >= this.max) {
      throw new Error(
        `${this.ids.size} task ids are within the replay window (limit ${this.max}); refusing new tasks until some expire`,
      );
    }
    const rec = { createdAt, seenAt: this.clock(), cancelled: opts.cancelled ?? false };
    // Kept in memory even when the write below fails: this process never runs it either way.
    this.ids.set(id, rec);
    this.pending.push(recordLine(id, rec));
    await this.flush();
    return true;
  }

  /** Drops the ids whose window (the one in force now) has ended by the clock. */
  private prune(): void {
    const before = this.clock() - this.o.windowMs;
    for (const [id, r] of this.ids) {
      if (r.createdAt < before) {
        this.ids.delete(id);
        this.dropped = Math.max(this.dropped, r.createdAt);
        this.dead++;
      }
    }
  }

  /** Appends what is pending (one write, one fdatasync); compacts when dead records dominate. */
  private flush(): Promise<void> {
    const p = this.writing.then(async () => {
      if (this.pending.length === 0) return; // an earlier flush already wrote this claim
      const lines = this.pending.join("");
      this.pending = [];
      try {
        if (!this.handle) await this.open();
        // A new file starts with its format.
        const head = this.fileSize === 0 ? `${V2}\n@forgotten ${this.dropped}\n` : this.tail;
        const bytes = new TextEncoder().encode(head + lines);
        let off = 0;
        while (off < bytes.byteLength) off += await this.handle!.write(bytes.subarray(off));
        await this.handle!.syncData();
        this.tail = "";
        this.fileSize += bytes.byteLength;
      } catch (err) {
        // A full disk writes short, then fails: cut the torn line off again, or the next record
        // would be appended to it and lost with it at load. When even that fails, the next open
        // ends the torn line first (see open).
        const h = this.handle;
        this.handle = undefined;
        await h?.truncate(this.fileSize).catch(() => {});
        h?.close();
        throw err;
      }
      this.prune();
      if (this.dead > 1024 && this.dead > this.ids.size) {
        // The claim is on disk already: a rewrite that fails (full disk) does not undo it.
        await this.compact().catch((err) =>
          this.o.log?.("task_ids.compact_failed", {
            file: this.file,
            error: (err as Error).message,
          })
        );
      }
    });
    this.writing = p.catch(() => {});
    return p;
  }

  private async open(): Promise<void> {
    await Deno.mkdir(this.o.stateDir, { recursive: true, mode: 0o700 });
    let existed = true;
    try {
      await Deno.stat(this.file);
    } catch {
      existed = false;
    }
    const h = await Deno.open(this.file, { read: true, append: true, create: true, mode: 0o600 });
    try {
      // A file that does not end with a newline ends with a torn line (a crash or a failed cut
      // while appending): the next record starts on a line of its own.
      this.fileSize = (await h.stat()).size;
      this.tail = "";
      if (this.fileSize > 0) {
        const last = new Uint8Array(1);
        await h.seek(this.fileSize - 1, Deno.SeekMode.Start);
        if ((await h.read(last)) !== 1 || last[0] !== 0x0a) this.tail = "\n";
      }
      if (!existed) await syncDir(this.o.stateDir);
    } catch (err) {
      h.close();
      throw err;
    }
    this.handle = h;
  }

  /** Rewrites the file with the live records only (atomic, durable). */
  private async compact(): Promise<void> {
    this.handle?.close();
    this.handle = undefined;
    const lines = [`${V2}\n@forgotten ${this.dropped}\n`];
    for (const [id, r] of this.ids) lines.push(recordLine(id, r));
    await writeFileDurable(this.file, lines.join(""));
    this.dead = 0;
    this.o.log?.("task_ids.compacted", { live: this.ids.size });
  }

  /** Waits for the last write and closes the file. */
  async close(): Promise<void> {
    await this.writing;
    this.handle?.close();
    this.handle = undefined;
  }
}
