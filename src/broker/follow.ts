/**
 * Following the broker's SVID: an X509 source on a SPIRE agent's Workload API, handed to
 * `BrokerIdentity` on every update, until the signal aborts. `k8s4r broker identity` runs it
 * against the broker host's agent; devenv's broker-identity component against its own.
 */
import { X509Source } from "../spiffe/mod.ts";
import { type BrokerControl, BrokerIdentity, type BrokerIdentityPaths } from "./identity.ts";

export interface FollowOptions {
  /** The SPIRE agent's Workload API socket. */
  socket: string;
  /** `spiffe://<td>/mqtt-broker`. */
  spiffeId: string;
  paths: BrokerIdentityPaths;
  control: BrokerControl;
  log: (line: string) => void;
  signal: AbortSignal;
  /** Write the files (and tell the broker) once, then return. */
  once?: boolean;
  /** How long to wait for the first SVID. Default 60 s. */
  timeoutMs?: number;
  /** Called after the first update was handled. */
  onReady?: () => void;
}

export async function followBrokerIdentity(o: FollowOptions): Promise<void> {
  const source = await X509Source.create({
    address: `unix://${o.socket}`,
    spiffeId: o.spiffeId,
    timeoutMs: o.timeoutMs ?? 60_000,
    signal: o.signal,
  });
  try {
    const bi = new BrokerIdentity(source, o.paths, o.control, o.log);
    if (!o.once) source.onUpdate(() => void bi.update());
    await bi.update();
    o.onReady?.();
    if (o.once) return;
    o.log("ready; following SVID and bundle updates");
    await new Promise<void>((resolve) => {
      if (o.signal.aborted) return resolve();
      o.signal.addEventListener("abort", () => resolve(), { once: true });
    });
  } finally {
    await Promise.resolve(source.close()).catch(() => {});
  }
}
