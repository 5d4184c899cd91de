/**
 * The alert rules (config/prometheus/alerts.yaml) through promtool: `check rules` and the rule
 * unit tests in alerts_test.yaml. Mutation controls show that the unit tests can fail: with any
 * rule made to never fire, or to always fire, `promtool test rules` must fail, so every rule
 * has a case that fires and a case that must not.
 */
import assert from "node:assert/strict";
import { parse, stringify } from "yaml";
import { realRunner } from "../process/mod.ts";
import { checkRules, promtoolBin, testRules } from "./promtool.ts";
import { ALERTS_FILE, JOBS } from "./prometheus_config.ts";

const DIR = new URL("../../config/prometheus/", import.meta.url).pathname;
const RULES = `${DIR}alerts.yaml`;
const TESTS = `${DIR}alerts_test.yaml`;
const bin = promtoolBin(Deno.env.toObject());

interface Rule {
  alert: string;
  expr: string;
}
interface RulesDoc {
  groups: { name: string; rules: Rule[] }[];
}

const EXPECTED = [
  "K8s4rRobotOffline",
  "K8s4rSvidNotRotated",
  "K8s4rTrustBundleExpiring",
  "K8s4rHeartbeatLoss",
  "K8s4rWorkloadApiUnavailable",
  "K8s4rSpireServerDown",
  "K8s4rBrokerDown",
  "K8s4rFleetServerCannotWrite",
  "K8s4rFleetServerDown",
];

function rules(doc: RulesDoc): Rule[] {
  return doc.groups.flatMap((g) => g.rules);
}

Deno.test("alert rules: promtool check rules passes, and the file has every rule the issue asks for", async () => {
  assert.equal(ALERTS_FILE, "config/prometheus/alerts.yaml");
  const r = await checkRules(realRunner, [RULES], bin);
  assert.ok(r.ok, r.output);
  assert.match(r.output, /SUCCESS: 9 rules found/);
  const doc = parse(await Deno.readTextFile(RULES)) as RulesDoc;
  assert.deepEqual(rules(doc).map((x) => x.alert), EXPECTED);
  // The job names the rules select are the ones the Prometheus config renders.
  const text = await Deno.readTextFile(RULES);
  for (const job of text.matchAll(/job="([^"]+)"/g)) {
    assert.ok((Object.values(JOBS) as string[]).includes(job[1]), `unknown job ${job[1]}`);
  }
});

Deno.test("alert rules: promtool test rules passes (a firing and a not-firing case per rule)", async () => {
  const r = await testRules(realRunner, [TESTS], bin);
  assert.ok(r.ok, r.output);
  assert.match(r.output, /SUCCESS/);
  // Every rule is exercised by name.
  const tests = parse(await Deno.readTextFile(TESTS)) as {
    tests: { alert_rule_test: { alertname: string; exp_alerts: unknown[] }[] }[];
  };
  for (const name of EXPECTED) {
    const cases = tests.tests.flatMap((t) => t.alert_rule_test).filter((c) => c.alertname === name);
    assert.ok(cases.some((c) => c.exp_alerts.length > 0), `${name}: no firing case`);
    assert.ok(cases.some((c) => c.exp_alerts.length === 0), `${name}: no not-firing case`);
  }
});

Deno.test("alert rules: the unit tests fail when any rule never fires or always fires", async () => {
  const original = parse(await Deno.readTextFile(RULES)) as RulesDoc;
  const testsText = await Deno.readTextFile(TESTS);
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-alerts-" });
  try {
    const mutations: [string, string][] = [
      ["never fires", "k8s4r_no_such_metric == 1"],
      ["always fires", "absent(k8s4r_no_such_metric)"],
    ];
    const jobs = EXPECTED.flatMap((name) => mutations.map(([how, expr]) => ({ name, how, expr })));
    // Each mutant in its own directory; three promtool runs at a time.
    const runOne = async (j: typeof jobs[number], i: number) => {
      const d = `${dir}/${i}`;
      await Deno.mkdir(d);
      await Deno.writeTextFile(`${d}/alerts_test.yaml`, testsText);
      const doc = structuredClone(original);
      rules(doc).find((x) => x.alert === j.name)!.expr = j.expr;
      await Deno.writeTextFile(`${d}/alerts.yaml`, stringify(doc));
      const r = await testRules(realRunner, [`${d}/alerts_test.yaml`], bin);
      assert.equal(r.ok, false, `${j.name} ${j.how}: promtool test rules still passed`);
      assert.match(r.output, new RegExp(`alertname: ${j.name}`), `${j.name} ${j.how}: ${r.output}`);
    };
    let next = 0;
    await Promise.all(
      Array.from({ length: 3 }, async () => {
        while (next < jobs.length) {
          const i = next++;
          await runOne(jobs[i], i);
        }
      }),
    );
    await Deno.writeTextFile(`${dir}/alerts_test.yaml`, testsText);
    // Positive control: the unmodified rules, written the same way, pass.
    await Deno.writeTextFile(`${dir}/alerts.yaml`, stringify(original));
    const ok = await testRules(realRunner, [`${dir}/alerts_test.yaml`], bin);
    assert.ok(ok.ok, ok.output);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
