// The playground: a small client of the public REST API (README_BACKEND.md, "The API").
// Everything here goes through /api/ with the same requests a frontend of your own would make:
// POST /api/<kind>/ with "async": true, then the job's event stream (or polling), the paginated
// history, cancel, delete. No framework and no build step.

const KEY_STORAGE = "sdapi.playground.apiKey";
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const NUMERIC_FIELDS = ["width", "height", "steps", "guidance_scale", "seed", "num_images"];
const POLL_MS = 500;

const root = document.documentElement;
const AUTH_REQUIRED = root.dataset.authRequired === "true";
const SCHEDULERS = (root.dataset.schedulers || "").split(/\s+/).filter(Boolean);

const $ = (id) => document.getElementById(id);

const state = {
  apiKey: loadKey(),
  models: new Map(),
  loras: [],
  job: null, // {id, abort: AbortController}
  page: 1,
  detail: null, // the generation shown in the dialog
  detailOpener: null,
  sourceUrl: null, // object URL of the uploaded input image
  shownJobId: null, // the generation whose images the gallery shows
};

// --- the API key ----------------------------------------------------------------------------

function loadKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled: the key lives for this page only
  }
}

function storeKey(value) {
  state.apiKey = value;
  try {
    if (value) localStorage.setItem(KEY_STORAGE, value);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled */
  }
}

function authHeaders(extra = {}) {
  return state.apiKey ? { ...extra, Authorization: `Bearer ${state.apiKey}` } : { ...extra };
}

// --- requests -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `The server answered ${status}.`);
    this.status = status;
    this.code = error.code || `http_${status}`;
    this.fields = error.fields || {};
  }
}

async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, headers: authHeaders({ Accept: "application/json" }), signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { error: { code: "network_error", message: "The server could not be reached." } });
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401) showKeyProblem(error.message);
    throw error;
  }
  return data;
}

// --- server-sent events over fetch() ---------------------------------------------------------
// EventSource can't send an Authorization header, so the stream is read with fetch() and parsed
// here (the format is the HTML standard's: "field: value" lines, a blank line ends an event).

async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { type: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) yield { type: event.type, id: event.id, data: event.data.join("\n") };
        event = { type: "message", data: [], id: null };
        continue;
      }
      if (line.startsWith(":")) continue; // a ping
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      let text = colon === -1 ? "" : line.slice(colon + 1);
      if (text.startsWith(" ")) text = text.slice(1);
      if (field === "event") event.type = text;
      else if (field === "data") event.data.push(text);
      else if (field === "id") event.id = text;
    }
  }
}

