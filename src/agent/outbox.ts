/**
 * The agent's durable outbound queue: task results (task-status) and heartbeats go through it,
 * so that neither a broker outage nor an agent restart loses a result.
 *
 * On disk: `<stateDir>/outbox.log`, one JSON record per line, appended:
 *   {"seq":7,"kind":"result","topic":"k8s4r/robots/r1/up/task","msg":{...the message...}}
 *   {"del":7}                       (acknowledged by the broker, or a heartbeat dropped)
 * An entry is fsync'd before `add` resolves (appends made together share one fsync); a `del`
 * is not (losing one only re-sends a message the server deduplicates). The file is rewritten
 * with the live entries only (temp file, fsync, rename, fsync of the directory) at open and
 * whenever it holds mostly dead records.
 *
 * A crash or a full disk can leave a torn or corrupt line: at open, unreadable lines (bad JSON,
 * bad record, a message the server's validator would drop) are counted, logged and skipped;
 * everything readable is kept; when the file ends in a torn line (and cannot be rewritten, a full
 * disk), the next append starts with a newline. A failed append is cut off again (ftruncate), and
 * the entry stays in memory (`written` false, counted as `unwritten`) and is still sent; its write
 * is retried with the next append and on a timer (1 s, doubling to 30 s) until it is on disk.
 * Only then does a result count as durably queued (`safe`, `resultTaken`): until then the task
 * stays in the running journal, so a crash before the retry succeeds still reports it at the next
 * start.
 *
 * Bounds: `maxMessages` entries and `maxBytes` bytes of messages. When an entry does not fit,
 * the OLDEST HEARTBEATS are dropped first. Results are never dropped: when results alone fill
 * the queue, a new heartbeat is not queued, a new result is queued beyond the bounds (counted
 * as `overLimit`), and `resultsFull` is true so the agent refuses new tasks until it drains.
 */
import { join } from "node:path";
import { decodeUp, encode, type UpMessage } from "../mqtt/messages.ts";
import { isDurableTemp, writeFileDurable } from "./durable.ts";

export type OutboxKind = "heartbeat" | "result";

export interface OutboxEntry {
  seq: number;
  kind: OutboxKind;
  topic: string;
  payload: Uint8Array;
  /** Aborted when the entry is dropped to make room (a heartbeat): do not send it any more. */
  dropped: AbortSignal;
  /** On disk (written and fsync'd). False after a failed write, until a retry succeeds. */
  readonly written?: boolean;
  /**
   * Resolves true once the entry is on disk or left the queue acknowledged (it can no longer be
   * lost); false when it was dropped (a heartbeat) or the queue closed before either happened.
   */
  safe?: Promise<boolean>;
}

/** An entry left by a previous run, with its decoded message. */
export interface RecoveredEntry extends OutboxEntry {
  message: UpMessage;
}

export interface OutboxOptions {
  stateDir: string;
  /** Only this robot's messages are taken back from the file. */
  robotId: string;
  maxMessages: number;
  maxBytes: number;
  log?: (event: string, fields: Record<string, unknown>) => void;
}

export interface OutboxStats {
  entries: number;
  bytes: number;
  heartbeats: number;
  results: number;
  /** Heartbeats dropped, or not queued, for lack of room. */
  droppedHeartbeats: number;
  /** Results queued beyond the bounds. */
  overLimit: number;
  /** Unreadable records found at open. */
  corrupt: number;
  /** Appends that failed (the entry was then only in memory). */
  writeErrors: number;
  /** Entries only in memory now (their write failed; it is being retried). */
  unwritten: number;
  recovered: number;
}

interface Live extends OutboxEntry {
  ctl: AbortController;
  line: string;
  written: boolean;
  safe: Promise<boolean>;
  settle: (safe: boolean) => void;
}

