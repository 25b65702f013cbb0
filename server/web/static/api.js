// The page's calls to the server's /v1 API. Every call carries the API key once the person has given it; on a
// 401 (no key) or 403 (a wrong key) the page asks for it once, keeps it, and repeats the call.

const KEY = "concord.apiKey";
let askKey = null; // set by the page: async (message) => key or null (cancelled)
let asking = null; // one question at a time, whatever number of calls are waiting for it

export function setKeyPrompt(prompt) {
  askKey = prompt;
}

export function storedKey() {
  return sessionStorage.getItem(KEY) || localStorage.getItem(KEY);
}

export function keepKey(key, remember) {
  sessionStorage.setItem(KEY, key);
  if (remember) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
  }
}

async function detailOf(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? body);
  } catch {
    return response.statusText || "no answer";
  }
}

/** Ask for the key after a 401/403; resolves true when a key was given (the call should be repeated). */
export async function needKey(status, detail) {
  if (!askKey) return false;
  if (!asking) {
    const message = status === 403 ? `The server refused the key: ${detail}` : `This server needs its API key.`;
    if (status === 403) forgetKey();
    asking = askKey(message).finally(() => {
      asking = null;
    });
  }
  return Boolean(await asking);
}

function withKey(headers) {
  const key = storedKey();
  const all = new Headers(headers || {});
  if (key) all.set("X-API-Key", key);
  return all;
}

/** fetch() with the API key; asks for the key on 401/403 and retries; returns the Response (ok or not). */
export async function call(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const sentKey = storedKey();
    const response = await fetch(path, { ...options, headers: withKey(options.headers) });
    if ((response.status === 401 || response.status === 403) && attempt < 3) {
      if (storedKey() !== sentKey) continue; // another call got a key meanwhile
      if (await needKey(response.status, await detailOf(response.clone()))) continue;
    }
    return response;
  }
}

/** A call whose answer is JSON; a status >= 400 throws ApiError with the server's detail. */
export async function json(path, options = {}) {
  const response = await call(path, options);
  if (!response.ok) throw new ApiError(response.status, await detailOf(response));
  return response.json();
}

export function postJSON(path, body) {
  return json(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

/** POST a FormData with XMLHttpRequest (fetch cannot report upload progress); onProgress(sentBytes, total). */
export function upload(path, form, onProgress) {
  const once = () => new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    const key = storedKey();
    if (key) xhr.setRequestHeader("X-API-Key", key);
    xhr.responseType = "json";
    xhr.upload.onprogress = (event) => onProgress(event.loaded, event.total);
    xhr.onload = () => resolve({ status: xhr.status, body: xhr.response, key });
    xhr.onerror = () => reject(new ApiError(0, "the upload failed: the server did not answer"));
    xhr.send(form);
  });
  return (async () => {
    for (let attempt = 0; ; attempt++) {
      const { status, body, key } = await once();
      if ((status === 401 || status === 403) && attempt < 3) {
        if (storedKey() !== key) continue;
        if (await needKey(status, body?.detail ?? "")) continue;
      }
      if (status >= 400 || status === 0) throw new ApiError(status, body?.detail ?? `HTTP ${status}`);
      return body;
    }
  })();
}

/** An object URL of a stored photo's bytes (fetched with the key: an <img src> could not send it). */
export async function imageURL(photoId) {
  const response = await call(`/v1/photos/${photoId}/image`);
  if (!response.ok) throw new ApiError(response.status, await detailOf(response));
  return URL.createObjectURL(await response.blob());
}
