// The Concord search page: search with a photo encoded in this browser (or, when the browser cannot run the
// model, by the server), "more like this", the library with uploads, and the release's models and lineage.

import { ApiError, forgetKey, imageURL, json, keepKey, postJSON, setKeyPrompt, storedKey, upload } from "./api.js";
import { BrowserEncoder } from "./encoder.js";
import { probes } from "./probes.js";

const $ = (id) => document.getElementById(id);
const BATCH_FILES = 16;
const BATCH_BYTES = 16 * 1024 * 1024;
const LIBRARY_PAGE = 48;

const state = {
  config: null, models: null, encoder: null, fallbackReason: null,
  query: null, // {kind: "photo", file} | {kind: "similar", photoId}
  library: { offset: 0, total: 0 },
  images: new Map(), // photo id -> object URL
};
let ready;
const readyPromise = new Promise((resolve) => { ready = resolve; });

// ----- small helpers ------------------------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function notice(message, kind = "warn") {
  const box = $("notice");
  box.hidden = !message;
  box.textContent = message || "";
  box.className = `notice ${kind === "error" ? "error" : ""}`;
}

function errorText(err) {
  return err instanceof ApiError ? `the server answered ${err.status}: ${err.detail}` : (err.message || String(err));
}

function setStatus(text, state_) {
  const status = $("encoder-status");
  status.textContent = text;
  status.dataset.state = state_;
}

function photoName(record) {
  const meta = record.metadata || {};
  return meta.filename || meta.path || `photo ${record.id}`;
}

async function showImage(img, photoId) {
  try {
    if (!state.images.has(photoId)) state.images.set(photoId, imageURL(photoId));
    img.src = await state.images.get(photoId);
  } catch (err) {
    state.images.delete(photoId);
    img.alt = `photo ${photoId}: ${errorText(err)}`;
  }
}

// ----- the API key --------------------------------------------------------------------------------------------

function askForKey(message) {
  const dialog = $("key-dialog");
  $("key-message").textContent = message;
  $("key-input").value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const key = $("key-input").value.trim();
      if (dialog.returnValue === "ok" && key) {
        keepKey(key, $("key-remember").checked);
        resolve(key);
      } else {
        resolve(null);
      }
    }, { once: true });
    dialog.showModal();
    $("key-input").focus();
  });
}

// ----- search -------------------------------------------------------------------------------------------------

function searchOptions() {
  return { k: Number($("k").value), match: document.querySelector("input[name=match]:checked").value };
}

async function searchPhoto(file) {
  state.query = { kind: "photo", file };
  const thumb = $("query-thumb");
  if (thumb.src.startsWith("blob:")) URL.revokeObjectURL(thumb.src);
  thumb.src = URL.createObjectURL(file);
  $("query").hidden = false;
  await runQuery();
}

async function runQuery() {
  const query = state.query;
  if (!query) return;
  const { k, match } = searchOptions();
  const info = $("query-info");
  info.textContent = "Searching…";
  $("results").replaceChildren();
  try {
    let answer;
    let how;
    if (query.kind === "similar") {
      answer = await json(`/v1/photos/${query.photoId}/similar?k=${k}&match=${match}`);
      how = `More like photo ${query.photoId}, searched with its own ${answer.query_model} vector.`;
      window.concord.last = { via: "similar", photoId: query.photoId, answer };
    } else {
      let encoded = null;
      if (state.encoder) {
        try {
          encoded = query.encoded || await state.encoder.encode(query.file);
          query.encoded = encoded;
        } catch (err) {
          notice(`This browser could not encode ${query.file.name} (${errorText(err)}); the photo is sent to the ` +
                 `server instead (POST /v1/search/photo).`);
        }
      }
      if (encoded) {
        answer = await postJSON("/v1/search/embedding",
          { vector: Array.from(encoded.vector), model_id: encoded.modelId, k, match });
        how = [el("span", { className: "timing", dataset: { testid: "encode-time" } },
          `${encoded.modelId} (${encoded.variant}) encoded it in this browser in ${encoded.encodeMs.toFixed(1)} ms`),
          ` (+ ${encoded.preprocessMs.toFixed(1)} ms decoding and preprocessing ${encoded.width}×${encoded.height}). ` +
          `Only the ${encoded.vector.length}-d embedding was sent.`];
        window.concord.last = {
          via: "browser", vector: Array.from(encoded.vector), modelId: encoded.modelId, variant: encoded.variant,
          encodeMs: encoded.encodeMs, preprocessMs: encoded.preprocessMs, answer,
        };
      } else {
        const form = new FormData();
        form.append("file", query.file, query.file.name);
        form.append("k", String(k));
        form.append("match", match);
        answer = await json("/v1/search/photo", { method: "POST", body: form });
        how = `The server encoded it with ${answer.query_model}` +
              (state.fallbackReason ? ` (this browser cannot run the model: ${state.fallbackReason}).` : ".");
        window.concord.last = { via: "server", modelId: answer.query_model, answer };
      }
    }
    const searched = answer.searched_models.length ? answer.searched_models.join(", ") : "no gallery model";
    const skipped = Object.keys(answer.skipped_models);
    info.replaceChildren(...[how].flat(), el("br"),
      `${answer.hits.length} ${answer.match} matches; searched the vectors of ${searched}` +
      (skipped.length ? `; skipped ${skipped.join(", ")} (not comparable)` : "") + ".");
    renderHits($("results"), answer.hits);
  } catch (err) {
    info.textContent = `The search failed: ${errorText(err)}`;
    window.concord.last = { via: "error", error: errorText(err) };
  }
  window.concord.searches += 1;
}

