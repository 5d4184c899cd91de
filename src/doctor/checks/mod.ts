/** Every check, in the order the report shows them. */
import type { BrokerMode, Check } from "../check.ts";
import { brokerChecks } from "./broker.ts";
import { caBundleChecks } from "./ca_bundle.ts";
import { configChecks } from "./config.ts";
import { dockerChecks } from "./docker.ts";
import { serverChecks } from "./server.ts";
import { spireAgentChecks, spireServerChecks } from "./spire.ts";
import { taskChecks } from "./tasks.ts";
import { toolChecks } from "./tools.ts";

export function allChecks(broker: BrokerMode): Check[] {
  return [
    ...toolChecks,
    ...configChecks,
    ...spireServerChecks,
    ...spireAgentChecks,
    ...caBundleChecks,
    ...brokerChecks,
    ...(broker === "docker" ? dockerChecks : []),
    ...serverChecks,
    ...taskChecks,
  ];
}
