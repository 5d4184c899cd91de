/**
 * The one HCL reader of k8s4r (SPIRE server and agent configs): `planSpireServer` reads the
 * server's settings with it and `k8s4r doctor` checks the committed config with it; the
 * renderers in server.ts and agent.ts write what it reads (round-trip tests in hcl_test.ts).
 *
 * A small, tolerant reader for the subset of HCL that SPIRE configs use: blocks with optional
 * labels (`plugins { DataStore "sql" { plugin_data { ... } } }`), `key = value` attributes with
 * strings, numbers, booleans, bare identifiers, lists and `{ }` objects, and `#`, `//`, `/* *\/`
 * comments. Every block and attribute remembers its line for error messages.
 */

export type HclValue = string | number | boolean | HclValue[] | HclBody;

export interface HclAttr {
  value: HclValue;
  line: number;
}

export interface HclBody {
  attrs: Map<string, HclAttr>;
  blocks: HclBlock[];
}

export interface HclBlock extends HclBody {
  type: string;
  labels: string[];
  line: number;
}

export class HclError extends Error {
  constructor(readonly line: number, message: string) {
    super(`line ${line}: ${message}`);
    this.name = "HclError";
  }
}

type Tok =
  | { k: "id"; v: string; line: number }
  | { k: "str"; v: string; line: number }
  | { k: "num"; v: number; line: number }
  | { k: "p"; v: string; line: number } // punctuation: { } [ ] = , :
  | { k: "nl"; line: number }
  | { k: "eof"; line: number };

function tokenize(src: string): Tok[] {
  const out: Tok[] = [];
  let i = 0;
  let line = 1;
  while (i < src.length) {
    const ch = src[i];
    if (ch === "\n") {
      out.push({ k: "nl", line });
      line++;
      i++;
    } else if (ch === " " || ch === "\t" || ch === "\r") i++;
    else if (ch === "#" || (ch === "/" && src[i + 1] === "/")) {
      while (i < src.length && src[i] !== "\n") i++;
    } else if (ch === "/" && src[i + 1] === "*") {
      const start = line;
      i += 2;
      while (i < src.length && !(src[i] === "*" && src[i + 1] === "/")) {
        if (src[i] === "\n") line++;
        i++;
      }
      if (i >= src.length) throw new HclError(start, "unterminated /* comment");
      i += 2;
    } else if (ch === '"') {
      const start = line;
      let v = "";
      i++;
      while (i < src.length && src[i] !== '"') {
        if (src[i] === "\n") throw new HclError(start, "unterminated string");
        if (src[i] === "\\" && i + 1 < src.length) {
          const e = src[i + 1];
          v += e === "n" ? "\n" : e === "t" ? "\t" : e;
          i += 2;
        } else v += src[i++];
      }
      if (i >= src.length) throw new HclError(start, "unterminated string");
      i++;
      out.push({ k: "str", v, line: start });
    } else if ("{}[]=,:".includes(ch)) {
      out.push({ k: "p", v: ch, line });
      i++;
    } else if (/[0-9-]/.test(ch)) {
      const m = /^-?[0-9]+(\.[0-9]+)?/.exec(src.slice(i));
      if (!m) throw new HclError(line, `unexpected '${ch}'`);
      out.push({ k: "num", v: Number(m[0]), line });
      i += m[0].length;
    } else if (/[A-Za-z_]/.test(ch)) {
      const m = /^[A-Za-z_][A-Za-z0-9_.-]*/.exec(src.slice(i))!;
      out.push({ k: "id", v: m[0], line });
      i += m[0].length;
    } else throw new HclError(line, `unexpected '${ch}'`);
  }
  out.push({ k: "eof", line });
  return out;
}

export function parseHcl(src: string): HclBody {
  const toks = tokenize(src);
  let pos = 0;
  const peek = () => toks[pos];
  const skipNl = () => {
    while (
      toks[pos].k === "nl" || (toks[pos].k === "p" && (toks[pos] as { v: string }).v === ",")
    ) {
      pos++;
    }
  };
  const isP = (t: Tok, v: string) => t.k === "p" && t.v === v;

  function value(): HclValue {
    const t = toks[pos++];
    if (t.k === "str" || t.k === "num") return t.v;
    if (t.k === "id") return t.v === "true" ? true : t.v === "false" ? false : t.v;
    if (isP(t, "[")) {
      const list: HclValue[] = [];
      while (true) {
        skipNl();
        if (isP(peek(), "]")) {
          pos++;
          return list;
        }
        if (peek().k === "eof") throw new HclError(t.line, "unterminated list '['");
        list.push(value());
      }
    }
    if (isP(t, "{")) return body(t.line, true);
    throw new HclError(t.line, `expected a value, got ${describe(t)}`);
  }

  function body(openLine: number, nested: boolean): HclBody {
    const attrs = new Map<string, HclAttr>();
    const blocks: HclBlock[] = [];
    while (true) {
      skipNl();
      const t = peek();
      if (t.k === "eof") {
        if (nested) throw new HclError(openLine, "unclosed '{'");
        return { attrs, blocks };
      }
      if (isP(t, "}")) {
        if (!nested) throw new HclError(t.line, "unexpected '}'");
        pos++;
        return { attrs, blocks };
      }
      if (t.k !== "id" && t.k !== "str") {
        throw new HclError(t.line, `expected a name, got ${describe(t)}`);
      }
      pos++;
      const name = t.v as string;
      const next = peek();
      if (isP(next, "=") || isP(next, ":")) {
        pos++;
        attrs.set(name, { value: value(), line: t.line });
        const end = peek();
        if (end.k !== "nl" && end.k !== "eof" && !isP(end, "}") && !isP(end, ",")) {
          throw new HclError(end.line, `expected end of line after ${name}, got ${describe(end)}`);
        }
        continue;
      }
      const labels: string[] = [];
      while (peek().k === "str" || peek().k === "id") {
        labels.push((toks[pos++] as { v: string }).v);
      }
      const open = peek();
      if (!isP(open, "{")) {
        throw new HclError(open.line, `expected '=' or '{' after ${name}, got ${describe(open)}`);
      }
      pos++;
      const b = body(open.line, true);
      blocks.push({ type: name, labels, line: t.line, ...b });
    }
  }

  return body(1, false);
}

function describe(t: Tok): string {
  switch (t.k) {
    case "eof":
      return "end of file";
    case "nl":
      return "end of line";
    case "str":
      return `"${t.v}"`;
    default:
      return `'${t.v}'`;
  }
}

/** First block of a type (and optional first label). */
export function block(b: HclBody, type: string, label?: string): HclBlock | undefined {
  return b.blocks.find((x) => x.type === type && (label === undefined || x.labels[0] === label));
}

/** A string attribute (numbers are stringified), with its line. */
export function attrString(b: HclBody, key: string): { value: string; line: number } | undefined {
  const a = b.attrs.get(key);
  if (!a) return undefined;
  if (typeof a.value === "string" || typeof a.value === "number" || typeof a.value === "boolean") {
    return { value: String(a.value), line: a.line };
  }
  return undefined;
}
