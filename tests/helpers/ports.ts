import { spireServer2TelemetryPort } from "../../src/fleet/ports.ts";

/**
 * Free loopback ports for the servers a test or benchmark starts. The listeners are all held
 * until every port is known, so the ports of one call are distinct.
 */
export function freePorts(n: number): number[] {
  const listeners = Array.from(
    { length: n },
    () => Deno.listen({ hostname: "127.0.0.1", port: 0 }),
  );
  const ports = listeners.map((l) => (l.addr as Deno.NetAddr).port);
  for (const l of listeners) l.close();
  return ports;
}

export function freePort(): number {
  return freePorts(1)[0];
}

/**
 * `n` consecutive free loopback ports (all bound at once, then released), e.g. a dev stack's
 * telemetry ports (`Ports.telemetry`: the control host's 2, then 2 per robot-NNN), and the
 * ports at `base + offset` for each of `also` (the HA stack's second SPIRE server's).
 */
export function freePortBlock(n: number, also: readonly number[] = []): number {
  const top = Math.max(n, ...also.map((o) => o + 1));
  for (let attempt = 0; attempt < 200; attempt++) {
    // Below the kernel's ephemeral range (32768-60999): no outgoing connection takes one meanwhile.
    const base = 10_000 + Math.floor(Math.random() * (22_000 - top));
    const held: Deno.Listener[] = [];
    try {
      for (const offset of [...Array(n).keys(), ...also]) {
        held.push(Deno.listen({ hostname: "127.0.0.1", port: base + offset }));
      }
      return base;
    } catch {
      // one of them is taken: another base
    } finally {
      for (const l of held) l.close();
    }
  }
  throw new Error(`no ${n} consecutive free loopback ports found`);
}

/**
 * A dev stack's monitoring ports for robots robot-001..robot-`robots` (and, with `ha`, the
 * second SPIRE server's): free, on loopback.
 */
export function freeMonitoringPorts(
  robots: number,
  ha = false,
): { telemetry: number; prometheus: number } {
  const n = 2 + 2 * robots;
  const extra = ha ? [spireServer2TelemetryPort(0)] : [];
  const telemetry = freePortBlock(n, extra);
  const used = (p: number) =>
    (p >= telemetry && p < telemetry + n) || extra.some((o) => p === telemetry + o);
  let prometheus = freePort();
  while (used(prometheus)) prometheus = freePort();
  return { telemetry, prometheus };
}