export const OUTBOX_FILE = "outbox.log";
/** Rewrite the file once it has this many dead records and is twice its live size. */
const COMPACT_DEAD_RECORDS = 512;
/** A failed write is retried after this long, doubling up to RETRY_MAX_MS. */
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 30_000;

const utf8 = new TextEncoder();
const decoder = new TextDecoder();

function recordLine(seq: number, kind: OutboxKind, topic: string, payload: Uint8Array): string {
  return `{"seq":${seq},"kind":"${kind}","topic":${JSON.stringify(topic)},"msg":${
    decoder.decode(payload)
  }}\n`;
}

/**
 * What a queued result is to the task runner (its `Reporter` answer, see task_runner.ts): true
 * when it is on disk; `{ durable }` when its write failed and is being retried (the task stays in
 * the running journal until `durable` resolves true); false when it was not queued.
 */
export function resultTaken(
  e: OutboxEntry | undefined,
): boolean | { durable: Promise<boolean> } {
  if (e === undefined) return false;
  if (e.written !== false) return true;
  return { durable: e.safe ?? Promise.resolve(false) };
}

export class Outbox {
  readonly file: string;
  private readonly live = new Map<number, Live>();
  /** Heartbeat seqs, oldest first (a Set keeps insertion order). */
  private readonly heartbeatSeqs = new Set<number>();
  private bytes = 0;
  private resultBytes = 0;
  private nextSeq = 1;
  private fh?: Deno.FsFile;
  private fileSize = 0;
  /**
   * The file ends in the middle of a line (a crash or a failed cut-off left it so): the next
   * append starts with a newline, or its first record would be glued to the torn one and be
   * unreadable at the next start.
   */
  private tornTail = false;
  private deadRecords = 0;
  private pending: { line: string; entry?: Live }[] = [];
  private waiters: (() => void)[] = [];
  private writer?: Promise<void>;
  private closed = false;
  private overLimitLogged = false;
  private droppedLogged = false;
  private retryTimer?: ReturnType<typeof setTimeout>;
  private retryMs = RETRY_MIN_MS;
  private readonly counters = {
    droppedHeartbeats: 0,
    overLimit: 0,
    corrupt: 0,
    writeErrors: 0,
    recovered: 0,
  };
  /** What a previous run left, oldest first (send these again). */
  recovered: RecoveredEntry[] = [];

  private constructor(private readonly o: OutboxOptions) {
    this.file = join(o.stateDir, OUTBOX_FILE);
  }

  /** Reads what a previous run left (never throws on bad content), then opens for appends. */
  static async open(o: OutboxOptions): Promise<Outbox> {
    const box = new Outbox(o);
    await Deno.mkdir(o.stateDir, { recursive: true, mode: 0o700 });
    for await (const e of Deno.readDir(o.stateDir)) {
      if (e.name.startsWith(OUTBOX_FILE) && isDurableTemp(e.name)) {
        await Deno.remove(join(o.stateDir, e.name)).catch(() => {});
      }
    }
    await box.load();
    try {
      await box.rewrite();
      box.pending = []; // deletions made while loading are in the rewritten file already
    } catch (err) {
      box.writeFailed(err, "rewrite at open");
      // Go on appending to the file as it is (unreadable lines are skipped again next time).
      box.fh = await Deno.open(box.file, { append: true, create: true, mode: 0o600 }).catch(
        (e) => (box.writeFailed(e, "open"), undefined),
      );
      box.fileSize = (await Deno.stat(box.file).catch(() => undefined))?.size ?? 0;
      // The deletions made while loading (heartbeats over today's bounds) go into that file, or
      // the heartbeats dropped now would come back at the next start. A small append often
      // fits where a rewrite does not (a full disk keeps the rest of the file's last page).
      if (box.pending.length > 0) await box.flush();
    }
    return box;
  }

