/**
 * Connects the fleet server's observers to what happens: the Prometheus metrics
 * (`FleetMetrics`, metrics.ts) and the dashboard's events (`FleetEvents`, events.ts).
 *
 * - Storage timings: the registry's timer (`Registry.setTimer`) times every read, transaction
 *   (by purpose: task, sweep) and message batch.
 * - What a COMMIT changed (`Registry.onCommit`): robots online/offline, heartbeats with their
 *   telemetry, registers, task transitions (the task-latency histogram, refused tasks).
 * - Counters polled once a second: dropped messages (one event per reason per second, however
 *   many), and the broker link (robots unknown while it is down or not delivering).
 *
 * Nothing here is on the path of a write: observers run after the commit and never throw into
 * it (the registry swallows a throw).
 */
import { type FleetService, type LinkState } from "./fleet.ts";
import { type CaValidity, FleetMetrics, type MqttState } from "./metrics.ts";
import { FleetEvents } from "./events.ts";
import type { RegistryChange } from "./registry.ts";
import { isFinal } from "./tasks.ts";

export interface ObserveOptions {
  version?: string;
  mqtt: () => MqttState;
  trustBundle?: () => readonly CaValidity[] | undefined;
  events?: FleetEvents;
  /** How often counters are polled for events. Default 1000 ms. */
  pollMs?: number;
}

export interface FleetObservers {
  metrics: FleetMetrics;
  events: FleetEvents;
  close(): void;
}

/** Builds the metrics and events of `fleet` and keeps them fed until `close()`. */
export function observeFleet(fleet: FleetService, opts: ObserveOptions): FleetObservers {
  const registry = fleet.registry;
  const events = opts.events ?? new FleetEvents();
  const metrics = new FleetMetrics({
    // One read of the robot list per scrape; the state (unknown while the broker link is down)
    // is the server's, as the API reports it.
    robots: async () =>
      (await registry.listRobots()).map((r) => ({
        ...r,
        unknownSince: fleet.robotState(r).unknownSince,
      })),
    stats: () => fleet.stats,
    taskCounts: () => registry.countTasksByState(),
    mqtt: opts.mqtt,
    trustBundle: opts.trustBundle,
  }, { version: opts.version, timeSourceReads: false });
  registry.setTimer((op, seconds, failed) => metrics.storage.observe(op, seconds, failed));
  const unsubscribe = registry.onCommit((changes) => applyChanges(changes, metrics, events));

  // Dropped messages and the broker link: polled, so that a flood is summed up.
  let dropped = droppedCounts(fleet);
  let link: LinkState = fleet.linkState();
  const timer = setInterval(() => {
    const now = droppedCounts(fleet);
    for (const [reason, n] of Object.entries(now)) {
      const d = n - (dropped[reason] ?? 0);
      if (d > 0) {
        events.push({
          kind: "dropped",
          text: `${d} message${d === 1 ? "" : "s"} dropped: ${reason}`,
          detail: { reason, count: d },
        });
      }
    }
    dropped = now;
    const l = fleet.linkState();
    if (l.delivering !== link.delivering) {
      events.push({
        kind: "broker",
        text: l.delivering
          ? "the fleet server hears the broker: robot states are known again"
          : l.connected
          ? "the broker stopped delivering (no probe echo): robot states unknown"
          : "the fleet server lost the broker: robot states unknown",
        detail: { connected: l.connected, delivering: l.delivering, since: l.since },
      });
    }
    link = l;
  }, opts.pollMs ?? 1000);
  // Never keep a process alive on its own.
  Deno.unrefTimer(timer as unknown as number);
  return {
    metrics,
    events,
    close() {
      clearInterval(timer);
      unsubscribe();
      registry.setTimer(undefined);
    },
  };
}

function droppedCounts(fleet: FleetService): Record<string, number> {
  const s = fleet.stats;
  return {
    ...s.dropped,
    "unknown-task": s.unknownTaskReports,
  };
}

/** Feeds one commit's changes to the metrics and the events. */
export function applyChanges(
  changes: readonly RegistryChange[],
  metrics: FleetMetrics,
  events: FleetEvents,
): void {
  for (const c of changes) {
    switch (c.kind) {
      case "online":
        events.push({
          kind: c.online ? "online" : "offline",
          robotId: c.robotId,
          at: c.at,
          text: c.online
            ? `${c.robotId} is online`
            : `${c.robotId} is offline${c.reason ? ` (${c.reason})` : ""}`,
          detail: c.reason ? { reason: c.reason } : undefined,
        });
        break;
      case "heartbeat":
        metrics.recordRobotTelemetry(c.robotId, {
          svidIssuedAt: c.info.svidIssuedAt,
          workloadApi: c.info.workloadApi,
          outboundQueueDepth: c.info.outboundQueueDepth,
        });
        events.heartbeat(c.robotId, {
          at: c.at,
          seq: c.seq,
          missing: c.missing,
          bootId: c.bootId,
        });
        events.svidReported(c.robotId, c.info.svidExpiresAt, c.info.svidIssuedAt);
        break;
      case "register":
        if (c.info.svidIssuedAt !== undefined) {
          metrics.recordRobotTelemetry(c.robotId, { svidIssuedAt: c.info.svidIssuedAt });
        }
        events.svidReported(c.robotId, c.info.svidExpiresAt, c.info.svidIssuedAt);
        break;
      case "task":
        if (isFinal(c.task.state)) metrics.taskFinished(c.task);
        if (c.task.state === "refused") {
          events.push({
            kind: "task-refused",
            robotId: c.task.robotId,
            text: `${c.task.robotId} refused task ${c.task.id}${
              c.task.error ? `: ${c.task.error}` : ""
            }`,
            detail: { taskId: c.task.id, error: c.task.error, command: c.task.command },
          });
        }
        break;
    }
  }
}
