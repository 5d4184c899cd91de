/**
 * Who may do what on the fleet server's HTTP API: the roles config, deny by default.
 *
 * The file (YAML, default /etc/k8s4r/roles.yaml; devenv passes its own with `--roles`):
 *
 *   # metrics: only /metrics. viewer: read robots and tasks. operator: also create and cancel.
 *   operators:
 *     admin: operator
 *     alice:
 *       role: viewer
 *       issuedAfter: 2026-12-01T10:00:00.000Z
 *     prometheus: metrics
 *
 * `issuedAfter` (written by `k8s4r operator add|login`: the notBefore of the certificate they
 * minted) is how an operator's older certificates are revoked: a certificate of alice issued
 * before it is refused (403 `superseded-certificate`), although it chains to the bundle and
 * has not expired. (Certificates carry whole seconds: one minted in the same second as the
 * new one is not told apart.)
 *
 * Keys are operator names: the caller `spiffe://<td>/operator/<name>` has the role listed under
 * its name. An operator that is not listed, any other SPIFFE ID (a robot, the broker), and
 * everyone while the file is missing or invalid, is refused (403).
 *
 * The server reads the file again whenever it changed (checked by `stat` on every request:
 * inode, size, mtime), so `k8s4r operator add|remove` take effect on the next request, without
 * a restart. Errors name `file:line: key: what was expected`. `k8s4r operator add|remove` edit it
 * through the same YAML library (comments and order are kept) and replace it atomically.
 */
import { isMap, isScalar, LineCounter, parseDocument, type Scalar, type YAMLMap } from "yaml";
import type { Document, Node } from "yaml";
import { ConfigError } from "../cli/errors.ts";
import { isOperatorName } from "../fleet/ids.ts";
import { writeFileAtomic } from "../fs/atomic.ts";
import { withFileLock } from "../fs/lock.ts";

/**
 * `metrics` is for a scraper (Prometheus): its key sits in a monitoring system's config, so it
 * reads `/metrics` (counts, states, timings) and nothing of the tasks (their env, their output).
 */
export const ROLES = ["metrics", "viewer", "operator"] as const;

const RFC3339 = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/;
export type Role = typeof ROLES[number];

/** What a request needs: `metrics` (/metrics), `read` (GET, HEAD) or `write` (create, cancel). */
export type Permission = "metrics" | "read" | "write";

const GRANTS: Record<Role, readonly Permission[]> = {
  metrics: ["metrics"],
  viewer: ["metrics", "read"],
  operator: ["metrics", "read", "write"],
};

export function isRole(s: unknown): s is Role {
  return typeof s === "string" && (ROLES as readonly string[]).includes(s);
}

/** True when `role` grants `perm`. */
export function allows(role: Role, perm: Permission): boolean {
  return GRANTS[role]?.includes(perm) ?? false;
}

export const ROLES_FILE_HEADER =
  `# Roles of the k8s4r fleet server's operators (deny by default: an operator not listed
# here is refused). metrics: only /metrics (a scraper). viewer: read robots and tasks.
# operator: also create and cancel tasks.
# Edited by 'k8s4r operator add|remove'; the server re-reads it on change, no restart needed.
`;

export interface RolesConfig {
  file: string;
  operators: Map<string, Role>;
  /** Certificates of an operator issued (notBefore) before this are refused (none: no limit). */
  issuedAfter?: Map<string, Date>;
}

function describeNode(node: unknown): string {
  if (isScalar(node)) {
    const v = node.value;
    if (v === null) return "nothing";
    return typeof v === "string" ? JSON.stringify(v) : String(v);
  }
  if (isMap(node)) return "a mapping";
  return "a list";
}

