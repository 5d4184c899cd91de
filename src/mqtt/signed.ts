/**
 * Signed server -> robot messages (docs/PROTOCOL.md, "Signed tasks and cancels").
 *
 * Every `task` and `cancel` travels as a JWS (RFC 7515, Flattened JSON Serialization): the
 * payload is the EXACT bytes of the v1 message, the protected header names the algorithm
 * (ES256), the kind (`typ`: `k8s4r-task` or `k8s4r-cancel`) and the fleet server's X.509-SVID
 * chain (`x5c`), and the signature is made with that SVID's key (src/spiffe/jws.ts).
 *
 * - `TaskSigner` (fleet server): signs with the newest SVID of its source, so it follows
 *   rotation; one sign per message.
 * - `checkDown` (robot): the one place that decides whether a delivered message may be acted on:
 *   structure, chain against the robot's bundle, signer = the configured fleet-server ID, the
 *   message kind matches the topic, addressed to this robot, not expired, `createdAt` inside the
 *   window, and not created before what the robot's id store can vouch for (`forgottenUpTo`).
 *   It does not know which ids were seen: that is the robot's durable id store, which must
 *   remember each id until `replayWindowEnd(message)` (with the window in force).
 */
import {
  isFlattenedJws,
  JwsError,
  parseJws,
  signJws,
  verifyJws,
  X5cChainCache,
} from "../spiffe/jws.ts";
import type { X509BundleSource } from "../spiffe/bundle.ts";
import type { X509Svid } from "../spiffe/svid.ts";
import { type DownKind, parseTopic } from "../fleet/topics.ts";
import { DEFAULT_CLOCK_SKEW_SECONDS, MAX_TASK_TTL_SECONDS } from "../fleet/task_limits.ts";
import {
  type CancelMessage,
  DOWN_TYPE,
  type DownMessage,
  type DropReason,
  encode,
  MAX_PAYLOAD_BYTES,
  type RefusalReason,
  type Result,
  TASK_ID_RE,
  type TaskMessage,
  validateCancel,
  validateTask,
} from "./messages.ts";

export { X5cChainCache };

/** The JWS `typ` of each down topic kind. */
export const SIGNED_TYP: Record<DownKind, string> = {
  task: "k8s4r-task",
  cancel: "k8s4r-cancel",
};

// The window and the server's TTL bound are one fleet convention (src/fleet/task_limits.ts).
export { DEFAULT_CLOCK_SKEW_SECONDS, MAX_TASK_TTL_SECONDS };

const enc = new TextEncoder();

/** Anything that holds the newest X.509 SVID (an X509Source, a StaticX509Source). */
export interface SvidProvider {
  getX509Svid(): X509Svid;
}

/**
 * Signs tasks and cancels with the fleet server's X.509 SVID. Each call uses the newest SVID of
 * the provider, so a rotation takes effect on the next message.
 */
export class TaskSigner {
  constructor(
    private readonly source: SvidProvider,
    private readonly now: () => Date = () => new Date(),
  ) {}

  /** The SPIFFE ID messages are signed with now. */
  get signerId(): string {
    return this.source.getX509Svid().id.toString();
  }

  /**
   * The MQTT payload for `msg` on its down topic: a JWS over `encode(msg)`. Throws when the
   * result would exceed MAX_PAYLOAD_BYTES (robots drop larger payloads unread).
   */
  sign(msg: DownMessage): Uint8Array {
    const kind: DownKind = msg.type === "task" ? "task" : "cancel";
    return this.signBytes(kind, encode(msg));
  }

  /** Signs already-encoded message bytes of `kind` (they are sent exactly as given). */
  signBytes(kind: DownKind, bytes: Uint8Array): Uint8Array {
    const svid = this.source.getX509Svid();
    // Robots would refuse it (bad-signature): better not sent, and sent once a new SVID came.
    const now = this.now();
    if (now >= svid.notAfter || now < svid.notBefore) {
      throw new Error(
        `the signing SVID ${svid.id} is not valid now (${now.toISOString()}; valid ${svid.notBefore.toISOString()} to ${svid.notAfter.toISOString()}): waiting for a new one from the Workload API`,
      );
    }
    const jws = signJws(bytes, svid, { typ: SIGNED_TYP[kind] });
    const out = enc.encode(JSON.stringify(jws));
    if (out.byteLength > MAX_PAYLOAD_BYTES) {
      throw new Error(
        `signed ${kind} is ${out.byteLength} bytes, over the ${MAX_PAYLOAD_BYTES}-byte payload limit (the message itself is ${bytes.byteLength} bytes; base64 adds a third)`,
      );
    }
    return out;
  }
}