// Follows a job to its end over its event stream; null when the stream is unavailable or ends
// early, so the caller polls instead.
async function streamJob(id, signal) {
  let response;
  try {
    response = await fetch(`/api/results/${id}/events/`, {
      headers: authHeaders({ Accept: "text/event-stream" }),
      signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    return null;
  }
  if (!response.ok || !response.body) return null;
  try {
    for await (const event of readEvents(response)) {
      const data = JSON.parse(event.data);
      if (event.type === "queued") showQueued(data.queue_position);
      else if (event.type === "started") showRunning();
      else if (event.type === "progress") showProgress(data.step, data.total_steps, data.eta_s, data.preview);
      else if (event.type === "completed") return data;
      else if (event.type === "failed" || event.type === "cancelled") {
        return { id, status: data.status || event.type, error: data.error, images: [] };
      }
    }
  } catch (err) {
    if (err.name === "AbortError") throw err;
  }
  return null;
}

async function pollJob(id, signal) {
  for (;;) {
    const job = await api(`/api/results/${id}/`, { signal });
    if (FINISHED.has(job.status)) return job;
    const progress = job.progress || {};
    if (job.status === "queued") showQueued(progress.queue_position);
    else if (progress.total_steps) showProgress(progress.step, progress.total_steps, null, null);
    else showRunning();
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function followJob(id, signal) {
  return (await streamJob(id, signal)) || pollJob(id, signal);
}

// --- status of the running job ---------------------------------------------------------------

function setStatus(text, kind = "") {
  const status = $("job-status");
  status.textContent = text;
  status.dataset.kind = kind;
}

function showQueued(position) {
  $("progress-row").hidden = false;
  $("progress").removeAttribute("value"); // indeterminate while waiting
  $("progress-text").textContent = "";
  setStatus(position ? `Queued (position ${position})…` : "Queued…");
}

function showRunning() {
  $("progress-row").hidden = false;
  setStatus("Running…");
}

function showProgress(step, total, eta, preview) {
  $("progress-row").hidden = false;
  const bar = $("progress");
  bar.max = total;
  bar.value = step;
  const left = eta != null ? ` · about ${Math.max(0, Math.round(eta))} s left` : "";
  $("progress-text").textContent = `Step ${step} of ${total}${left}`;
  setStatus(`Running: step ${step} of ${total}`);
  if (preview) {
    const img = $("live-preview");
    img.src = `data:image/png;base64,${preview}`;
    img.hidden = false;
  }
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
  document.querySelector(".output").setAttribute("aria-busy", busy ? "true" : "false");
  if (!busy) {
    $("progress-row").hidden = true;
    $("live-preview").hidden = true;
    $("live-preview").removeAttribute("src");
  }
}

// --- the form --------------------------------------------------------------------------------

function currentMode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function applyMode() {
  const mode = currentMode();
  $("image-fields").hidden = mode === "txt2img";
  $("mask-editor").hidden = mode !== "inpaint";
  $("mask-blur-field").hidden = mode !== "inpaint";
}

// A number typed as a number goes as one; anything else goes as typed, so the API's own
// message says what is wrong with it.
function numberOrText(raw) {
  const text = raw.trim();
  if (text === "") return undefined;
  return /^-?\d+(\.\d+)?$/.test(text) ? Number(text) : text;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("the file could not be read"));
    reader.readAsDataURL(file);
  });
}

async function requestBody(mode) {
  const body = { prompt: $("prompt").value, async: true };
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  if ($("model_id").value) body.model_id = $("model_id").value;
  for (const name of NUMERIC_FIELDS) {
    const value = numberOrText($(name).value);
    if (value !== undefined) body[name] = value;
  }
  if ($("scheduler").value) body.scheduler = $("scheduler").value;
  const loras = selectedLoras();
  if (loras.length) body.loras = loras;
  if (mode !== "txt2img") {
    const strength = numberOrText($("strength").value);
    if (strength !== undefined) body.strength = strength;
    const file = $("image").files[0];
    if (file) body.image = await readFile(file);
  }
  if (mode === "inpaint") {
    const blur = numberOrText($("mask_blur").value);
    if (blur !== undefined) body.mask_blur = blur;
    if ($("image").files[0]) body.mask = maskDataUrl();
  }
  return body;
}

function clearErrors() {
  for (const node of document.querySelectorAll(".field-error, #form-error")) node.textContent = "";
  for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

// Each message of the API's error goes next to the field it names; the rest above the form.
function showApiError(error) {
  const stray = [];
  let first = null;
  const fields = Object.entries(error.fields || {});
  for (const [name, messages] of fields) {
    const text = [].concat(messages).join(" ");
    const slot = document.getElementById(`${name}-error`);
    const control = document.getElementById(name === "mask" ? "mask-canvas" : name);
    if (slot && !slot.closest("[hidden]")) {
      slot.textContent = text;
      if (control) {
        control.setAttribute("aria-invalid", "true");
        first = first || control;
      }
    } else {
      stray.push(name === "non_field_errors" ? text : `${name}: ${text}`);
    }
  }
  if (!fields.length) stray.push(error.message);
  $("form-error").textContent = stray.join(" ");
  if (first && typeof first.focus === "function" && first.tagName !== "CANVAS") first.focus();
}

async function generate(event) {
  event.preventDefault();
  if (state.job) return;
  clearErrors();
  const mode = currentMode();
  let body;
  try {
    body = await requestBody(mode);
  } catch (err) {
    $("image-error").textContent = err.message;
    return;
  }
  setBusy(true);
  $("progress-row").hidden = false;
  $("progress").removeAttribute("value");
  setStatus("Sending…");
  let job;
  try {
    job = await api(`/api/${mode}/`, { method: "POST", body });
  } catch (err) {
    setBusy(false);
    showApiError(err);
    setStatus(`Not generated: ${err.message}`, "error");
    return;
  }
  const abort = new AbortController();
  state.job = { id: job.id, abort };
  loadHistory(); // the new job shows there as queued
  try {
    const final = FINISHED.has(job.status) ? job : await followJob(job.id, abort.signal);
    showResult(final);
  } catch (err) {
    if (err.name !== "AbortError") setStatus(`Lost track of the job: ${err.message}`, "error");
  } finally {
    state.job = null;
    setBusy(false);
    loadHistory();
  }
}

async function cancelJob() {
  const job = state.job;
  if (!job) return;
  $("cancel").disabled = true;
  setStatus("Cancelling…");
  try {
    await api(`/api/results/${job.id}/cancel/`, { method: "POST" });
  } catch (err) {
    if (err.code !== "already_finished") setStatus(`Could not cancel: ${err.message}`, "error");
  }
  // The job's stream (or the polling) reports the end.
}

function showResult(job) {
  const gallery = $("gallery");
  gallery.replaceChildren();
  state.shownJobId = job.id;
  if (job.status === "succeeded") {
    const seconds = job.timings && job.timings.generate_s;
    const took = seconds != null ? ` in ${seconds.toFixed(1)} s` : "";
    const count = job.images.length;
    setStatus(`Done: ${count} image${count === 1 ? "" : "s"}, seed ${job.seed}${took}.`, "done");
    for (const image of job.images) gallery.append(imageTile(job, image, image.url));
  } else if (job.status === "cancelled") {
    setStatus("Cancelled.", "cancelled");
  } else {
    const message = (job.error && job.error.message) || "the generation failed";
    setStatus(`Failed: ${message}`, "error");
  }
}

function safeUrl(url) {
  return typeof url === "string" && /^(https?:\/\/|\/)/.test(url) ? url : "";
}

function imageTile(job, image, src) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "tile";
  button.setAttribute("aria-label", `Open image ${image.index + 1} (seed ${image.seed})`);
  const img = document.createElement("img");
  img.src = safeUrl(src);
  img.alt = `Generated image ${image.index + 1}, seed ${image.seed}`;
  img.width = image.width;
  img.height = image.height;
  const caption = document.createElement("span");
  caption.textContent = `seed ${image.seed}`;
  button.append(img, caption);
  button.addEventListener("click", () => openDetail(job, button));
  item.append(button);
  return item;
}

// --- models, schedulers, LoRAs ---------------------------------------------------------------

async function loadModels() {
  const select = $("model_id");
  let models;
  try {
    models = await api("/api/models/");
  } catch (err) {
    $("model_id-error").textContent = `The models could not be listed: ${err.message}`;
    return;
  }
  $("model_id-error").textContent = "";
  const chosen = select.value;
  select.replaceChildren();
  state.models.clear();
  for (const model of models) {
    state.models.set(model.id, model);
    const option = document.createElement("option");
    option.value = model.id;
    option.textContent = `${model.name || model.id}${model.loaded ? " (loaded)" : ""}`;
    if (chosen ? model.id === chosen : model.default) option.selected = true;
    select.append(option);
  }
  applyModelDefaults();
}

function applyModelDefaults() {
  const model = state.models.get($("model_id").value);
  if (!model) return;
  $("width").placeholder = model.default_size ?? "";
  $("height").placeholder = model.default_size ?? "";
  $("steps").placeholder = model.default_steps ?? "";
  $("guidance_scale").placeholder = model.default_guidance_scale ?? "";
  applyLoraFamilies();
}

// A LoRA made for another family than the chosen model's can't be picked (the API would refuse
// it); its label says which family it is for. A LoRA whose family is unknown stays available.
function applyLoraFamilies() {
  const model = state.models.get($("model_id").value);
  const family = model ? model.family : null;
  state.loras.forEach((lora, i) => {
    const other = Boolean(family && lora.family && lora.family !== family);
    const check = $(`lora-${i}`);
    check.disabled = other;
    $(`lora-weight-${i}`).disabled = other;
    if (other) check.checked = false;
    $(`lora-note-${i}`).textContent = other ? ` (for ${lora.family} models)` : "";
  });
}

function fillSchedulers() {
  const select = $("scheduler");
  for (const name of SCHEDULERS) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    select.append(option);
  }
}