function card(record, score) {
  const img = el("img", { alt: photoName(record), loading: "lazy" });
  showImage(img, record.id);
  const more = el("button", { type: "button", dataset: { testid: "more-like-this" } }, "More like this");
  more.addEventListener("click", () => {
    state.query = { kind: "similar", photoId: record.id };
    $("query-thumb").src = img.src;
    $("query").hidden = false;
    showView("search");
    runQuery();
  });
  return el("figure", { className: "card", dataset: { testid: "hit", photoId: String(record.id) } }, img,
    el("figcaption", {},
      el("span", { className: "name", title: photoName(record) }, photoName(record)),
      score === undefined ? null : el("span", { className: "score", dataset: { testid: "score" } },
        `score ${score.toFixed(3)}`),
      el("span", { className: "model", dataset: { testid: "hit-model" } }, `vector by ${record.model_id}`),
      more));
}

function renderHits(box, hits) {
  box.replaceChildren(...hits.map((hit) => card(hit, hit.score)));
  if (!hits.length) box.append(el("p", {}, "No matches: the library may be empty (add photos under Library)."));
}

// ----- library ------------------------------------------------------------------------------------------------

async function loadLibrary(reset = true) {
  if (reset) state.library.offset = 0;
  try {
    const page = await json(`/v1/library?offset=${state.library.offset}&limit=${LIBRARY_PAGE}`);
    state.library.total = page.total;
    const cards = page.photos.map((p) => card(p));
    if (reset) $("library").replaceChildren(...cards);
    else $("library").append(...cards);
    state.library.offset += page.photos.length;
    $("library-count").textContent = page.total === 0 ? "The library is empty: add photos above."
      : `${page.total} photos in the library, newest first.`;
    $("library-more").hidden = state.library.offset >= page.total;
  } catch (err) {
    $("library-count").textContent = `The library could not be read: ${errorText(err)}`;
  }
}

function batches(files) {
  const out = [];
  let batch = [];
  let size = 0;
  for (const file of files) {
    if (batch.length && (batch.length >= BATCH_FILES || size + file.size > BATCH_BYTES)) {
      out.push(batch);
      batch = [];
      size = 0;
    }
    batch.push(file);
    size += file.size;
  }
  if (batch.length) out.push(batch);
  return out;
}

async function uploadFiles(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  const total = files.reduce((sum, f) => sum + f.size, 0) || 1;
  const bar = $("upload-progress");
  const text = $("upload-text");
  $("upload").hidden = false;
  bar.value = 0;
  let doneBytes = 0;
  let doneFiles = 0;
  let added = 0;
  let duplicates = 0;
  const failures = [];
  for (const batch of batches(files)) {
    const batchBytes = batch.reduce((sum, f) => sum + f.size, 0);
    const form = new FormData();
    for (const file of batch) form.append("files", file, file.name);
    form.append("metadata", JSON.stringify(batch.map((f) => ({ filename: f.name }))));
    try {
      const answer = await upload("/v1/photos", form, (loaded, all) => {
        const share = all ? loaded / all : 0;
        bar.value = (doneBytes + share * batchBytes) / total;
        text.textContent = share < 1 ? `Uploading ${doneFiles + batch.length} of ${files.length} photos…`
          : `Indexing ${batch.length} photos on the server…`;
      });
      added += answer.added;
      duplicates += answer.duplicates;
    } catch (err) {
      failures.push(`${batch.map((f) => f.name).join(", ")}: ${errorText(err)}`);
    }
    doneBytes += batchBytes;
    doneFiles += batch.length;
    bar.value = doneBytes / total;
  }
  text.textContent = `${files.length} photo${files.length === 1 ? "" : "s"}: ${added} added, ${duplicates} already in the library` +
    (failures.length ? `; refused: ${failures.join("; ")}` : ".");
  text.dataset.done = "true";
  window.concord.uploads += 1;
  await loadLibrary();
  await loadModels();
}

