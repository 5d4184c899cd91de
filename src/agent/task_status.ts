/**
 * Task-status reports that always fit the protocol's limits, whatever the task printed.
 *
 * The bound is on the ENCODED message: JSON escaping can make a byte of output 6 bytes long (a
 * NUL is `\u0000`), so 64 KiB of output may be 384 KiB of message. The output tails are cut
 * from the front until the whole message, envelope included, is at most MAX_PAYLOAD_BYTES and
 * each tail at most MAX_OUTPUT_TAIL characters. A cut never splits a UTF-8 character, and
 * `stdoutTruncatedBytes` / `stderrTruncatedBytes` say how many bytes of output are missing
 * before the tail.
 */
import {
  encode,
  type Envelope,
  MAX_OUTPUT_TAIL,
  MAX_PAYLOAD_BYTES,
  now,
  PROTOCOL_VERSION,
  type TaskStatusMessage,
} from "../mqtt/messages.ts";

/** One status report: a task-status message without its envelope. */
export type TaskReport = Omit<TaskStatusMessage, keyof Envelope | "type">;

/** What a task wrote on one stream: the last bytes kept, and how many it wrote in all. */
export interface RawOutput {
  bytes: Uint8Array;
  total: number;
}

/** Room left for the envelope (`v`, `type`, a robot id of up to 63 chars, `ts`): ~140 bytes. */
export const ENVELOPE_RESERVE = 256;
/** The protocol's bound on `error` (characters). */
export const MAX_ERROR_CHARS = 4096;

const utf8 = new TextEncoder();
const decoder = new TextDecoder();

/** Bytes of `s` as a JSON string value, quotes included. */
export function encodedSize(s: string): number {
  return utf8.encode(JSON.stringify(s)).byteLength;
}

/** An error message within the protocol's bound (its head is kept: it says what happened). */
export function boundError(error: string): string {
  if (error.length <= MAX_ERROR_CHARS) return error;
  return error.slice(0, MAX_ERROR_CHARS - 3) + "...";
}

/** Decodes from byte `k`, first skipping the continuation bytes of a character cut in half. */
function decodeFrom(bytes: Uint8Array, k: number): { text: string; start: number } {
  let s = k;
  while (s < bytes.length && s - k < 3 && (bytes[s] & 0xc0) === 0x80) s++;
  return { text: decoder.decode(bytes.subarray(s)), start: s };
}

/** The longest tail of `raw` whose JSON value is at most `budget` bytes (quotes included). */
function fitTail(raw: RawOutput, budget: number): { text: string; truncated: number } {
  const fits = (k: number) => {
    const d = decodeFrom(raw.bytes, k);
    return d.text.length <= MAX_OUTPUT_TAIL && encodedSize(d.text) <= budget ? d : undefined;
  };
  let best = fits(0);
  if (!best) {
    // Binary search for the earliest start that fits; `hi` always fits (the empty tail does).
    let lo = 0;
    let hi = raw.bytes.length;
    while (hi - lo > 1) {
      const mid = (lo + hi) >>> 1;
      if (fits(mid)) hi = mid;
      else lo = mid;
    }
    best = fits(hi) ?? { text: "", start: raw.bytes.length };
  }
  return { text: best.text, truncated: raw.total - raw.bytes.length + best.start };
}

/**
 * Adds the output tails to `base` so that the message fits `limit` bytes once the envelope is
 * added (`limit` defaults to MAX_PAYLOAD_BYTES - ENVELOPE_RESERVE). When both tails do not fit,
 * each gets half of the room, and what one does not need goes to the other.
 */
export function withOutput(
  base: TaskReport,
  out: RawOutput,
  err: RawOutput,
  limit = MAX_PAYLOAD_BYTES - ENVELOPE_RESERVE,
): TaskReport {
  const r: TaskReport = { ...base };
  if (r.error !== undefined) r.error = boundError(r.error);
  // The message with empty tails and the widest truncation counts it could carry.
  const skeleton = encode({
    v: PROTOCOL_VERSION,
    type: "task-status",
    robotId: "",
    ts: "",
    ...r,
    stdout: "",
    stderr: "",
    stdoutTruncatedBytes: Number.MAX_SAFE_INTEGER,
    stderrTruncatedBytes: Number.MAX_SAFE_INTEGER,
  } as TaskStatusMessage).byteLength;
  const room = Math.max(0, limit - skeleton);
  const need = (o: RawOutput) => {
    const d = decodeFrom(o.bytes, 0);
    return d.text.length <= MAX_OUTPUT_TAIL ? encodedSize(d.text) - 2 : Infinity;
  };
  const needOut = need(out);
  const needErr = need(err);
  let roomOut: number;
  let roomErr: number;
  if (needOut + needErr <= room) {
    roomOut = needOut;
    roomErr = needErr;
  } else {
    const half = Math.floor(room / 2);
    roomOut = needOut <= half ? needOut : needErr <= half ? room - needErr : half;
    roomErr = room - roomOut;
  }
  const o = fitTail(out, roomOut + 2);
  const e = fitTail(err, roomErr + 2);
  r.stdout = o.text;
  r.stderr = e.text;
  if (o.truncated > 0) r.stdoutTruncatedBytes = o.truncated;
  if (e.truncated > 0) r.stderrTruncatedBytes = e.truncated;
  return r;
}

/** The full message for a report. */
export function taskStatusMessage(robotId: string, r: TaskReport, ts = now()): TaskStatusMessage {
  const msg: TaskStatusMessage = {
    v: PROTOCOL_VERSION,
    type: "task-status",
    robotId,
    ts,
    taskId: r.taskId,
    state: r.state,
  };
  if (r.exitCode !== undefined) msg.exitCode = r.exitCode;
  if (r.stdout !== undefined) msg.stdout = r.stdout;
  if (r.stderr !== undefined) msg.stderr = r.stderr;
  if (r.stdoutTruncatedBytes !== undefined) msg.stdoutTruncatedBytes = r.stdoutTruncatedBytes;
  if (r.stderrTruncatedBytes !== undefined) msg.stderrTruncatedBytes = r.stderrTruncatedBytes;
  if (r.error !== undefined) msg.error = boundError(r.error);
  if (r.reason !== undefined) msg.reason = r.reason;
  return msg;
}

/**
 * Encodes a report; never more than MAX_PAYLOAD_BYTES. `withOutput` already guarantees it; if a
 * caller passed unbounded tails anyway, they are dropped (counted as truncated) rather than the
 * whole result being refused by the server.
 */
export function encodeTaskStatus(robotId: string, r: TaskReport, ts = now()): Uint8Array {
  const msg = taskStatusMessage(robotId, r, ts);
  const bytes = encode(msg);
  if (bytes.byteLength <= MAX_PAYLOAD_BYTES) return bytes;
  const cut = (s: string | undefined, before: number | undefined) =>
    s === undefined ? before : (before ?? 0) + utf8.encode(s).byteLength;
  const stripped: TaskStatusMessage = {
    ...msg,
    stdout: "",
    stderr: "",
    stdoutTruncatedBytes: cut(msg.stdout, msg.stdoutTruncatedBytes),
    stderrTruncatedBytes: cut(msg.stderr, msg.stderrTruncatedBytes),
  };
  return encode(stripped);
}
