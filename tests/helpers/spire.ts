import { bufferIo } from "../../src/cli/io.ts";
import { realRunner } from "../../src/process/mod.ts";
import { findSpireBinaries } from "../../src/spire/binaries.ts";

/**
 * The provisioned SPIRE v1.13.3 binaries, found the way k8s4r finds them. A test that needs real
 * SPIRE fails here, saying how to provision it, instead of skipping.
 */
export async function spireBinaries(): Promise<{ server: string; agent: string }> {
  const io = bufferIo({ env: Deno.env.toObject(), runner: realRunner });
  const bins = await findSpireBinaries(io);
  if (!bins) {
    throw new Error(
      "SPIRE 1.13.3 binaries are not provisioned (K8S4R_SPIRE_BIN_DIR, ~/.cache/k8s4r/spire/1.13.3/bin, PATH): run `k8s4r devenv install`",
    );
  }
  return bins;
}