  private async load() {
    let bytes: Uint8Array;
    try {
      bytes = await Deno.readFile(this.file);
    } catch (err) {
      if (err instanceof Deno.errors.NotFound) return;
      throw err;
    }
    const found = new Map<number, RecoveredEntry>();
    const bad: string[] = [];
    this.tornTail = bytes.byteLength > 0 && bytes[bytes.byteLength - 1] !== 0x0a;
    const lines = decoder.decode(bytes).split("\n");
    lines.forEach((line, i) => {
      if (line.trim() === "") return;
      const why = this.parseLine(line, found);
      if (why) bad.push(`line ${i + 1}: ${why}`);
    });
    const entries = [...found.values()].sort((a, b) => a.seq - b.seq);
    for (const e of entries) {
      this.nextSeq = Math.max(this.nextSeq, e.seq + 1);
      this.insert(e, recordLine(e.seq, e.kind, e.topic, e.payload), new AbortController(), true);
    }
    this.counters.corrupt = bad.length;
    if (bad.length > 0) {
      this.o.log?.("outbox.corrupt_records", {
        file: this.file,
        count: bad.length,
        first: bad[0],
        kept: entries.length,
      });
    }
    // A previous run may have queued more than today's bounds allow.
    while (this.overBounds(0) && this.heartbeatSeqs.size > 0) this.dropOldestHeartbeat();
    this.recovered = [...this.live.values()].map((l) => ({
      seq: l.seq,
      kind: l.kind,
      topic: l.topic,
      payload: l.payload,
      dropped: l.dropped,
      written: true,
      safe: l.safe,
      message: found.get(l.seq)!.message,
    }));
    this.counters.recovered = this.recovered.length;
  }

  /** Applies one line; returns why it is unreadable, or undefined. */
  private parseLine(line: string, found: Map<number, RecoveredEntry>): string | undefined {
    let rec: Record<string, unknown>;
    try {
      rec = JSON.parse(line);
    } catch {
      return "not JSON (torn or damaged)";
    }
    if (typeof rec !== "object" || rec === null) return "not a record";
    if (typeof rec.del === "number") {
      found.delete(rec.del);
      this.nextSeq = Math.max(this.nextSeq, rec.del + 1);
      return undefined;
    }
    const { seq, kind, topic, msg } = rec;
    if (typeof seq !== "number" || !Number.isInteger(seq) || seq < 1) return "no seq";
    if (kind !== "heartbeat" && kind !== "result") return `unknown kind ${String(kind)}`;
    if (typeof topic !== "string") return "no topic";
    const payload = encode(msg as UpMessage);
    const d = decodeUp(topic, payload);
    if (!d.ok) return `${d.reason}: ${d.error}`;
    if (d.robotId !== this.o.robotId) return `a message of robot ${d.robotId}`;
    found.set(seq, {
      seq,
      kind,
      topic,
      payload,
      dropped: new AbortController().signal,
      message: d.message,
    });
    return undefined;
  }

  private insert(e: OutboxEntry, line: string, ctl: AbortController, written: boolean): Live {
    let settle!: (safe: boolean) => void;
    const safe = new Promise<boolean>((resolve) => (settle = resolve));
    const l: Live = { ...e, dropped: ctl.signal, ctl, line, written, safe, settle };
    if (written) settle(true);
    this.live.set(e.seq, l);
    this.bytes += e.payload.byteLength;
    if (e.kind === "heartbeat") this.heartbeatSeqs.add(e.seq);
    else this.resultBytes += e.payload.byteLength;
    return l;
  }

  private delete(seq: number): Live | undefined {
    const l = this.live.get(seq);
    if (!l) return undefined;
    this.live.delete(seq);
    this.bytes -= l.payload.byteLength;
    if (l.kind === "heartbeat") this.heartbeatSeqs.delete(seq);
    else this.resultBytes -= l.payload.byteLength;
    if (l.written) {
      this.pending.push({ line: `{"del":${seq}}\n` });
      this.deadRecords += 2;
    }
    return l;
  }