export interface DownCheckOptions {
  /** This robot's id: messages addressed to another are refused (`wrong-robot`). */
  robotId: string;
  /** The robot's trust bundles (its X509Source: follows CA rotation). */
  bundles: X509BundleSource;
  /** The only SPIFFE ID whose signature is accepted (the fleet server's). */
  signerId: string;
  /** The robot's clock. */
  now?: Date;
  /**
   * The newest `createdAt` (a cancel's `ts`), in ms, of an id the robot's id store has forgotten:
   * a message created at or before it may carry an id already seen, so it is refused
   * (`replay`). This, not the clock, is what keeps a replay of a forgotten id out after the
   * clock was set back or the window raised.
   */
  forgottenUpTo?: number;
  clockSkewSeconds?: number;
  /** The window: how old a `createdAt` may be. Default MAX_TASK_TTL_SECONDS. */
  maxAgeSeconds?: number;
  cache?: X5cChainCache;
}

export type DownVerdict =
  | {
    ok: true;
    message: DownMessage;
    /** The SPIFFE ID that signed it (the fleet server's). */
    signer: string;
  }
  /** Not a message at all (wrong topic, too large, not JSON, not valid): counted and dropped. */
  | { ok: false; kind: "malformed"; reason: DropReason; error: string }
  /** A message the robot must not act on; reported for tasks (`refused` with `reason`). */
  | {
    ok: false;
    kind: "refused";
    reason: RefusalReason;
    error: string;
    type: DownMessage["type"];
    /** The task id the message names (unverified unless the signature verified). */
    taskId?: string;
  };

const utf8 = new TextDecoder("utf-8", { fatal: true });

const VALIDATORS: Record<DownKind, (v: unknown) => Result<DownMessage>> = {
  task: validateTask,
  cancel: validateCancel,
};

function taskIdOf(value: unknown): string | undefined {
  if (typeof value !== "object" || value === null) return undefined;
  const v = value as Record<string, unknown>;
  const id = v.type === "cancel" ? v.taskId : v.id ?? v.taskId;
  return typeof id === "string" && TASK_ID_RE.test(id) ? id : undefined;
}

function jsonOf(bytes: Uint8Array): { ok: true; value: unknown } | { ok: false; error: string } {
  try {
    return { ok: true, value: JSON.parse(utf8.decode(bytes)) };
  } catch (err) {
    return { ok: false, error: `not UTF-8 JSON: ${(err as Error).message}` };
  }
}

/** When the robot may forget a message's id: past it, `checkDown` refuses the message by age. */
export function replayWindowEnd(
  msg: Pick<TaskMessage, "createdAt"> | Pick<CancelMessage, "ts">,
  opts: { clockSkewSeconds?: number; maxAgeSeconds?: number } = {},
): number {
  const at = "createdAt" in msg ? msg.createdAt : msg.ts;
  const skew = opts.clockSkewSeconds ?? DEFAULT_CLOCK_SKEW_SECONDS;
  const age = opts.maxAgeSeconds ?? MAX_TASK_TTL_SECONDS;
  return Date.parse(at) + (age + skew) * 1000;
}

/** The time rules: `expired` (after expiresAt) and `replay` (createdAt outside the window). */
export function checkTime(
  msg: DownMessage,
  opts: Pick<DownCheckOptions, "now" | "forgottenUpTo" | "clockSkewSeconds" | "maxAgeSeconds">,
): { reason: RefusalReason; error: string } | undefined {
  const now = opts.now ?? new Date();
  const skew = opts.clockSkewSeconds ?? DEFAULT_CLOCK_SKEW_SECONDS;
  const age = opts.maxAgeSeconds ?? MAX_TASK_TTL_SECONDS;
  const clock = `robot clock ${now.toISOString()}`;
  if (msg.type === "task" && msg.expiresAt !== undefined) {
    if (now.getTime() > Date.parse(msg.expiresAt)) {
      return {
        reason: "expired",
        error: `expired: arrived at ${now.toISOString()}, after its expiresAt ${msg.expiresAt}`,
      };
    }
  }
  const field = msg.type === "task" ? "createdAt" : "ts";
  const at = msg.type === "task" ? msg.createdAt : msg.ts;
  const t = Date.parse(at);
  if (t > now.getTime() + skew * 1000) {
    return {
      reason: "replay",
      error: `replay: ${field} ${at} is in the future (${clock}; clock skew allowed: ${skew} s)`,
    };
  }
  if (t < now.getTime() - (age + skew) * 1000) {
    return {
      reason: "replay",
      error: `replay: ${field} ${at} is older than the window of ${age} s + ${skew} s (${clock})`,
    };
  }
  if (opts.forgottenUpTo !== undefined && opts.forgottenUpTo > 0 && t <= opts.forgottenUpTo) {
    return {
      reason: "replay",
      error: `replay: ${field} ${at} is not after ${
        new Date(opts.forgottenUpTo).toISOString()
      }, up to which this robot has forgotten the ids it saw: it cannot tell whether this one ran`,
    };
  }
  return undefined;
}

