/**
 * Unit-test support: an enrollment of robot-007 in `trustDomain`, SPIRE at 10.203.0.1:8081 and
 * the broker at ssl://10.203.0.1:8883 (with the fleet's broker and server IDs). The bundle, the
 * time and the attestation are the test's; `o` may override any other field. Not used by
 * production code.
 */
import type { Enrollment } from "../enrollment.ts";

export function testEnrollment(
  o:
    & Pick<Enrollment, "trustDomain" | "trustBundle" | "createdAt" | "attestation">
    & Partial<Enrollment>,
): Enrollment {
  const { trustDomain: td, trustBundle, createdAt, attestation, ...rest } = o;
  return {
    version: 1,
    robotId: "robot-007",
    trustDomain: td,
    spireServerAddress: "10.203.0.1:8081",
    brokerUrl: "ssl://10.203.0.1:8883",
    brokerSpiffeId: `spiffe://${td}/mqtt-broker`,
    fleetServerSpiffeId: `spiffe://${td}/fleet-server`,
    trustBundle,
    createdAt,
    attestation,
    ...rest,
  };
}
