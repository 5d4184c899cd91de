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
