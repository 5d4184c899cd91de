/**
 * The MQTT topic tree of the k8s4r protocol (see docs/PROTOCOL.md):
 *
 *   k8s4r/robots/<robotId>/up/<kind>     robot -> server   (register, heartbeat, status, task)
 *   k8s4r/robots/<robotId>/down/<kind>   server -> robot   (task, cancel)
 *
 * The broker ACL lets a robot (username = certificate CN = robot id) write only its own
 * `up/<kind>` for each of UP_KINDS (no wildcard: no made-up retained sub-topics) and read only its
 * own `down/#`, so the `<robotId>` segment of an up topic is authenticated.
 */

import { createHmac } from "node:crypto";

export const TOPIC_ROOT = "k8s4r/robots";

/** Robot ids are DNS-label-like so that they fit a certificate CN, a topic level and a path. */
export const ROBOT_ID_RE = /^[a-z0-9][a-z0-9-]{0,62}$/;

export const UP_KINDS = ["register", "heartbeat", "status", "task"] as const;
export const DOWN_KINDS = ["task", "cancel"] as const;
export type UpKind = typeof UP_KINDS[number];
export type DownKind = typeof DOWN_KINDS[number];
export type Direction = "up" | "down";

/** What the server subscribes to (QoS 1). */
export const SERVER_SUBSCRIPTION = `${TOPIC_ROOT}/+/up/#`;
/** Every robot's retained status (what a new subscriber of the plain filter is sent first). */
export const ROBOT_STATUS_FILTER = `${TOPIC_ROOT}/+/up/status`;
/**
 * The fleet servers' shared-subscription group (`--shared-subscription`, MQTT 5). Not a public
 * name: a robot that names the group joins it (Mosquitto's ACL file cannot refuse a SUBSCRIBE),
 * and the broker then hands it its turns and drops them at delivery (the robot may not read other
 * robots' topics), so the servers lose those messages. The name is derived from the servers'
 * broker password (HMAC-SHA256, 96 bits): every replica has it, no robot does, and nobody has to
 * keep a second secret in step.
 */
export function sharedGroup(serverPassword: string): string {
  if (serverPassword.length === 0) {
    throw new Error("the shared-subscription group needs a password");
  }
  const mac = createHmac("sha256", serverPassword).update("k8s4r shared subscription group v1");
  return `k8s4r-${mac.digest("hex").slice(0, 24)}`;
}

/** What each replica subscribes to: `$share/<sharedGroup(password)>/k8s4r/robots/+/up/#`. */
export function sharedServerSubscription(serverPassword: string): string {
  return `$share/${sharedGroup(serverPassword)}/${SERVER_SUBSCRIPTION}`;
}

/**
 * The fleet server's liveness probe: it publishes its clock there and subscribes to it, so each
 * echo proves the broker delivered everything queued for the server before it. Only the server
 * may write under `k8s4r/server/` (robots' ACL grants their own subtree only).
 */
export function serverProbeTopic(clientId: string): string {
  return `k8s4r/server/${clientId.replace(/[^A-Za-z0-9._-]/g, "_")}/probe`;
}

/**
 * A fleet-server replica's last will (`--shared-subscription`): published by the broker the
 * moment that replica's connection dies without a DISCONNECT (a crash, `kill -9`), so the
 * others adopt its session at once instead of waiting for its lease to expire. The payload is
 * the dead process's instance name.
 */
export function serverGoneTopic(clientId: string): string {
  return `k8s4r/server/${clientId.replace(/[^A-Za-z0-9._-]/g, "_")}/gone`;
}

/** Every replica's last will (see `serverGoneTopic`). */
export const SERVER_GONE_FILTER = "k8s4r/server/+/gone";

export function isRobotId(id: unknown): id is string {
  return typeof id === "string" && ROBOT_ID_RE.test(id);
}

/** Throws on an invalid robot id: a topic must never be built from unchecked input. */
export function assertRobotId(id: string): void {
  if (!isRobotId(id)) {
    throw new Error(
      `invalid robot id ${JSON.stringify(id)}: expected [a-z0-9][a-z0-9-]{0,62}`,
    );
  }
}

export function upTopic(robotId: string, kind: UpKind): string {
  assertRobotId(robotId);
  return `${TOPIC_ROOT}/${robotId}/up/${kind}`;
}

export function downTopic(robotId: string, kind: DownKind): string {
  assertRobotId(robotId);
  return `${TOPIC_ROOT}/${robotId}/down/${kind}`;
}

/** What a robot subscribes to (QoS 1). */
export function robotSubscription(robotId: string): string {
  assertRobotId(robotId);
  return `${TOPIC_ROOT}/${robotId}/down/#`;
}

export type ParsedTopic =
  | { ok: true; robotId: string; direction: "up"; kind: UpKind }
  | { ok: true; robotId: string; direction: "down"; kind: DownKind }
  | { ok: false; error: string };

/** Splits a concrete topic (no wildcards) into robot id, direction and kind. */
export function parseTopic(topic: string): ParsedTopic {
  const parts = topic.split("/");
  if (parts.length !== 5 || parts[0] !== "k8s4r" || parts[1] !== "robots") {
    return {
      ok: false,
      error: `topic ${JSON.stringify(topic)}: expected k8s4r/robots/<id>/(up|down)/<kind>`,
    };
  }
  const [, , robotId, direction, kind] = parts;
  if (!isRobotId(robotId)) {
    return {
      ok: false,
      error: `topic ${JSON.stringify(topic)}: invalid robot id ${JSON.stringify(robotId)}`,
    };
  }
  if (direction === "up") {
    if ((UP_KINDS as readonly string[]).includes(kind)) {
      return { ok: true, robotId, direction, kind: kind as UpKind };
    }
    return {
      ok: false,
      error: `topic ${JSON.stringify(topic)}: unknown up kind ${JSON.stringify(kind)}, expected ${
        UP_KINDS.join("|")
      }`,
    };
  }
  if (direction === "down") {
    if ((DOWN_KINDS as readonly string[]).includes(kind)) {
      return { ok: true, robotId, direction, kind: kind as DownKind };
    }
    return {
      ok: false,
      error: `topic ${JSON.stringify(topic)}: unknown down kind ${JSON.stringify(kind)}, expected ${
        DOWN_KINDS.join("|")
      }`,
    };
  }
  return {
    ok: false,
    error: `topic ${JSON.stringify(topic)}: expected direction up or down, got ${
      JSON.stringify(direction)
    }`,
  };
}