/**
 * Decides what a robot may do with a payload delivered on one of its down topics. Never throws.
 */
export function checkDown(topic: string, payload: Uint8Array, opts: DownCheckOptions): DownVerdict {
  const t = parseTopic(topic);
  if (!t.ok) return { ok: false, kind: "malformed", reason: "bad-topic", error: t.error };
  if (t.direction !== "down") {
    return {
      ok: false,
      kind: "malformed",
      reason: "bad-topic",
      error: `topic ${topic}: expected a down topic`,
    };
  }
  if (t.robotId !== opts.robotId) {
    return {
      ok: false,
      kind: "malformed",
      reason: "robot-id-mismatch",
      error: `topic ${topic} is not this robot's (${opts.robotId})`,
    };
  }
  const type = DOWN_TYPE[t.kind];
  if (payload.byteLength > MAX_PAYLOAD_BYTES) {
    return {
      ok: false,
      kind: "malformed",
      reason: "too-large",
      error: `payload of ${payload.byteLength} bytes exceeds ${MAX_PAYLOAD_BYTES}`,
    };
  }
  const outer = jsonOf(payload);
  if (!outer.ok) {
    return { ok: false, kind: "malformed", reason: "bad-json", error: `payload is ${outer.error}` };
  }
  const refused = (reason: RefusalReason, error: string, taskId?: string): DownVerdict => ({
    ok: false,
    kind: "refused",
    reason,
    error,
    type,
    taskId,
  });

  let inner: unknown;
  let signer: string | undefined;
  if (isFlattenedJws(outer.value)) {
    let verifiedPayload: Uint8Array;
    try {
      const jws = parseJws(outer.value);
      const claimed = jsonOf(jws.payload);
      const claimedId = claimed.ok ? taskIdOf(claimed.value) : undefined;
      try {
        const v = verifyJws(jws, opts.bundles, { now: opts.now, cache: opts.cache });
        signer = v.signer.toString();
        if (signer !== opts.signerId) {
          return refused(
            "bad-signature",
            `bad-signature: signed by ${signer}, expected the fleet server ${opts.signerId}`,
            claimedId,
          );
        }
        if (v.header.typ !== SIGNED_TYP[t.kind]) {
          return {
            ok: false,
            kind: "malformed",
            reason: "bad-schema",
            error: `JWS typ ${JSON.stringify(v.header.typ)} on a ${t.kind} topic (expected ${
              SIGNED_TYP[t.kind]
            })`,
          };
        }
        verifiedPayload = v.payload;
      } catch (err) {
        if (err instanceof JwsError) {
          return refused("bad-signature", `bad-signature: ${err.message}`, claimedId);
        }
        throw err;
      }
    } catch (err) {
      if (err instanceof JwsError) return refused("bad-signature", `bad-signature: ${err.message}`);
      throw err;
    }
    const j = jsonOf(verifiedPayload);
    if (!j.ok) {
      return {
        ok: false,
        kind: "malformed",
        reason: "bad-json",
        error: `signed payload is ${j.error}`,
      };
    }
    inner = j.value;
  } else {
    // Unsigned: whoever holds the broker's password could have sent it. Never acted on.
    const value = outer.value;
    const kind = typeof value === "object" && value !== null &&
        typeof (value as Record<string, unknown>).type === "string"
      ? (value as Record<string, unknown>).type
      : type;
    return refused(
      "bad-signature",
      `bad-signature: unsigned ${kind}: this robot runs only what the fleet server ${opts.signerId} signed`,
      taskIdOf(value),
    );
  }

  const r = VALIDATORS[t.kind](inner);
  if (!r.ok) {
    const reason = /\.v: unsupported protocol version/.test(r.error)
      ? "unsupported-version"
      : "bad-schema";
    return { ok: false, kind: "malformed", reason, error: r.error };
  }
  const msg = r.value;
  const id = msg.type === "task" ? msg.id : msg.taskId;
  if (msg.robotId !== opts.robotId) {
    return refused(
      "wrong-robot",
      `wrong-robot: addressed to ${msg.robotId}, this is ${opts.robotId}`,
      id,
    );
  }
  const time = checkTime(msg, opts);
  if (time) return refused(time.reason, time.error, id);
  return { ok: true, message: msg, signer: signer! };
}
