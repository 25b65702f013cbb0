// The release's preprocessing in the browser, equal to models/preprocess.py bit for bit: resize the short side
// with Pillow's resampling (a port of Pillow's Resample.c: separable convolution, 22-bit fixed point, rounded to
// 8 bits after each pass), centre-crop, scale to [0, 1] as float32 in [3, H, W] order.

const PRECISION_BITS = 22;

const FILTERS = {
  bilinear: { support: 1.0, weight: (x) => { x = Math.abs(x); return x < 1.0 ? 1.0 - x : 0.0; } },
  bicubic: {
    support: 2.0,
    weight: (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    },
  },
  lanczos: {
    support: 3.0,
    weight: (x) => (x >= -3.0 && x < 3.0 ? sinc(x) * sinc(x / 3) : 0.0),
  },
};

function sinc(x) {
  if (x === 0.0) return 1.0;
  x *= Math.PI;
  return Math.sin(x) / x;
}

/** Python's round(): halves go to the even neighbour. */
export function roundHalfEven(x) {
  const floor = Math.floor(x);
  const diff = x - floor;
  if (diff > 0.5) return floor + 1;
  if (diff < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
}

/** Pillow's precompute_coeffs + normalize_coeffs_8bpc: per output pixel, its first input pixel, count, weights. */
function coefficients(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Float64Array(outSize * ksize);
  const ss = 1.0 / filterscale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0.0;
    const k = new Float64Array(xmax);
    for (let x = 0; x < xmax; x++) {
      const w = filter.weight((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) {
      const w = ww !== 0.0 ? k[x] / ww : k[x];
      weights[xx * ksize + x] = w < 0 ? Math.trunc(-0.5 + w * (1 << PRECISION_BITS))
        : Math.trunc(0.5 + w * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { bounds, weights, ksize };
}

function clip8(value) {
  if (value >= 1 << (PRECISION_BITS + 8)) return 255;
  if (value <= 0) return 0;
  return value >> PRECISION_BITS;
}

/** Resize an RGB image (Uint8Array, 3 bytes a pixel, rows top to bottom) as Pillow's Image.resize does. */
export function resizeRGB(rgb, width, height, outWidth, outHeight, interpolation) {
  if (outWidth === width && outHeight === height) return rgb.slice();
  if (interpolation === "nearest") return resizeNearest(rgb, width, height, outWidth, outHeight);
  const filter = FILTERS[interpolation];
  if (!filter) throw new Error(`unknown interpolation ${JSON.stringify(interpolation)}`);
  let src = rgb;
  let rows = height;
  let firstRow = 0;
  const vert = coefficients(height, outHeight, filter);
  if (outWidth !== width) {
    // horizontal pass over the rows the vertical pass reads, as Pillow does
    firstRow = vert.bounds[0];
    const lastRow = vert.bounds[outHeight * 2 - 2] + vert.bounds[outHeight * 2 - 1];
    rows = lastRow - firstRow;
    const { bounds, weights, ksize } = coefficients(width, outWidth, filter);
    const out = new Uint8Array(outWidth * rows * 3);
    const half = 1 << (PRECISION_BITS - 1);
    for (let y = 0; y < rows; y++) {
      const rowIn = (y + firstRow) * width * 3;
      const rowOut = y * outWidth * 3;
      for (let xx = 0; xx < outWidth; xx++) {
        const xmin = bounds[xx * 2];
        const count = bounds[xx * 2 + 1];
        const base = xx * ksize;
        let r = half, g = half, b = half;
        for (let x = 0; x < count; x++) {
          const w = weights[base + x];
          const p = rowIn + (x + xmin) * 3;
          r += src[p] * w;
          g += src[p + 1] * w;
          b += src[p + 2] * w;
        }
        const o = rowOut + xx * 3;
        out[o] = clip8(r);
        out[o + 1] = clip8(g);
        out[o + 2] = clip8(b);
      }
    }
    src = out;
    width = outWidth;
  }
  if (outHeight === height && firstRow === 0 && rows === height) return src;
  const out = new Uint8Array(width * outHeight * 3);
  const half = 1 << (PRECISION_BITS - 1);
  for (let yy = 0; yy < outHeight; yy++) {
    const ymin = vert.bounds[yy * 2] - firstRow;
    const count = vert.bounds[yy * 2 + 1];
    const base = yy * vert.ksize;
    for (let xx = 0; xx < width; xx++) {
      let r = half, g = half, b = half;
      for (let y = 0; y < count; y++) {
        const w = vert.weights[base + y];
        const p = ((y + ymin) * width + xx) * 3;
        r += src[p] * w;
        g += src[p + 1] * w;
        b += src[p + 2] * w;
      }
      const o = (yy * width + xx) * 3;
      out[o] = clip8(r);
      out[o + 1] = clip8(g);
      out[o + 2] = clip8(b);
    }
  }
  return out;
}

/** Pillow's nearest-neighbour resize: the input pixel under each output pixel's centre. */
function resizeNearest(rgb, width, height, outWidth, outHeight) {
  const out = new Uint8Array(outWidth * outHeight * 3);
  const sx = width / outWidth;
  const sy = height / outHeight;
  for (let y = 0; y < outHeight; y++) {
    const yin = Math.min(height - 1, Math.trunc((y + 0.5) * sy));
    for (let x = 0; x < outWidth; x++) {
      const xin = Math.min(width - 1, Math.trunc((x + 0.5) * sx));
      const p = (yin * width + xin) * 3;
      const o = (y * outWidth + x) * 3;
      out[o] = rgb[p];
      out[o + 1] = rgb[p + 1];
      out[o + 2] = rgb[p + 2];
    }
  }
  return out;
}

/** RGBA pixels (canvas ImageData, not premultiplied) -> RGB over white, as Pillow's to_rgb composites alpha. */
export function rgbaToRGB(rgba, width, height) {
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    const a = rgba[i + 3];
    if (a === 255) {
      rgb[j] = rgba[i];
      rgb[j + 1] = rgba[i + 1];
      rgb[j + 2] = rgba[i + 2];
    } else if (a === 0) {
      rgb[j] = rgb[j + 1] = rgb[j + 2] = 255;
    } else {
      // Pillow's AlphaComposite.c over an opaque white background (7-bit fixed point)
      const coef1 = Math.trunc((a * 255 * 255 * 128) / (255 * 255));
      const coef2 = 255 * 128 - coef1;
      for (let c = 0; c < 3; c++) {
        const t = rgba[i + c] * coef1 + 255 * coef2 + (0x80 << 7);
        rgb[j + c] = (((t >> 8) + t) >> 8) >> 7;
      }
    }
  }
  return rgb;
}

/**
 * The model input of one photo: RGB bytes -> Float32Array [3, crop, crop] in [0, 1], per the manifest's
 * `preprocess` ({resize, crop, interpolation, value_range}), exactly as models.preprocess.preprocess.
 */
export function preprocess(rgb, width, height, spec) {
  const { resize, crop } = spec;
  const interpolation = spec.interpolation || "bicubic";
  const range = spec.value_range || [0, 1];
  if (range[0] !== 0 || range[1] !== 1) throw new Error(`value_range must be [0, 1], got ${JSON.stringify(range)}`);
  if (!(crop > 0 && crop <= resize)) throw new Error(`preprocess needs 0 < crop <= resize, got ${crop}, ${resize}`);
  if (!(width > 0 && height > 0)) throw new Error(`the photo has no pixels (${width}x${height})`);
  const scale = resize / Math.min(width, height);
  const newWidth = Math.max(crop, roundHalfEven(width * scale));
  const newHeight = Math.max(crop, roundHalfEven(height * scale));
  const resized = resizeRGB(rgb, width, height, newWidth, newHeight, interpolation);
  const left = Math.floor((newWidth - crop) / 2);
  const top = Math.floor((newHeight - crop) / 2);
  const plane = crop * crop;
  const out = new Float32Array(3 * plane);
  for (let y = 0; y < crop; y++) {
    for (let x = 0; x < crop; x++) {
      const p = ((y + top) * newWidth + x + left) * 3;
      const o = y * crop + x;
      out[o] = resized[p] / 255;
      out[plane + o] = resized[p + 1] / 255;
      out[2 * plane + o] = resized[p + 2] / 255;
    }
  }
  return out;
}
