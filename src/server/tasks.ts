/**
 * The task life cycle as a table-driven state machine: the ONE place that decides what a
 * dispatch, a robot's report, the sweeper or an operator's cancel does to a task
 * (docs/PROTOCOL.md, "Task states"). Every input is an event; a (state, event) pair missing from
 * the table is ignored, so duplicate and out-of-order MQTT deliveries (QoS 1 is at-least-once)
 * are harmless.
 *
 *   pending --dispatch--> dispatched --accepted--> accepted --running--> running --done--> done
 *      \________________________\__________________\__________________\--failed--> failed
 *   pending/dispatched --refused--> refused        pending/dispatched --expire--> expired
 *   accepted/running --lost--> failed (no result within timeout + grace)
 *
 * A robot's report becomes an event through `reportEvent`: a `refused` report whose `reason` is
 * `bad-signature`, `wrong-robot` or `replay` is about a message the robot could not trust (its
 * task id may be unverified, or the task may be running or done) and is never an event; one
 * with `expired` (the robot verified it and it came after its expiresAt) is the `expire` event,
 * for a task that was not taken up; a refusal without a reason is `refused`.
 *
 * Cancel (an operator's request, `k8s4r task cancel ID`), joined with the robot's half:
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
 * `cancelling` the task is never sent again; the cancel is, whenever the robot comes back. The
 * robot answers a verified cancel of a task it is running or has not started with `cancelled`;
 * of a task it never saw, it claims the id (the task, if it comes later, is refused as a
 * `replay` and never runs) and reports `cancelled` too; of a task it finished, it does nothing
 * (the task's own final report is already on its way, and ends `cancelling` as done/failed).
 * The server also sends a cancel for a withdrawn task; the robot's `cancelled` is then a no-op.
 *
 * `expired` only means "not delivered in time": a robot that ran the task anyway (it arrived
 * late) may still report, and its report wins, because it is what really happened.
 */
import type { RefusalReason, TaskReportState } from "../mqtt/messages.ts";

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

/**
 * Refusal reasons that say nothing about the task itself: the robot could not trust the message
 * (`bad-signature`: possibly not even its task id), or it was another copy of a task it handles
 * or handled (`wrong-robot`, `replay`). Reports with them are counted, never applied.
 */
export const UNTRUSTED_REFUSALS: readonly RefusalReason[] = [
  "bad-signature",
  "wrong-robot",
  "replay",
];

/**
 * The event a robot's `task-status` is for `task`, or undefined when it must not change the
 * task (an untrusted refusal, or an `expired` refusal of a task the robot already took up: a late
 * copy of it, while the original runs or ran).
 */
export function reportEvent(
  report: { state: TaskReportState; reason?: RefusalReason },
  task: { acceptedAt: string | null; startedAt: string | null },
): TaskEvent | undefined {
  if (report.state !== "refused" || report.reason === undefined) return report.state;
  if (UNTRUSTED_REFUSALS.includes(report.reason)) return undefined;
  // expired: the robot verified the task and refused it for arriving after its expiresAt.
  if (task.acceptedAt !== null || task.startedAt !== null) return undefined;
  return "expire";
}
