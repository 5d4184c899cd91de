/**
 * Fleet conventions, in one place: the SPIFFE ID scheme and CN rule (`ids.ts`), the MQTT topic
 * layout (`topics.ts`), the default ports (`ports.ts`), a task's time bounds (`task_limits.ts`)
 * and the production paths of robot and control hosts (`paths.ts`). The agent, the server, devenv
 * and the doctor all import them from here, so they always agree.
 */
export * from "./ids.ts";
export * from "./paths.ts";
export * from "./ports.ts";
export * from "./task_limits.ts";
export * from "./topics.ts";
