import assert from "node:assert/strict";
import { renderMosquittoConf } from "./broker_config.ts";
import { isLoopback, listenerOption, parseMosquittoConf } from "./mosquitto_conf.ts";

Deno.test("mosquitto_conf: reads back the listeners and settings renderMosquittoConf writes", () => {
  const text = renderMosquittoConf(
    {
      tlsPort: 18883,
      plainPort: 11883,
      cafile: "/p/ca.crt",
      certfile: "/p/broker.crt",
      keyfile: "/p/broker.key",
      server: { username: "k8s4r-server", password: "pw" },
      runAsUser: "mosq",
    },
    {
      aclFile: "/p/acl",
      passwordFile: "/p/passwd",
      dynsecFile: "/p/dynamic-security.json",
      persistenceDir: "/p/data",
      logFile: "/p/mosquitto.log",
    },
  );
  const conf = parseMosquittoConf(text);
  assert.equal(conf.global.get("per_listener_settings"), undefined);
  assert.equal(conf.global.get("acl_file")?.value, "/p/acl");
  assert.equal(conf.global.get("log_dest")?.value, "file /p/mosquitto.log");
  assert.equal(conf.global.get("persistence_location")?.value, "/p/data/");
  assert.deepEqual(conf.listeners.map((l) => [l.port, l.address]), [
    [18883, "127.0.0.1"],
    [11883, "127.0.0.1"],
  ]);
  const [tls, plain] = conf.listeners;
  const opt = (l: typeof tls, k: string) => listenerOption(conf, l, k)?.value;
  assert.equal(opt(tls, "require_certificate"), "true");
  assert.equal(opt(tls, "use_identity_as_username"), "true");
  assert.equal(opt(tls, "cafile"), "/p/ca.crt");
  assert.equal(opt(tls, "acl_file"), "/p/acl");
  assert.equal(opt(tls, "allow_anonymous"), "false");
  assert.equal(opt(plain, "password_file"), "/p/passwd");
  assert.equal(opt(plain, "allow_anonymous"), "false");
  assert.equal(opt(plain, "require_certificate"), undefined);
  assert.ok(isLoopback(plain.address));
  // Every line it reports points at the text it came from.
  const lines = text.split("\n");
  assert.match(lines[tls.line - 1], /^listener 18883 /);
  assert.match(lines[tls.options.get("keyfile")!.line - 1], /^keyfile \/p\/broker\.key$/);
});

Deno.test("mosquitto_conf: a bad listener line names its line", () => {
  assert.throws(
    () => parseMosquittoConf("# c\nlistener eighty\n"),
    /line 2: listener: expected a port number, got 'eighty'/,
  );
});
