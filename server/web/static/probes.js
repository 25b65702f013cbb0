// What `concord web-bench` and the browser tests call through window.concord: the page's encoder, preprocessing
// and decoding applied to given bytes (base64), so that they can be timed and compared with Python's.
import { decode } from "./encoder.js";
import { preprocess } from "./preprocess.js";

const fromBase64 = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));

/** The probes over the page's encoder (`encoder()` returns it, or null with `fallbackReason()` saying why). */
export function probes(encoder, fallbackReason) {
  /** Encode one photo `n` times: timings and the last embedding. */
  async function timeEncodes(base64, n = 1) {
    const model = encoder();
    if (!model) throw new Error(`no in-browser encoder: ${fallbackReason()}`);
    const blob = new Blob([fromBase64(base64)]);
    const runs = [];
    let last = null;
    for (let i = 0; i < n; i++) {
      last = await model.encode(blob);
      runs.push({ encodeMs: last.encodeMs, preprocessMs: last.preprocessMs, totalMs: last.totalMs });
    }
    return { modelId: last.modelId, variant: last.variant, vector: Array.from(last.vector), runs };
  }

  /** The model input the page makes of RGB bytes: to compare with models.preprocess. */
  async function preprocessRGB(base64, width, height) {
    return Array.from(preprocess(fromBase64(base64), width, height, encoder().info.preprocess));
  }

  /** The RGB bytes (base64) the browser decodes a photo into. */
  async function decodePhoto(base64) {
    const { rgb, width, height } = await decode(new Blob([fromBase64(base64)]));
    let text = "";
    for (let i = 0; i < rgb.length; i += 0x8000) text += String.fromCharCode(...rgb.subarray(i, i + 0x8000));
    return { rgb: btoa(text), width, height };
  }

  return { timeEncodes, preprocessRGB, decodePhoto };
}