async function loadLoras() {
  let loras = [];
  try {
    loras = await api("/api/loras/");
  } catch {
    loras = []; // no LoRA endpoint, or no key yet
  }
  state.loras = loras;
  const list = $("loras-list");
  list.replaceChildren();
  loras.forEach((lora, i) => {
    const row = document.createElement("div");
    row.className = "row wrap lora";
    const check = document.createElement("input");
    check.type = "checkbox";
    check.id = `lora-${i}`;
    check.value = lora.name;
    const label = document.createElement("label");
    label.htmlFor = check.id;
    label.textContent = lora.name;
    const note = document.createElement("span");
    note.id = `lora-note-${i}`;
    note.className = "hint";
    label.append(note);
    const weightLabel = document.createElement("label");
    weightLabel.htmlFor = `lora-weight-${i}`;
    weightLabel.className = "visually-hidden";
    weightLabel.textContent = `Weight of ${lora.name}`;
    const weight = document.createElement("input");
    weight.type = "text";
    weight.inputMode = "decimal";
    weight.id = `lora-weight-${i}`;
    weight.value = "1";
    weight.size = 4;
    row.append(check, label, weightLabel, weight);
    list.append(row);
  });
  $("loras-fieldset").hidden = loras.length === 0;
  applyLoraFamilies();
}

