/** The fleet's default ports (the guide's), and the dev stack's monitoring ports. */
export interface Ports {
  spireServer: number; // 8081
  mqttPlain: number; // 1883, loopback only, for the k8s4r server
  mqttTls: number; // 8883, mTLS for robots
  http: number; // 8090, the k8s4r server's HTTPS API (and its /metrics)
  /**
   * The first of the dev stack's loopback telemetry ports (9800); see `telemetryPorts`. Each
   * node has two: SPIRE's exporter and the k8s4r agent's `/metrics`.
   */
  telemetry: number;
  /** The dev stack's Prometheus (`devenv start --monitoring`), on loopback (9090). */
  prometheus: number;
}

export const DEFAULT_PORTS: Ports = {
  spireServer: 8081,
  mqttPlain: 1883,
  mqttTls: 8883,
  http: 8090,
  telemetry: 9800,
  prometheus: 9090,
};

/**
 * A node's slot in the telemetry ports: 0 for the control host, N for robot-NNN (1..999), and
 * 1000..1999 (a hash) for any other robot id.
 */
export function telemetrySlot(robotId: string | undefined): number {
  if (robotId === undefined) return 0;
  const m = /^robot-(\d{3})$/.exec(robotId);
  if (m && Number(m[1]) >= 1) return Number(m[1]);
  let h = 0x811c9dc5; // FNV-1a
  for (const c of new TextEncoder().encode(robotId)) h = Math.imul(h ^ c, 0x01000193) >>> 0;
  return 1000 + (h % 1000);
}

/**
 * The slot after every robot's: the HA stack's second SPIRE server (`devenv start --ha`) has
 * its exporter at `base + 2 * HA_TELEMETRY_SLOT` (the slot's second port is unused).
 */
export const HA_TELEMETRY_SLOT = 2000;

/** Most telemetry ports a stack may use above `Ports.telemetry`: 2 per slot. */
export const TELEMETRY_PORT_SPAN = 2 * (HA_TELEMETRY_SLOT + 1);

/**
 * The dev stack's telemetry ports of a node (undefined: the control host): the SPIRE
 * exporter's (the SPIRE server's for the control host) at `base + 2 * slot`, and the k8s4r
 * side's (the control host's own SPIRE agent, or the robot's k8s4r agent) at `base + 2 * slot +
 * 1`.
 */
export function telemetryPorts(base: number, robotId?: string): { spire: number; k8s4r: number } {
  const s = telemetrySlot(robotId);
  return { spire: base + 2 * s, k8s4r: base + 2 * s + 1 };
}

/** The telemetry port of the HA stack's second SPIRE server. */
export function spireServer2TelemetryPort(base: number): number {
  return base + 2 * HA_TELEMETRY_SLOT;
}