function parse(text: string, file: string): { doc: Document; config: RolesConfig } {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false, uniqueKeys: true });
  const lineOf = (node: unknown): number | undefined => {
    const range = (node as { range?: [number, number, number] } | null | undefined)?.range;
    return range ? lineCounter.linePos(range[0]).line : undefined;
  };
  if (doc.errors.length > 0) {
    const e = doc.errors[0];
    const line = e.linePos?.[0]?.line ?? lineCounter.linePos(e.pos[0]).line;
    throw new ConfigError(file, line, undefined, `invalid YAML: ${e.message.split("\n")[0]}`);
  }
  const operators = new Map<string, Role>();
  const issuedAfter = new Map<string, Date>();
  const config = { file, operators, issuedAfter };
  const root = doc.contents;
  if (root === null || (isScalar(root) && root.value === null)) return { doc, config };
  if (!isMap(root)) {
    throw new ConfigError(
      file,
      lineOf(root),
      undefined,
      `expected a mapping with the key operators, got ${describeNode(root)}`,
    );
  }
  for (const pair of (root as YAMLMap<unknown, unknown>).items) {
    const k = pair.key as Scalar | null;
    const key = String(isScalar(k) ? k.value : k);
    if (key !== "operators") {
      throw new ConfigError(file, lineOf(k), key, "unknown key; expected operators");
    }
    const value = pair.value as Node | null;
    if (value === null || (isScalar(value) && value.value === null)) continue;
    if (!isMap(value)) {
      throw new ConfigError(
        file,
        lineOf(value) ?? lineOf(k),
        "operators",
        `expected a mapping of operator name to role (${ROLES.join(" or ")}), got ${
          describeNode(value)
        }`,
      );
    }
    for (const item of (value as YAMLMap<unknown, unknown>).items) {
      const nk = item.key as Scalar | null;
      const name = isScalar(nk) ? nk.value : nk;
      const line = lineOf(nk);
      if (!isOperatorName(name)) {
        throw new ConfigError(
          file,
          line,
          `operators.${String(name)}`,
          "expected an operator name matching [a-z0-9][a-z0-9._-]{0,62}",
        );
      }
      let v = item.value as Node | null;
      if (isMap(v)) {
        // The long form: { role, issuedAfter }.
        let roleNode: Node | null = null;
        for (const f of (v as YAMLMap<unknown, unknown>).items) {
          const fk = f.key as Scalar | null;
          const field = String(isScalar(fk) ? fk.value : fk);
          const fv = f.value as Node | null;
          if (field === "role") roleNode = fv;
          else if (field === "issuedAfter") {
            const t = isScalar(fv) ? fv.value : undefined;
            const ms = typeof t === "string" && RFC3339.test(t) ? Date.parse(t) : NaN;
            if (!Number.isFinite(ms)) {
              throw new ConfigError(
                file,
                lineOf(fv) ?? lineOf(fk),
                `operators.${name}.issuedAfter`,
                `expected an RFC 3339 time like 2026-12-01T10:00:00Z, got ${describeNode(fv)}`,
              );
            }
            issuedAfter.set(name, new Date(ms));
          } else {
            throw new ConfigError(
              file,
              lineOf(fk),
              `operators.${name}.${field}`,
              "unknown key; expected role, issuedAfter",
            );
          }
        }
        if (roleNode === null) {
          throw new ConfigError(file, lineOf(v) ?? line, `operators.${name}.role`, "missing");
        }
        v = roleNode;
      }
      const role = isScalar(v) ? v.value : undefined;
      if (!isRole(role)) {
        throw new ConfigError(
          file,
          lineOf(v) ?? line,
          `operators.${name}`,
          `expected a role, one of ${ROLES.join(", ")}, got ${describeNode(v)}`,
        );
      }
      operators.set(name, role);
    }
  }
  return { doc, config };
}

/** Parses the roles YAML; throws ConfigError naming file, line and key. */
export function parseRolesYaml(text: string, file: string): RolesConfig {
  return parse(text, file).config;
}

/** What the server knows about the roles right now. */
export type RolesState =
  | { ok: true; config: RolesConfig; missing: boolean }
  | { ok: false; error: string };

/** Anything that answers "what role has this operator?" (the file, or a fixed map in tests). */
export interface RolesSource {
  current(): RolesState;
}

/** A fixed set of roles (tests, and `--roles` of nothing). */
export function staticRoles(entries: Record<string, Role>): RolesSource {
  const config: RolesConfig = {
    file: "<static>",
    operators: new Map(Object.entries(entries)),
    issuedAfter: new Map(),
  };
  return { current: () => ({ ok: true, config, missing: false }) };
}

/**
 * The roles file, re-read whenever it changed. A missing file means nobody has a role yet; an
 * unreadable or invalid one means nobody is authorized until it is fixed (never the last good
 * version: a `remove` must not be undone by a typo).
 */
export class RolesFile implements RolesSource {
  #stamp = "";
  #state: RolesState = { ok: false, error: "not read yet" };
  /** Called when the state changes (for the server's log). */
  onChange?: (state: RolesState) => void;

  constructor(readonly path: string) {}