  private overBounds(size: number, count = 0): boolean {
    return this.live.size + count > this.o.maxMessages || this.bytes + size > this.o.maxBytes;
  }

  private dropOldestHeartbeat() {
    const seq = this.heartbeatSeqs.values().next().value!;
    const l = this.delete(seq)!;
    l.ctl.abort();
    l.settle(false);
    this.counters.droppedHeartbeats++;
    if (!this.droppedLogged) {
      this.droppedLogged = true;
      this.o.log?.("outbox.dropping_heartbeats", {
        entries: this.live.size,
        bytes: this.bytes,
        maxMessages: this.o.maxMessages,
        maxBytes: this.o.maxBytes,
      });
    }
  }

  get stats(): OutboxStats {
    return {
      entries: this.live.size,
      bytes: this.bytes,
      heartbeats: this.heartbeatSeqs.size,
      results: this.live.size - this.heartbeatSeqs.size,
      unwritten: this.unwritten().length,
      ...this.counters,
    };
  }

  /** Results alone fill the bounds: take no new task until some are acknowledged. */
  get resultsFull(): boolean {
    const results = this.live.size - this.heartbeatSeqs.size;
    return results >= this.o.maxMessages || this.resultBytes >= this.o.maxBytes;
  }

  /**
   * Queues a message; resolves once it is on disk, or once its write failed: then it is logged,
   * kept in memory (`written` false) and written again later (`safe` resolves when it is).
   * Resolves undefined when it was not queued: a heartbeat with no room left, or the outbox is
   * closed.
   */
  async add(
    kind: OutboxKind,
    topic: string,
    payload: Uint8Array,
  ): Promise<OutboxEntry | undefined> {
    if (this.closed) return undefined;
    const size = payload.byteLength;
    while (this.overBounds(size, 1) && this.heartbeatSeqs.size > 0) this.dropOldestHeartbeat();
    if (this.overBounds(size, 1)) {
      if (kind === "heartbeat") {
        this.counters.droppedHeartbeats++;
        return undefined;
      }
      this.counters.overLimit++;
      if (!this.overLimitLogged) {
        this.overLimitLogged = true;
        this.o.log?.("outbox.over_limit", {
          entries: this.live.size,
          bytes: this.bytes,
          maxMessages: this.o.maxMessages,
          maxBytes: this.o.maxBytes,
          note: "results are never dropped; new tasks are refused until the broker takes them",
        });
      }
    } else if (!this.overBounds(0)) {
      this.overLimitLogged = false;
      this.droppedLogged = false;
    }
    const seq = this.nextSeq++;
    const line = recordLine(seq, kind, topic, payload);
    const entry = this.insert(
      { seq, kind, topic, payload, dropped: new AbortController().signal },
      line,
      new AbortController(),
      false,
    );
    this.pending.push({ line, entry });
    await this.flush();
    return entry;
  }

  /** The broker acknowledged (or refused for good) this entry: forget it. */
  remove(seq: number): void {
    if (this.closed) return;
    const l = this.delete(seq);
    if (!l) return;
    l.settle(true); // acknowledged: the broker has it
    this.kick();
  }

  private unwritten(): Live[] {
    return [...this.live.values()].filter((l) => !l.written);
  }

  /** Resolves when everything pending so far has been handed to the file. */
  private flush(): Promise<void> {
    return new Promise((resolve) => {
      this.waiters.push(resolve);
      this.kick();
    });
  }

  private kick() {
    if (this.writer) return;
    this.writer = (async () => {
      while (this.pending.length > 0 || this.waiters.length > 0) {
        const batch = this.pending.splice(0);
        const waiters = this.waiters.splice(0);
        if (batch.length > 0 || this.unwritten().length > 0) await this.append(batch);
        if (this.deadRecords >= COMPACT_DEAD_RECORDS && this.fileSize > 2 * this.liveSize()) {
          await this.rewrite().catch((err) => this.writeFailed(err, "compact"));
        }
        for (const w of waiters) w();
      }
    })().finally(() => (this.writer = undefined));
  }

