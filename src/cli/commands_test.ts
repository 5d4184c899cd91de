import assert from "node:assert/strict";
import { rootCommand } from "./commands.ts";
import { type CommandSpec, loadCommandPath, renderHelp, resolve } from "./mod.ts";
import { UsageError } from "./errors.ts";

const names = (spec: CommandSpec) => spec.subcommands!.map((c) => c.name);

Deno.test("only the command on argv's path is loaded", async () => {
  const tree = await loadCommandPath(rootCommand, ["agent", "--robot-id", "r1"]);
  const agent = tree.subcommands!.find((c) => c.name === "agent")!;
  assert.equal(agent.load, undefined, "agent is loaded");
  assert.ok(agent.flags?.some((f) => f.name === "robot-id"));
  const lazy = tree.subcommands!.filter((c) => c.load).map((c) => c.name);
  assert.deepEqual(lazy, [
    "server",
    "devenv",
    "doctor",
    "identity",
    "operator",
    "robot",
    "broker",
    "robots",
    "tasks",
    "task",
    "dashboard",
    "ca",
    "backup",
  ]);
  assert.equal(resolve(tree, ["agent", "--robot-id", "r1"]).args.string("robot-id"), "r1");
  // Nested: `identity fetch` loads identity only.
  const t2 = await loadCommandPath(rootCommand, ["identity", "fetch", "--json"]);
  assert.deepEqual(t2.subcommands!.filter((c) => !c.load).map((c) => c.name), ["identity"]);
  assert.equal(resolve(t2, ["identity", "fetch", "--json"]).path.join(" "), "k8s4r identity fetch");
});

Deno.test("root help and unknown commands load every command, with its summary", async () => {
  for (const argv of [[], ["--help"], ["agnt"]]) {
    const tree = await loadCommandPath(rootCommand, argv);
    assert.deepEqual(names(tree), names(rootCommand));
    for (const c of tree.subcommands!) {
      assert.equal(c.load, undefined, c.name);
      assert.ok(c.summary.length > 10, `${c.name} has a summary`);
    }
  }
  const tree = await loadCommandPath(rootCommand, []);
  const help = renderHelp(tree, ["k8s4r"]);
  assert.match(help, /\n {2}agent +Run the robot agent/);
  assert.throws(
    () => resolve(tree, ["agnt"]),
    (e: unknown) => e instanceof UsageError && /did you mean 'agent'/.test(e.message),
  );
});

Deno.test("a lazy command must load the spec it names", async () => {
  const root: CommandSpec = {
    name: "x",
    summary: "x",
    subcommands: [{
      name: "a",
      summary: "",
      load: () => Promise.resolve({ name: "b", summary: "b" }),
    }],
  };
  await assert.rejects(loadCommandPath(root, ["a"]), /lazy command 'a' loaded a spec named 'b'/);
});

Deno.test("no production module imports @grpc/grpc-js (a test-only dependency)", async () => {
  const main = new URL("../../main.ts", import.meta.url).pathname;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["info", "--json", main],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  const info = JSON.parse(new TextDecoder().decode(out.stdout)) as {
    modules: { specifier: string; dependencies?: { specifier: string }[] }[];
  };
  const local = info.modules.filter((m) => m.specifier.startsWith("file:"));
  // Positive control: the graph does reach the agent and the Workload API client.
  assert.ok(local.some((m) => m.specifier.endsWith("/src/agent/command.ts")));
  assert.ok(local.some((m) => m.specifier.endsWith("/src/spiffe/workload/grpc.ts")));
  const grpcUsers = local.filter((m) =>
    m.dependencies?.some((d) => /(^|:)@grpc\/grpc-js/.test(d.specifier))
  ).map((m) => m.specifier);
  assert.deepEqual(grpcUsers, []);
});
