/**
 * The task life cycle as a table-driven state machine. Every input (the server dispatching, a
 * robot's report, the TTL sweeper) is an event; a (state, event) pair missing from the table is
 * ignored, so duplicate and out-of-order MQTT deliveries (QoS 1 is at-least-once) are harmless.
 *
 *   pending --dispatch--> dispatched --accepted--> accepted --running--> running --done--> done
 *      \________________________\__________________\__________________\--failed--> failed
 *   pending/dispatched --refused--> refused        pending/dispatched --expire--> expired
 *   accepted/running --lost--> failed (no result within timeout + grace)
 *
 * `expired` only means "not delivered in time": a robot that ran the task anyway (it arrived
 * late) may still report, and its report wins, because it is what really happened.
 */
import type { TaskReportState } from "../mqtt/messages.ts";

export const TASK_STATES = [
  "pending",
  "dispatched",
  "accepted",
  "running",
  "done",
  "failed",
  "refused",
  "expired",
] as const;
export type TaskState = typeof TASK_STATES[number];

export type TaskEvent = "dispatch" | TaskReportState | "expire" | "lost";

/** States the server will never leave on its own (only robot reports may move `expired`). */
export const FINAL_STATES: readonly TaskState[] = ["done", "failed", "refused", "expired"];

/** A task not yet taken up by its robot: pending and dispatched move alike. */
const QUEUED: Partial<Record<TaskEvent, TaskState>> = {
  dispatch: "dispatched",
  accepted: "accepted",
  running: "running",
  done: "done",
  failed: "failed",
  refused: "refused",
  expire: "expired",
};

const TABLE: Record<TaskState, Partial<Record<TaskEvent, TaskState>>> = {
  pending: QUEUED,
  dispatched: QUEUED,
  accepted: {
    accepted: "accepted",
    running: "running",
    done: "done",
    failed: "failed",
    lost: "failed",
  },
  running: {
    running: "running",
    done: "done",
    failed: "failed",
    lost: "failed",
  },
  done: { done: "done" },
  failed: { failed: "failed" },
  refused: { refused: "refused" },
  expired: {
    expire: "expired",
    accepted: "accepted",
    running: "running",
    done: "done",
    failed: "failed",
    refused: "refused",
  },
};

export interface Transition {
  from: TaskState;
  to: TaskState;
  /** True when the state changes. */
  changed: boolean;
  /** True when the table has no entry: the event is stale or a conflict and is dropped. */
  ignored: boolean;
}

export function transition(from: TaskState, event: TaskEvent): Transition {
  const to = TABLE[from][event];
  if (to === undefined) return { from, to: from, changed: false, ignored: true };
  return { from, to, changed: to !== from, ignored: false };
}

/** Tasks in these states are (re)sent to their robot when it is online. */
export function needsDispatch(state: TaskState): boolean {
  return state === "pending" || state === "dispatched";
}

export function isTaskState(s: string): s is TaskState {
  return (TASK_STATES as readonly string[]).includes(s);
}