// ----- models -------------------------------------------------------------------------------------------------

async function loadModels() {
  state.models = await json("/v1/models");
  renderModels();
  return state.models;
}

function renderModels() {
  const models = state.models;
  const page = state.encoder ? state.encoder.modelId : null;
  $("models-table").replaceChildren(...models.models.map((m) => el("tr", { className: m.active ? "active" : "" },
    el("td", {}, m.id, m.active ? el("span", { className: "badge" }, "active: indexes new photos") : null,
      m.id === page ? el("span", { className: "badge page" }, "this page encodes with it") : null),
    el("td", {}, m.role), el("td", {}, String(m.version)),
    el("td", {}, m.parents.length ? m.parents.join(", ") : "—"),
    el("td", {}, (m.searches || []).join(", ")),
    el("td", {}, String(m.gallery_vectors)),
    el("td", {}, `${m.preprocess.crop}×${m.preprocess.crop} ${m.preprocess.interpolation}`))));
  const spaces = models.spaces.map((s) => `${s.id} (${s.dim}-d${s.fingerprint ? ", with a photo fingerprint" : ""})`);
  $("models-summary").textContent = `Release ${models.release || "(unnamed)"}: ${models.models.length} models in ` +
    `${spaces.join(", ")}. ${models.active_model} indexes new photos.`;
  const active = models.models.find((m) => m.id === models.active_model);
  const space = models.spaces.find((s) => active && s.id === active.space);
  const duplicate = document.querySelector("input[value=duplicate]");
  duplicate.disabled = Boolean(space) && !space.matches.includes("duplicate");
  duplicate.closest("label").classList.toggle("disabled", duplicate.disabled);
}

// ----- views and wiring ---------------------------------------------------------------------------------------

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === name);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `${name}-view`;
  if (name === "library" && !$("library").children.length) loadLibrary();
}

function dropZone(zone, input, onFiles) {
  input.addEventListener("change", () => {
    onFiles(input.files);
    input.value = "";
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    onFiles(event.dataTransfer.files);
  });
}

function wire() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  dropZone($("query-drop"), $("query-input"), (files) => files.length && searchPhoto(files[0]));
  dropZone($("library-drop"), $("library-input"), uploadFiles);
  for (const radio of document.querySelectorAll("input[name=match]")) radio.addEventListener("change", runQuery);
  $("k").addEventListener("change", runQuery);
  $("library-more").addEventListener("click", () => loadLibrary(false));
  $("key-button").addEventListener("click", async () => {
    const had = Boolean(storedKey());
    forgetKey();
    await askForKey(had ? "Give the new API key (the one kept here is forgotten)." : "Give this server's API key.");
  });
  setKeyPrompt(askForKey);
}

async function start() {
  window.concord = {
    ready: readyPromise, started: false, startError: null, last: null, searches: 0, uploads: 0,
    ...probes(() => state.encoder, () => state.fallbackReason),
    get encoder() {
      const e = state.encoder;
      return e ? { modelId: e.modelId, variant: e.variant, threads: e.ort.env.wasm.numThreads,
        crossOriginIsolated: self.crossOriginIsolated, ort: state.config.ort.version } : null;
    },
    get fallbackReason() { return state.fallbackReason; },
  };
  wire();
  try {
    state.config = await (await fetch("/web/config.json")).json();
    await loadModels();
  } catch (err) {
    setStatus("The server did not answer", "error");
    notice(`The page cannot start: ${errorText(err)}`, "error");
    window.concord.startError = errorText(err);
    window.concord.started = true;
    ready(false);
    return;
  }
  try {
    state.encoder = await BrowserEncoder.load(state.config, state.models, (text) => setStatus(`${text}…`, "loading"));
    setStatus(`Encoding in this browser: ${state.encoder.modelId} (${state.encoder.variant}), onnxruntime-web ` +
              `${state.config.ort.version} on WebAssembly`, "browser");
  } catch (err) {
    state.fallbackReason = errorText(err);
    setStatus(`Encoding on the server (${state.models.active_model})`, "server");
    notice(`This browser cannot run the model: ${state.fallbackReason}. Searches send the photo to the server ` +
           `(POST /v1/search/photo), which encodes it with ${state.models.active_model}.`);
  }
  renderModels();
  window.concord.started = true;
  ready(true);
}

start();