  current(): RolesState {
    let stamp: string;
    try {
      const st = Deno.statSync(this.path);
      stamp = `${st.ino}:${st.size}:${st.mtime?.getTime()}:${st.ctime?.getTime()}`;
    } catch (err) {
      if (err instanceof Deno.errors.NotFound) {
        stamp = "missing";
      } else {
        return this.set("error", {
          ok: false,
          error: `${this.path}: cannot read the roles config: ${(err as Error).message}`,
        });
      }
    }
    if (stamp === this.#stamp) return this.#state;
    if (stamp === "missing") {
      return this.set(stamp, {
        ok: true,
        config: { file: this.path, operators: new Map(), issuedAfter: new Map() },
        missing: true,
      });
    }
    try {
      const text = Deno.readTextFileSync(this.path);
      return this.set(stamp, { ok: true, config: parseRolesYaml(text, this.path), missing: false });
    } catch (err) {
      const msg = err instanceof ConfigError
        ? err.message
        : `${this.path}: cannot read the roles config: ${(err as Error).message}`;
      return this.set(stamp, { ok: false, error: msg });
    }
  }

  private set(stamp: string, state: RolesState): RolesState {
    const changed = JSON.stringify(describeState(state)) !==
      JSON.stringify(describeState(this.#state));
    this.#stamp = stamp;
    this.#state = state;
    if (changed) {
      try {
        this.onChange?.(state);
      } catch { /* a logger must not break a request */ }
    }
    return state;
  }
}

function describeState(s: RolesState): unknown {
  return s.ok ? { missing: s.missing, ops: [...s.config.operators] } : { error: s.error };
}

// ---------------------------------------------------------------------------------------------
// Editing (k8s4r operator add|remove)

async function readOrEmpty(path: string): Promise<{ text: string; mode?: number }> {
  try {
    const text = await Deno.readTextFile(path);
    const st = await Deno.stat(path);
    return { text, mode: st.mode !== null ? st.mode & 0o777 : undefined };
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return { text: ROLES_FILE_HEADER + "operators:\n" };
    throw new ConfigError(path, undefined, undefined, `cannot read: ${(err as Error).message}`);
  }
}

/** Replaces `path` atomically (the project's writer: fsync, rename, fsync of the directory). */
function replaceFile(path: string, text: string, mode = 0o644): Promise<void> {
  return writeFileAtomic(path, text, mode, 0o755);
}

/**
 * Sets `name`'s role in the roles file (creating it with a header when missing), and with
 * `issuedAfter` the time before which its certificates are refused (an existing one is kept
 * when none is given). A file that does not parse is left alone: the ConfigError says where it
 * is broken.
 */
export async function setOperatorRole(
  path: string,
  name: string,
  role: Role,
  opts: { issuedAfter?: Date } = {},
): Promise<void> {
  if (!isOperatorName(name)) throw new Error(`invalid operator name ${JSON.stringify(name)}`);
  // Read, edit and replace under one lock: two operators' commands at once lose nothing.
  await withFileLock(path, async () => {
    const { text, mode } = await readOrEmpty(path);
    let { doc, config } = parse(text, path);
    if (doc.contents === null || (isScalar(doc.contents) && doc.contents.value === null)) {
      // Empty, or comments only: keep them, add the key.
      doc = parse(`${text}${text === "" || text.endsWith("\n") ? "" : "\n"}operators:\n`, path)
        .doc;
    }
    const after = opts.issuedAfter ?? config.issuedAfter?.get(name);
    const value = after ? { role, issuedAfter: after.toISOString() } : role;
    if (isMap(doc.get("operators"))) doc.setIn(["operators", name], doc.createNode(value));
    else doc.set("operators", doc.createNode({ [name]: value }));
    await replaceFile(path, String(doc), mode);
  }, { dirMode: 0o755 });
}

/**
 * Sets the time before which `name`'s certificates are refused (`operator login` after it
 * minted a new one), keeping its role. Returns false when it is not listed (or no file).
 */
export async function setOperatorIssuedAfter(
  path: string,
  name: string,
  issuedAfter: Date,
): Promise<boolean> {
  return await withFileLock(path, async () => {
    const { text, mode } = await readOrEmpty(path);
    const { doc, config } = parse(text, path);
    const role = config.operators.get(name);
    if (!role) return false;
    doc.setIn(
      ["operators", name],
      doc.createNode({ role, issuedAfter: issuedAfter.toISOString() }),
    );
    await replaceFile(path, String(doc), mode);
    return true;
  }, { dirMode: 0o755 });
}

/** Removes `name` from the roles file. Returns false when it was not listed (or no file). */
export async function removeOperatorRole(path: string, name: string): Promise<boolean> {
  try {
    await Deno.stat(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return false;
    throw new ConfigError(path, undefined, undefined, `cannot read: ${(err as Error).message}`);
  }
  return await withFileLock(path, async () => {
    let text: string;
    let mode: number | undefined;
    try {
      text = await Deno.readTextFile(path);
      const st = await Deno.stat(path);
      mode = st.mode !== null ? st.mode & 0o777 : undefined;
    } catch (err) {
      if (err instanceof Deno.errors.NotFound) return false;
      throw new ConfigError(path, undefined, undefined, `cannot read: ${(err as Error).message}`);
    }
    const { doc, config } = parse(text, path);
    if (!config.operators.has(name)) return false;
    doc.deleteIn(["operators", name]);
    await replaceFile(path, String(doc), mode);
    return true;
  }, { dirMode: 0o755 });
}

/** The roles of the file, for `operator list` (empty when there is no file). */
export async function readRolesFile(path: string): Promise<RolesConfig> {
  try {
    return parseRolesYaml(await Deno.readTextFile(path), path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      return { file: path, operators: new Map(), issuedAfter: new Map() };
    }
    if (err instanceof ConfigError) throw err;
    throw new ConfigError(path, undefined, undefined, `cannot read: ${(err as Error).message}`);
  }
}
