/**
 * SPIRE names a join-token agent `spiffe://<td>/spire/agent/join_token/<token>` and prints that
 * ID in its logs. k8s4r keeps join tokens out of every log, so SPIRE's output goes through this
 * filter on its way to the log file.
 */
const JOIN_TOKEN_PATH = /join_token\/[A-Za-z0-9._~-]+/g;
const JOIN_TOKEN_KV = /(join_?[Tt]oken["']?\s*[:=]\s*["']?)[A-Za-z0-9._~-]{8,}/g;

export const REDACTED = "<redacted>";

/** Redacts join tokens from one log line; `known` are token values to remove wherever they are. */
export function redactJoinTokens(line: string, known: string[] = []): string {
  let out = line.replace(JOIN_TOKEN_PATH, `join_token/${REDACTED}`).replace(
    JOIN_TOKEN_KV,
    `$1${REDACTED}`,
  );
  for (const t of known) if (t.length >= 8) out = out.replaceAll(t, REDACTED);
  return out;
}
