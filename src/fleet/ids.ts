/**
 * The fleet's identity conventions: the trust domain, the SPIFFE ID of every kind of workload
 * and node, and the CN rule the broker's ACL depends on.
 *
 * The CN rule: a robot's registration entry carries `-dns <robotId>` as its first DNS name, so
 * the robot's X.509 SVID has CN = robot id. Mosquitto's `use_identity_as_username` makes that CN
 * the MQTT username, and the ACL pattern `k8s4r/robots/%u/...` then scopes the robot to its own
 * topics. An SVID without that DNS name cannot log in.
 */

export const TRUST_DOMAIN = "k8s4r.example.org";
export const BROKER_SPIFFE_PATH = "/mqtt-broker";
export const FLEET_SERVER_SPIFFE_PATH = "/fleet-server";
/** The username of the fleet server on the broker's loopback password listener. */
export const SERVER_MQTT_USERNAME = "k8s4r-server";

export function brokerSpiffeId(trustDomain: string): string {
  return `spiffe://${trustDomain}${BROKER_SPIFFE_PATH}`;
}

/** The fleet server's own identity (it signs tasks with this SVID). */
export function fleetServerSpiffeId(trustDomain: string): string {
  return `spiffe://${trustDomain}${FLEET_SERVER_SPIFFE_PATH}`;
}

/** A robot's workload ID: `spiffe://<td>/robot/<robotId>`. */
export function robotSpiffeId(trustDomain: string, robotId: string): string {
  return `spiffe://${trustDomain}/robot/${robotId}`;
}

/** The alias a k8s4r-managed SPIRE agent attests as: `spiffe://<td>/k8s4r/node/<name>`. */
export function nodeSpiffeId(trustDomain: string, name: string): string {
  return `spiffe://${trustDomain}/k8s4r/node/${name}`;
}

/** An operator's identity: `spiffe://<td>/operator/<name>`. */
export function operatorSpiffeId(trustDomain: string, name: string): string {
  return `spiffe://${trustDomain}/operator/${name}`;
}

/** The DNS names a robot's registration entry must carry; the first becomes the CN. */
export function robotDnsNames(robotId: string): string[] {
  return [robotId];
}

/**
 * Robot ids the fleet keeps for itself. The CN rule makes a robot's id its MQTT username, so a
 * robot must never be called like the fleet server's broker login (`k8s4r-server`); with
 * global auth settings (Mosquitto 2.0.21) a certificate CN equal to it would skip password
 * auth. `broker` is the node alias of the broker's own SPIRE agent (`nodeSpiffeId(td, "broker")`).
 * Every id starting with `k8s4r-` is reserved, for names like these to come.
 */
export const RESERVED_ROBOT_ID_PREFIX = "k8s4r-";
export const RESERVED_ROBOT_IDS: readonly string[] = [SERVER_MQTT_USERNAME, "broker"];

export function isReservedRobotId(id: string): boolean {
  return id.startsWith(RESERVED_ROBOT_ID_PREFIX) || RESERVED_ROBOT_IDS.includes(id);
}
