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
