/**
 * Time bounds of a task that the fleet server and every robot must agree on: the server's API
 * gives a task at most `MAX_TASK_TTL_SECONDS` to be delivered, and a robot keeps refusing a
 * replayed task id for that long after its `createdAt` (plus the clock skew), so a task can be
 * dispatched (and signed afresh) until the last second of its TTL and still be accepted, and no
 * copy of it can ever run twice.
 */

/** The longest TTL the fleet server gives a task (its API's bound), and the robots' window. */
export const MAX_TASK_TTL_SECONDS = 7 * 24 * 3600;

/** How far a robot's clock may be behind or ahead of the server's by default. */
export const DEFAULT_CLOCK_SKEW_SECONDS = 300;
