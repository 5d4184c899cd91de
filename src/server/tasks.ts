/**
 * The task life cycle as a table-driven state machine. Every input (the server dispatching, a
 * robot's report, the TTL sweeper, an operator's cancel) is an event; a (state, event) pair
 * missing from the table is ignored, so duplicate and out-of-order MQTT deliveries (QoS 1 is
 * at-least-once) are harmless.
 *
 *   pending --dispatch--> dispatched --accepted--> accepted --running--> running --done--> done
 *      \________________________\__________________\__________________\--failed--> failed
 *   pending/dispatched --refused--> refused        pending/dispatched --expire--> expired
 *   accepted/running --lost--> failed (no result within timeout + grace)
 *
 * Cancel (an operator's request, `k8s4r task cancel ID`):
 *
 *   pending --withdraw--> cancelled     never sent: cancelled at once, and never sent afterwards
 *   pending/dispatched/accepted/running --cancel--> cancelling --cancelled--> cancelled
 *   cancelling --done|failed|refused--> done|failed|refused  (the robot finished first)
 *   cancelling --expire--> cancelled    never taken up before its expiresAt: robots refuse it
 *   cancelling --lost--> failed         no report within timeout + grace
 *
 * `withdraw` is for a pending task that is not being published: it cannot have reached the
 * robot from this process. `cancel` is for everything else: the server sends a signed `cancel`
 * and the task stays `cancelling` until the robot reports (or the sweeper decides). While
 * `cancelling` the task is never sent again; the cancel is, whenever the robot comes back.
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
  "cancelling",
  "done",
  "failed",
  "refused",
  "expired",
  "cancelled",
] as const;
export type TaskState = typeof TASK_STATES[number];

export type TaskEvent = "dispatch" | TaskReportState | "expire" | "lost" | "cancel" | "withdraw";

/** States the server will never leave on its own (only robot reports may move `expired`). */
export const FINAL_STATES: readonly TaskState[] = [
  "done",
  "failed",
  "refused",
  "expired",
  "cancelled",
];

/** A task not yet taken up by its robot: pending and dispatched move alike. */
const QUEUED: Partial<Record<TaskEvent, TaskState>> = {
  dispatch: "dispatched",
  accepted: "accepted",
  running: "running",
  done: "done",
  failed: "failed",
  refused: "refused",
  cancelled: "cancelled",
  expire: "expired",
  cancel: "cancelling",
};

const TABLE: Record<TaskState, Partial<Record<TaskEvent, TaskState>>> = {
  pending: { ...QUEUED, withdraw: "cancelled" },
  dispatched: QUEUED,
  accepted: {
    accepted: "accepted",
    running: "running",
    done: "done",
    failed: "failed",
    cancelled: "cancelled",
    lost: "failed",
    cancel: "cancelling",
  },
  running: {
    running: "running",
    done: "done",
    failed: "failed",
    cancelled: "cancelled",
    lost: "failed",
    cancel: "cancelling",
  },
  cancelling: {
    // A publish in flight when the cancel came acknowledged late; reports of progress: the
    // task stays cancelling (their times are still recorded).
    dispatch: "cancelling",
    accepted: "cancelling",
    running: "cancelling",
    cancel: "cancelling",
    cancelled: "cancelled",
    done: "done",
    failed: "failed",
    refused: "refused",
    lost: "failed",
    expire: "cancelled",
  },
  done: { done: "done" },
  failed: { failed: "failed" },
  refused: { refused: "refused" },
  cancelled: { cancelled: "cancelled" },
  expired: {
    expire: "expired",
    accepted: "accepted",
    running: "running",
    done: "done",
    failed: "failed",
    refused: "refused",
    cancelled: "cancelled",
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

/** Tasks in this state get their `cancel` (re)sent when the robot is online. */
export function needsCancel(state: TaskState): boolean {
  return state === "cancelling";
}

export function isFinal(state: TaskState): boolean {
  return FINAL_STATES.includes(state);
}

export function isTaskState(s: string): s is TaskState {
  return (TASK_STATES as readonly string[]).includes(s);
}
