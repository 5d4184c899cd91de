/**
 * A dynamic import that Deno does not load ahead of time. For every literal
 * `import("./x.ts")`, Deno's module graph reads, transpiles and keeps the module and all it
 * imports when the importing module loads, even if the import never runs. The agent, which
 * runs only its own command, held the whole program's graph that way (the server, devenv,
 * PostgreSQL's `pg`, the embedded SPIRE tools module): ~1.4 MB of private memory
 * (docs/BENCHMARKS.md, agent memory). A computed specifier is resolved only when called.
 *
 * Take the module's types with `typeof import("./x.ts")`, which loads nothing at run time.
 * `deno compile` cannot see these imports either: its task includes `src` (deno.json).
 */
export function importLater<T>(url: URL): Promise<T> {
  return import(url.href);
}
