/** The k8s4r release, printed by `k8s4r --version` and sent by agents when they register. */
export const VERSION = "0.1.0";

/** The SPIRE release k8s4r is built and tested against. */
export const SPIRE_VERSION = "1.13.3";
