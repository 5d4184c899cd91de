/** What a robot tells the fleet about itself when it registers. Read fresh on every call. */
import { cpus } from "node:os";
import type { DeviceInfo } from "../mqtt/messages.ts";

export type { DeviceInfo };

export function deviceInfo(): DeviceInfo {
  let hostname = "unknown";
  try {
    hostname = Deno.hostname();
  } catch { /* sandboxed */ }
  let osRelease = "";
  try {
    osRelease = Deno.osRelease();
  } catch { /* sandboxed */ }
  const mem = safe(() => Deno.systemMemoryInfo().total, 0);
  const load = safe(() => Deno.loadavg(), [0, 0, 0]);
  return {
    hostname: hostname.slice(0, 253),
    os: `${Deno.build.os}${osRelease ? ` ${osRelease}` : ""}`.slice(0, 64),
    arch: Deno.build.arch,
    cpus: Math.max(1, safe(() => cpus().length, 0) || navigator.hardwareConcurrency || 1),
    memoryBytes: Math.max(0, Math.floor(mem)),
    load: [round(load[0]), round(load[1]), round(load[2])],
    uptimeSeconds: Math.max(0, Math.floor(safe(() => Deno.osUptime(), 0))),
  };
}

/** The 1/5/15 minute load, for heartbeats. */
export function loadAverage(): [number, number, number] {
  const l = safe(() => Deno.loadavg(), [0, 0, 0]);
  return [round(l[0]), round(l[1]), round(l[2])];
}

function round(n: number): number {
  return Number.isFinite(n) && n >= 0 ? Math.round(n * 100) / 100 : 0;
}

function safe<T>(fn: () => T, fallback: T): T {
  try {
    return fn();
  } catch {
    return fallback;
  }
}
