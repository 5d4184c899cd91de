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

/** Operator names: a SPIFFE path segment, a directory name and a YAML key at once. */
export const OPERATOR_NAME_RE = /^[a-z0-9][a-z0-9._-]{0,62}$/;
export const OPERATOR_SPIFFE_PREFIX = "/operator/";

export function isOperatorName(name: unknown): name is string {
  return typeof name === "string" && OPERATOR_NAME_RE.test(name) && !name.includes("..");
}

/** An operator's identity: `spiffe://<td>/operator/<name>`. */
export function operatorSpiffeId(trustDomain: string, name: string): string {
  if (!isOperatorName(name)) {
    throw new Error(
      `invalid operator name ${JSON.stringify(name)}: expected [a-z0-9][a-z0-9._-]{0,62}`,
    );
  }
  return `spiffe://${trustDomain}${OPERATOR_SPIFFE_PREFIX}${name}`;
}

/**
 * The operator name in `spiffe://<trustDomain>/operator/<name>`, or undefined for any other ID
 * (another trust domain, a robot, the broker, a deeper path).
 */
export function operatorNameOf(spiffeId: string, trustDomain: string): string | undefined {
  const prefix = `spiffe://${trustDomain}${OPERATOR_SPIFFE_PREFIX}`;
  if (!spiffeId.startsWith(prefix)) return undefined;
  const name = spiffeId.slice(prefix.length);
  return isOperatorName(name) ? name : undefined;
}

/**
 * The DNS names of the fleet server's registration entry; the first is its certificate's CN.
 * Only DNS names: SPIRE v1.13.3 writes an entry's `-dns 127.0.0.1` as a dNSName SAN, not an
 * iPAddress SAN, and TLS clients (curl, rustls) do not match an IP address against it. So the
 * server's URL is `https://localhost:8090` (it listens on 127.0.0.1:8090).
 */
export function fleetServerDnsNames(): string[] {
  return ["localhost"];
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
 * `localhost` is the CN of the fleet server's and the broker's own SVIDs (`fleetServerDnsNames`,
 * the broker's `-dns localhost`): a fleet server on `mqtts://` is a TLS admin user by that CN,
 * and the broker makes a CN the client id, so no robot may have it. Every id starting with
 * `k8s4r-` is reserved, for names like these to come.
 */
export const RESERVED_ROBOT_ID_PREFIX = "k8s4r-";
export const RESERVED_ROBOT_IDS: readonly string[] = [
  SERVER_MQTT_USERNAME,
  "broker",
  ...fleetServerDnsNames(),
];

export function isReservedRobotId(id: string): boolean {
  return id.startsWith(RESERVED_ROBOT_ID_PREFIX) || RESERVED_ROBOT_IDS.includes(id);
}
