import assert from "node:assert/strict";
import {
  containerName,
  dockerBrokerCommand,
  dockerRemoveArgv,
  dockerSighupArgv,
  MOSQUITTO_IMAGE,
  nativeBrokerCommand,
} from "./broker_argv.ts";

const input = {
  configFile: "/p/.dev-env/mosquitto/mosquitto.conf",
  readOnlyDirs: ["/p/config/mosquitto/certs", "/p/.dev-env/mosquitto"],
  writableDirs: ["/p/.dev-env/mosquitto"],
  projectRoot: "/p",
  uid: 1000,
  gid: 1001,
};

Deno.test("docker argv: host network, same paths, read-only config, foreground --rm", () => {
  const c = dockerBrokerCommand(input);
  const name = containerName("/p");
  assert.equal(c.mode, "docker");
  assert.equal(c.cmd, "docker");
  assert.equal(c.container, name);
  assert.deepEqual(c.args, [
    "run",
    "--rm",
    "--name",
    name,
    "--network",
    "host",
    "--user",
    "1000:1001",
    "--volume",
    "/p/.dev-env/mosquitto:/p/.dev-env/mosquitto:rw",
    "--volume",
    "/p/config/mosquitto/certs:/p/config/mosquitto/certs:ro",
    MOSQUITTO_IMAGE,
    "mosquitto",
    "-c",
    "/p/.dev-env/mosquitto/mosquitto.conf",
  ]);
  assert.ok(!c.args.includes("-d"), "the client must stay in the foreground to be supervised");
  assert.equal(MOSQUITTO_IMAGE, "eclipse-mosquitto:2.0");
});

Deno.test("container name depends on the project path only", () => {
  assert.match(containerName("/p"), /^k8s4r-mosquitto-[0-9a-f]{8}$/);
  assert.equal(containerName("/p"), containerName("/p"));
  assert.notEqual(containerName("/p"), containerName("/q"));
});

Deno.test("native argv and docker helper argv", () => {
  assert.deepEqual(nativeBrokerCommand({ ...input, mosquittoPath: "/usr/sbin/mosquitto" }), {
    mode: "native",
    cmd: "/usr/sbin/mosquitto",
    args: ["-c", "/p/.dev-env/mosquitto/mosquitto.conf"],
  });
  assert.deepEqual(dockerSighupArgv("c1"), ["kill", "--signal", "HUP", "c1"]);
  assert.deepEqual(dockerRemoveArgv("c1"), ["rm", "--force", "c1"]);
});
