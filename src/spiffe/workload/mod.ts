/** The Workload API part of the SPIFFE layer; see `../mod.ts` for the whole public API. */
export * from "./address.ts";
export * from "./client.ts";
export * from "./errors.ts";
export * from "./x509_source.ts";
