/**
 * The few Prometheus HTTP API calls k8s4r needs: readiness, scrape targets and alerts
 * (https://prometheus.io/docs/prometheus/latest/querying/api/). Probes for `waitFor`.
 */

export interface TargetHealth {
  job: string;
  instance: string;
  health: "up" | "down" | "unknown";
  lastError: string;
  labels: Record<string, string>;
}

export interface Alert {
  labels: Record<string, string>;
  annotations: Record<string, string>;
  state: "pending" | "firing" | "inactive";
  activeAt?: string;
  value: string;
}

async function api<T>(base: string, path: string): Promise<T> {
  const res = await fetch(new URL(path, base));
  const body = await res.json() as { status: string; data: T; error?: string };
  if (res.status !== 200 || body.status !== "success") {
    throw new Error(`${path}: HTTP ${res.status}: ${body.error ?? body.status}`);
  }
  return body.data;
}

/** True once Prometheus answers 200 on `/-/ready`. Never throws. */
export async function prometheusReady(base: string): Promise<boolean> {
  try {
    const res = await fetch(new URL("/-/ready", base));
    await res.body?.cancel();
    return res.status === 200;
  } catch {
    return false;
  }
}

/** Active scrape targets with their health. */
export async function prometheusTargets(base: string): Promise<TargetHealth[]> {
  const d = await api<{
    activeTargets: {
      labels: Record<string, string>;
      health: TargetHealth["health"];
      lastError: string;
    }[];
  }>(base, "/api/v1/targets?state=active");
  return d.activeTargets.map((t) => ({
    job: t.labels.job,
    instance: t.labels.instance,
    health: t.health,
    lastError: t.lastError,
    labels: t.labels,
  }));
}

/** Pending and firing alerts. */
export async function prometheusAlerts(base: string): Promise<Alert[]> {
  return (await api<{ alerts: Alert[] }>(base, "/api/v1/alerts")).alerts;
}

export interface RuleGroup {
  name: string;
  /** RFC 3339; "0001-01-01T00:00:00Z" before the first evaluation. */
  lastEvaluation: string;
  rules: { name: string; health: string; lastError?: string; state?: string }[];
}

/** The loaded rule groups, with when each was last evaluated. */
export async function prometheusRuleGroups(base: string): Promise<RuleGroup[]> {
  return (await api<{ groups: RuleGroup[] }>(base, "/api/v1/rules")).groups;
}
