// The in-browser encoder: onnxruntime-web (WebAssembly backend only) runs the release's edge model, on the photo
// preprocessed as the manifest says. The model file comes from this server, sha256-verified there.

import { ApiError, call, json } from "./api.js";
import { preprocess, rgbaToRGB } from "./preprocess.js";

const MAX_PIXELS = 40_000_000; // as the server's decompression-bomb guard (models/preprocess.py)
const VARIANTS = ["device-int8", "device-fp32", "server"]; // preferred first: the int8 file is what phones run

/** The edge model the page runs: the newest edge model of the active model's space, by version. */
export function chooseModel(models) {
  const active = models.models.find((m) => m.id === models.active_model);
  const edges = models.models.filter((m) => m.role === "edge" && (!active || m.space === active.space));
  edges.sort((a, b) => b.version - a.version || a.id.localeCompare(b.id));
  return edges[0] || null;
}

/** Decode a photo (File or Blob) to RGB bytes, upright by its EXIF orientation, with no colour management. */
export async function decode(blob) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, {
      colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image",
    });
  } catch (err) {
    throw new Error(`this browser cannot decode the photo (${err.message || err})`);
  }
  const { width, height } = bitmap;
  if (width * height > MAX_PIXELS) {
    bitmap.close();
    throw new Error(`${width}x${height} is above the limit of ${MAX_PIXELS.toLocaleString()} pixels`);
  }
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  const { data } = context.getImageData(0, 0, width, height);
  return { rgb: rgbaToRGB(data, width, height), width, height };
}

export class BrowserEncoder {
  constructor(ort, session, info, variant) {
    this.ort = ort;
    this.session = session;
    this.info = info; // GET /v1/models/{id}/files
    this.variant = variant;
    this.modelId = info.model_id;
  }

  /** Load onnxruntime-web and the edge model's file; throws an Error saying why the browser cannot. */
  static async load(config, models, onStatus = () => {}) {
    if (!config.ort.available) throw new Error(config.ort.hint);
    if (typeof WebAssembly !== "object") throw new Error("this browser has no WebAssembly");
    const model = chooseModel(models);
    if (!model) throw new Error("the release has no edge model to run in the browser");
    onStatus(`loading onnxruntime-web ${config.ort.version || ""}`);
    let ort;
    try {
      ort = await import(new URL(config.ort.module, location.href).href);
    } catch (err) {
      throw new Error(`onnxruntime-web did not load (${err.message || err}): ${config.ort.hint || ""}`);
    }
    ort.env.wasm.wasmPaths = new URL(config.ort.wasm_paths, location.href).href; // this server, never a CDN
    ort.env.wasm.proxy = false;
    ort.env.logLevel = "error";
    const info = await json(`/v1/models/${encodeURIComponent(model.id)}/files`);
    const file = VARIANTS.map((v) => info.files.find((f) => f.variant === v)).find(Boolean);
    if (!file) throw new Error(`model ${model.id} has no file the browser can run`);
    onStatus(`fetching ${model.id} ${file.variant} (${(file.bytes / 1e6).toFixed(1)} MB)`);
    const response = await call(file.url);
    if (!response.ok) throw new ApiError(response.status, (await response.json()).detail);
    const bytes = new Uint8Array(await response.arrayBuffer());
    onStatus(`starting ${model.id} on WebAssembly`);
    let session;
    try {
      session = await ort.InferenceSession.create(bytes, {
        executionProviders: ["wasm"], graphOptimizationLevel: "all",
      });
    } catch (err) {
      throw new Error(`onnxruntime-web cannot run ${file.file} (${err.message || err})`);
    }
    const encoder = new BrowserEncoder(ort, session, info, file.variant);
    await encoder.runArray(new Float32Array(3 * info.preprocess.crop * info.preprocess.crop)); // warm up
    return encoder;
  }

  /** Run the model on one preprocessed photo; returns the embedding (Float32Array [dim]). */
  async runArray(array) {
    const crop = this.info.preprocess.crop;
    const tensor = new this.ort.Tensor("float32", array, [1, 3, crop, crop]);
    const outputs = await this.session.run({ [this.info.input]: tensor });
    const vector = outputs[this.info.output].data;
    if (vector.length !== this.info.dim) {
      throw new Error(`${this.modelId} returned ${vector.length} values, the manifest says dim ${this.info.dim}`);
    }
    return Float32Array.from(vector);
  }

  /** Photo (File/Blob) -> embedding, with the time of decoding + preprocessing and of the model itself. */
  async encode(blob) {
    const start = performance.now();
    const { rgb, width, height } = await decode(blob);
    const array = preprocess(rgb, width, height, this.info.preprocess);
    const ran = performance.now();
    const vector = await this.runArray(array);
    const done = performance.now();
    return {
      vector, modelId: this.modelId, variant: this.variant, width, height,
      encodeMs: done - ran, preprocessMs: ran - start, totalMs: done - start,
    };
  }
}
