/**
 * The fleet simulator: N robots with real SPIRE identities over real mTLS MQTT, for benchmarks
 * (`bench/fleet.ts`). `provision.ts` gets the identities, `fleet.ts` drives the connections.
 */
export {
  createEntriesBatch,
  entriesJson,
  renderSimAgentConfig,
  type SimEntry,
  type SimNode,
  type SimNodeOptions,
  startSimNode,
  waitForCount,
} from "./provision.ts";
export { SimFleet, type SimFleetOptions, type SimFleetStats } from "./fleet.ts";