function selectedLoras() {
  return state.loras
    .map((lora, i) => ({ lora, check: $(`lora-${i}`), weight: $(`lora-weight-${i}`) }))
    .filter(({ check }) => check && check.checked)
    .map(({ lora, weight }) => ({ name: lora.name, weight: numberOrText(weight.value) ?? 1 }));
}

// --- the mask editor -------------------------------------------------------------------------
// Strokes are painted in a colour on a transparent canvas over the image, at the image's own
// resolution; the mask sent is white where painted (grey at soft edges), black elsewhere.

const mask = { drawing: false, last: null };

function maskContext() {
  return $("mask-canvas").getContext("2d", { willReadFrequently: true });
}

function loadSource() {
  const file = $("image").files[0];
  if (state.sourceUrl) URL.revokeObjectURL(state.sourceUrl);
  state.sourceUrl = file ? URL.createObjectURL(file) : null;
  const img = $("source-preview");
  if (!state.sourceUrl) {
    img.removeAttribute("src");
    return;
  }
  img.onload = () => {
    const canvas = $("mask-canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    maskContext().clearRect(0, 0, canvas.width, canvas.height);
  };
  img.src = state.sourceUrl;
}

function canvasPoint(event) {
  const canvas = $("mask-canvas");
  const rect = canvas.getBoundingClientRect();
  const scale = canvas.width / rect.width;
  return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale, scale };
}

function paint(from, to) {
  const ctx = maskContext();
  ctx.strokeStyle = ctx.fillStyle = "rgb(255, 64, 129)";
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.lineWidth = Number($("brush-size").value) * to.scale;
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x + 0.01, to.y);
  ctx.stroke();
}

function maskDataUrl() {
  const canvas = $("mask-canvas");
  const pixels = maskContext().getImageData(0, 0, canvas.width, canvas.height);
  const d = pixels.data;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i + 3]; // how much was painted here
    d[i] = d[i + 1] = d[i + 2] = v;
    d[i + 3] = 255;
  }
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  out.getContext("2d").putImageData(pixels, 0, 0);
  return out.toDataURL("image/png");
}

function setupMaskEditor() {
  const canvas = $("mask-canvas");
  canvas.addEventListener("pointerdown", (event) => {
    if (!state.sourceUrl) return;
    mask.drawing = true;
    canvas.setPointerCapture(event.pointerId);
    mask.last = canvasPoint(event);
    paint(mask.last, mask.last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!mask.drawing) return;
    const point = canvasPoint(event);
    paint(mask.last, point);
    mask.last = point;
  });
  const stop = () => {
    mask.drawing = false;
  };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
  $("mask-clear").addEventListener("click", () => maskContext().clearRect(0, 0, canvas.width, canvas.height));
  $("mask-fill").addEventListener("click", () => {
    const ctx = maskContext();
    ctx.fillStyle = "rgb(255, 64, 129)";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  });
  $("mask-invert").addEventListener("click", () => {
    const ctx = maskContext();
    const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const d = pixels.data;
    for (let i = 0; i < d.length; i += 4) {
      d[i] = 255;
      d[i + 1] = 64;
      d[i + 2] = 129;
      d[i + 3] = 255 - d[i + 3];
    }
    ctx.putImageData(pixels, 0, 0);
  });
  $("image").addEventListener("change", loadSource);
}

// --- history ---------------------------------------------------------------------------------

function pageSize() {
  return Number($("page-size").value) || 12;
}

let historyRequest = 0;

