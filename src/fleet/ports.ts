/** The fleet's default ports (the guide's). */
export interface Ports {
  spireServer: number; // 8081
  mqttPlain: number; // 1883, loopback only, for the k8s4r server
  mqttTls: number; // 8883, mTLS for robots
  http: number; // 8090, the k8s4r server's HTTP API
}

export const DEFAULT_PORTS: Ports = {
  spireServer: 8081,
  mqttPlain: 1883,
  mqttTls: 8883,
  http: 8090,
};
