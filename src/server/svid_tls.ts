/**
 * TLS material for `mqtts://` from an X.509 SVID source (the SPIFFE layer's small interface):
 * present our SVID, trust the bundle, and accept the broker only if its SVID carries the expected
 * SPIFFE ID (hostnames are ignored, as in SPIFFE mTLS).
 */
import type { X509SvidSource } from "../spiffe/source.ts";
import { authorizeId, mtlsClientOptions } from "../spiffe/tls.ts";
import type { MqttTlsProvider } from "./fleet_server.ts";

export function svidTlsProvider(source: X509SvidSource, brokerSpiffeId: string): MqttTlsProvider {
  return {
    current: () => mtlsClientOptions(source, authorizeId(brokerSpiffeId)),
    onUpdate: (cb) => source.onUpdate(cb),
  };
}