async function loadHistory() {
  const status = $("history-status");
  const request = ++historyRequest;
  let data;
  try {
    data = await api(`/api/results/?page=${state.page}&page_size=${pageSize()}`);
    if (request !== historyRequest) return; // a newer load is under way: its answer wins
  } catch (err) {
    if (request !== historyRequest) return;
    if (err.status === 404 && state.page > 1) {
      state.page = 1; // the page is gone (results deleted meanwhile)
      return loadHistory();
    }
    status.textContent = `The history could not be loaded: ${err.message}`;
    return;
  }
  const grid = $("history-grid");
  grid.replaceChildren(...data.results.map(historyCard));
  const pages = Math.max(1, Math.ceil(data.count / pageSize()));
  $("page-info").textContent = `Page ${state.page} of ${pages}`;
  $("page-prev").disabled = !data.previous;
  $("page-next").disabled = !data.next;
  status.textContent = data.count ? `${data.count} generation${data.count === 1 ? "" : "s"}` : "Nothing yet.";
}

function historyCard(job) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card";
  button.dataset.id = job.id;
  button.dataset.status = job.status;
  const prompt = (job.params && job.params.prompt) || "";
  button.setAttribute("aria-label", `Open: ${prompt || job.kind} (${job.status})`);
  const first = job.images && job.images[0];
  if (first) {
    const img = document.createElement("img");
    img.src = safeUrl(first.thumbnail_url || first.url);
    img.alt = "";
    img.loading = "lazy";
    img.decoding = "async";
    img.width = first.width;
    img.height = first.height;
    button.append(img);
  } else {
    const placeholder = document.createElement("span");
    placeholder.className = "placeholder";
    placeholder.textContent = job.status;
    button.append(placeholder);
  }
  const caption = document.createElement("span");
  caption.className = "caption";
  caption.textContent = prompt;
  const meta = document.createElement("span");
  meta.className = "meta";
  const count = job.images ? job.images.length : 0;
  meta.textContent = `${job.status}${count > 1 ? ` · ${count} images` : ""} · ${new Date(job.created_at).toLocaleString()}`;
  button.append(caption, meta);
  button.addEventListener("click", () => openDetail(job, button));
  item.append(button);
  return item;
}

// --- one generation, large --------------------------------------------------------------------

const DETAIL_FIELDS = [
  ["kind", "Kind"],
  ["model_id", "Model"],
  ["prompt", "Prompt"],
  ["negative_prompt", "Negative prompt"],
  ["size", "Size"],
  ["steps", "Steps"],
  ["guidance_scale", "Guidance"],
  ["scheduler", "Scheduler"],
  ["seed", "Seed"],
  ["num_images", "Images"],
  ["strength", "Strength"],
  ["mask_blur", "Mask blur"],
  ["loras", "LoRAs"],
];