  /** Roughly the bytes the live entries take in the file (characters, for speed). */
  private liveSize(): number {
    let n = 0;
    for (const l of this.live.values()) n += l.line.length;
    return n;
  }

  private writeFailed(err: unknown, what: string) {
    this.counters.writeErrors++;
    const unwritten = this.unwritten().length;
    this.o.log?.("outbox.write_failed", {
      file: this.file,
      what,
      error: (err as Error).message,
      unwritten,
      note: unwritten > 0
        ? `kept in memory and still sent; the write is retried with the next append and in ${this.retryMs} ms; until then a result's task stays in the running journal`
        : undefined,
    });
    this.scheduleRetry();
  }

  /** Writes the entries only in memory again later (backing off), until they are on disk. */
  private scheduleRetry() {
    if (this.closed || this.retryTimer !== undefined || this.unwritten().length === 0) return;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      this.flush();
    }, this.retryMs);
    this.retryMs = Math.min(2 * this.retryMs, RETRY_MAX_MS);
  }

  private written(l: Live) {
    l.written = true;
    l.settle(true);
  }

  private async append(batch: { line: string; entry?: Live }[]) {
    // Entries whose earlier append failed go again (unless acknowledged meanwhile).
    const retry = [...this.live.values()].filter((l) =>
      !l.written && !batch.some((b) => b.entry === l)
    );
    const items = [...retry.map((l) => ({ line: l.line, entry: l })), ...batch]
      .filter((b) => !b.entry || this.live.get(b.entry.seq) === b.entry);
    if (items.length === 0) return;
    const data = utf8.encode((this.tornTail ? "\n" : "") + items.map((b) => b.line).join(""));
    if (!this.fh) {
      // The open at start failed: try again (the disk may be back).
      try {
        this.fh = await Deno.open(this.file, { append: true, create: true, mode: 0o600 });
        this.fileSize = (await this.fh.stat()).size;
      } catch (err) {
        return this.writeFailed(err, "open");
      }
    }
    const fh = this.fh;
    try {
      let off = 0;
      while (off < data.byteLength) off += await fh.write(data.subarray(off));
      // Only new entries need to be durable; a lost `del` just re-sends an acknowledged message.
      if (items.some((b) => b.entry)) await fh.syncData();
      this.fileSize += data.byteLength;
      this.tornTail = false;
      for (const b of items) if (b.entry) this.written(b.entry);
      if (this.unwritten().length === 0) {
        this.retryMs = RETRY_MIN_MS;
        clearTimeout(this.retryTimer);
        this.retryTimer = undefined;
      }
    } catch (err) {
      this.writeFailed(err, "append");
      // Cut a torn tail off, so the next append starts on a line of its own; when that fails
      // too, the next append starts with a newline.
      await fh.truncate(this.fileSize).catch(() => (this.tornTail = true));
    }
  }

  /** Writes the live entries to a fresh file and appends to that from now on. */
  private async rewrite() {
    // Entries queued while it runs are not in it: they are on disk once their own append is.
    const entries = [...this.live.values()];
    const lines = entries.map((l) => l.line).join("");
    await writeFileDurable(this.file, lines);
    this.fh?.close();
    this.fh = undefined;
    this.fh = await Deno.open(this.file, { append: true, read: false });
    this.fileSize = utf8.encode(lines).byteLength;
    this.tornTail = false;
    this.deadRecords = 0;
    for (const l of entries) if (this.live.get(l.seq) === l) this.written(l);
  }

  /** Writes what is pending and closes the file. Entries not acknowledged stay for next time. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.flush(); // the last try for entries only in memory
    this.closed = true;
    clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    await this.writer;
    for (const l of this.unwritten()) l.settle(false);
    this.fh?.close();
    this.fh = undefined;
  }
}
