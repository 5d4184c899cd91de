/**
 * What a real broker answered, as MQTT 5 reason codes, for the broker tests: PUBACK of one QoS 1
 * publish, SUBACK of one subscription. mqtt.js rejects on a failure code; these return it.
 */
import type { MqttClient } from "mqtt";

/** PUBACK's reason code of one QoS 1 publish (below 0x80: accepted; 0x87: not authorized). */
export async function pubackCode(
  c: MqttClient,
  topic: string,
  payload: string | Uint8Array = "x",
  opts: { retain?: boolean } = {},
): Promise<number> {
  try {
    const p = await c.publishAsync(topic, payload as string, { qos: 1, retain: opts.retain });
    return (p as { reasonCode?: number } | undefined)?.reasonCode ?? 0;
  } catch (err) {
    const code = (err as { code?: number }).code;
    if (typeof code === "number") return code;
    throw err;
  }
}

/** SUBACK's code for one topic (0..2: granted QoS; 0x87: not authorized). */
export async function subackCode(c: MqttClient, topic: string): Promise<number> {
  try {
    const [g] = await c.subscribeAsync(topic, { qos: 1 });
    return Number(g.qos);
  } catch (err) {
    const granted = (err as { packet?: { granted?: number[] } }).packet?.granted;
    if (granted?.length) return granted[0];
    throw err;
  }
}