function openDetail(job, opener) {
  state.detail = job;
  state.detailOpener = opener;
  const params = job.params || {};
  $("detail-title").textContent = `${job.kind} · ${job.status}`;
  $("detail-error").textContent = job.error && job.error.message ? job.error.message : "";
  const images = $("detail-images");
  images.replaceChildren();
  for (const image of job.images || []) {
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.href = safeUrl(image.url);
    link.target = "_blank";
    link.rel = "noopener";
    const img = document.createElement("img");
    img.src = safeUrl(image.url);
    img.alt = `Image ${image.index + 1} of the generation, seed ${image.seed} (opens the PNG)`;
    img.width = image.width;
    img.height = image.height;
    link.append(img);
    const caption = document.createElement("p");
    caption.textContent = `seed ${image.seed} · ${image.width}×${image.height}`;
    item.append(link, caption);
    images.append(item);
  }
  const list = $("detail-params");
  list.replaceChildren();
  const values = {
    ...params,
    kind: job.kind,
    model_id: job.model_id || params.model_id,
    seed: job.seed ?? params.seed,
    size: params.width && params.height ? `${params.width}×${params.height}` : null,
    scheduler: params.scheduler || "the model's own",
    loras: (params.loras || []).map((l) => `${l.name} (${l.weight})`).join(", ") || null,
  };
  for (const [key, label] of DETAIL_FIELDS) {
    const value = values[key];
    if (value === null || value === undefined || value === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    list.append(dt, dd);
  }
  const created = document.createElement("dt");
  created.textContent = "Created";
  const when = document.createElement("dd");
  when.textContent = new Date(job.created_at).toLocaleString();
  list.append(created, when);
  $("detail-delete").disabled = !FINISHED.has(job.status);
  $("detail").showModal();
}

function closeDetail() {
  $("detail").close();
}

function setField(id, value) {
  $(id).value = value === null || value === undefined ? "" : String(value);
}

function reuse(job) {
  const params = job.params || {};
  const mode = ["txt2img", "img2img", "inpaint"].includes(job.kind) ? job.kind : "txt2img";
  document.querySelector(`input[name="mode"][value="${mode}"]`).checked = true;
  applyMode();
  const model = params.model_id || job.model_id;
  if (model && state.models.has(model)) $("model_id").value = model;
  applyModelDefaults();
  setField("prompt", params.prompt);
  setField("negative_prompt", params.negative_prompt);
  setField("width", params.width);
  setField("height", params.height);
  setField("steps", params.steps);
  setField("guidance_scale", params.guidance_scale);
  setField("seed", job.seed ?? params.seed);
  setField("num_images", params.num_images);
  $("scheduler").value = params.scheduler && SCHEDULERS.includes(params.scheduler) ? params.scheduler : "";
  setField("strength", mode === "txt2img" ? "" : params.strength);
  setField("mask_blur", mode === "inpaint" ? params.mask_blur : "");
  const wanted = new Map((params.loras || []).map((l) => [l.name, l.weight]));
  state.loras.forEach((lora, i) => {
    $(`lora-${i}`).checked = wanted.has(lora.name);
    if (wanted.has(lora.name)) $(`lora-weight-${i}`).value = String(wanted.get(lora.name));
  });
  clearErrors();
  state.detailOpener = null; // focus goes to the form, not back to the card
  closeDetail();
  setStatus(
    mode === "txt2img"
      ? "The form holds that generation's parameters and seed: Generate makes it again."
      : "The form holds that generation's parameters and seed; choose its input image again, then Generate.",
  );
  $("prompt").focus();
}

async function deleteDetail() {
  const job = state.detail;
  if (!job || !window.confirm("Delete this generation and its images?")) return;
  try {
    await api(`/api/results/${job.id}/`, { method: "DELETE" });
  } catch (err) {
    $("detail-error").textContent = `Not deleted: ${err.message}`;
    return;
  }
  state.detailOpener = null;
  closeDetail();
  if (state.shownJobId === job.id) $("gallery").replaceChildren();
  // The last card of a later page: that page is gone, show the one before.
  if (state.page > 1 && $("history-grid").children.length === 1) state.page -= 1;
  loadHistory();
  $("history-title").focus();
}

// --- start -----------------------------------------------------------------------------------

function showKeyProblem(message) {
  const details = $("auth");
  details.open = true;
  $("api-key-error").textContent = message;
  $("api-key").setAttribute("aria-invalid", "true");
}

async function loadAll() {
  await loadModels();
  await Promise.all([loadLoras(), loadHistory()]);
}

function setupAuth() {
  const input = $("api-key");
  input.value = state.apiKey;
  $("api-key-required-note").hidden = !AUTH_REQUIRED;
  if (AUTH_REQUIRED && !state.apiKey) $("auth").open = true;
  const use = () => {
    storeKey(input.value.trim());
    $("api-key-error").textContent = "";
    input.removeAttribute("aria-invalid");
    loadAll();
  };
  $("api-key-save").addEventListener("click", use);
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      use();
    }
  });
  $("api-key-forget").addEventListener("click", () => {
    input.value = "";
    use();
  });
}

function setup() {
  fillSchedulers();
  setupAuth();
  setupMaskEditor();
  const form = $("form");
  form.addEventListener("submit", generate);
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", applyMode);
  $("model_id").addEventListener("change", applyModelDefaults);
  $("seed-random").addEventListener("click", () => setField("seed", ""));
  $("cancel").addEventListener("click", cancelJob);
  $("page-prev").addEventListener("click", () => {
    state.page = Math.max(1, state.page - 1);
    loadHistory();
  });
  $("page-next").addEventListener("click", () => {
    state.page += 1;
    loadHistory();
  });
  $("page-size").addEventListener("change", () => {
    state.page = 1;
    loadHistory();
  });
  $("history-refresh").addEventListener("click", loadHistory);
  $("detail-close").addEventListener("click", closeDetail);
  $("detail-reuse").addEventListener("click", () => state.detail && reuse(state.detail));
  $("detail-delete").addEventListener("click", deleteDetail);
  $("detail").addEventListener("close", () => {
    const opener = state.detailOpener;
    if (opener && opener.isConnected) opener.focus();
  });
  applyMode();
  loadAll().finally(() => {
    root.dataset.ready = "true";
  });
}

setup();
