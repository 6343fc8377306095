// The generation page: a form over POST /api/generate (queued, wait=false), progress and step
// previews from /ws, results read back from /history + /view, settings from the PNG itself
// (POST /sdapi/v1/png-info).  No diffusion happens here: the page only builds requests.
import { ApiError, Events, blobToBase64, get, post, viewURL, waitJob } from "./api.js";
import { MaskStage } from "./mask.js";

const $ = (id) => document.getElementById(id);
const events = new Events();
const stage = new MaskStage($("init_canvas"), $("mask_canvas"));
let lastSeed = null;
let busy = false;

// ---- messages ---------------------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() { $("error").hidden = true; $("error").textContent = ""; }

// ---- pickers filled from the server ------------------------------------------------------

function fill(select, items, keep) {
  select.replaceChildren(...items.map(([value, label]) => new Option(label, value)));
  if (keep !== undefined && items.some(([v]) => v === keep)) select.value = keep;
}

async function loadPickers() {
  const [models, samplers, schedulers, loras, options] = await Promise.all([
    get("/sdapi/v1/sd-models"), get("/sdapi/v1/samplers"), get("/sdapi/v1/schedulers"),
    get("/sdapi/v1/loras"), get("/sdapi/v1/options")]);
  if (models.length === 0) {
    showError("The server has no checkpoint yet: put a model file (.safetensors) in its " +
      "models/checkpoints folder; generation uses the built-in default model if it has one.");
  }
  fill($("model"), [["", "server default"], ...models.map((m) => [m.title, m.title])],
    options.sd_model_checkpoint ?? "");
  fill($("sampler"), samplers.map((s) => [s.aliases[0], s.name]), "euler");
  fill($("scheduler"), schedulers.map((s) => [s.name, s.label]), "normal");
  fill($("lora"), [["", "none"], ...loras.map((l) => [l.name, l.alias])]);
}

// ---- the form <-> settings (noisecraft's names) ---------------------------------------------

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function setMode(value) {
  document.querySelector(`input[name=mode][value=${value}]`).checked = true;
  updateMode();
}

function updateMode() {
  const m = mode();
  $("edit_tools").hidden = m === "txt2img";
  $("mask_tools").hidden = m !== "inpaint";
  $("outpaint_tools").hidden = m !== "outpaint";
  $("mask_canvas").hidden = m !== "inpaint";
  stage.setOutpaint(m === "outpaint" ? outpaintSides() : [0, 0, 0, 0]);
}

function outpaintSides() {
  return ["out_left", "out_top", "out_right", "out_bottom"].map((id) => Number($(id).value) || 0);
}

function number(id, what, { min = -Infinity, whole = true } = {}) {
  const v = Number($(id).value);
  if ($(id).value === "" || !Number.isFinite(v) || (whole && !Number.isInteger(v)) || v < min) {
    throw new ApiError(`${what} must be ${whole ? "a whole number" : "a number"}` +
      `${min > -Infinity ? ` >= ${min}` : ""}, got "${$(id).value}"`);
  }
  return v;
}

function readForm() {
  let prompt = $("prompt").value;
  if ($("lora").value) {
    prompt += ` <lora:${$("lora").value}:${number("lora_weight", "LoRA weight", { whole: false })}>`;
  }
  const seed = number("seed", "Seed", { min: -1 });
  return {
    prompt, negative_prompt: $("negative_prompt").value,
    model: $("model").value || null,
    sampler: $("sampler").value, scheduler: $("scheduler").value,
    steps: number("steps", "Steps", { min: 1 }),
    cfg_scale: number("cfg_scale", "CFG", { min: 0, whole: false }),
    seed: seed < 0 ? null : seed,
    width: number("width", "Width", { min: 8 }), height: number("height", "Height", { min: 8 }),
  };
}

function fillForm(p) {
  const set = (id, v) => { if (v !== undefined && v !== null) $(id).value = v; };
  let prompt = p.prompt ?? "";
  const lora = /\s*<lora:([^:>]+):([-\d.]+)>/.exec(prompt);
  if (lora && [...$("lora").options].some((o) => o.value === lora[1])) {
    prompt = prompt.replace(lora[0], "");
    set("lora", lora[1]);
    set("lora_weight", lora[2]);
  }
  set("prompt", prompt);
  set("negative_prompt", p.negative_prompt ?? "");
  set("steps", p.steps);
  set("cfg_scale", p.cfg_scale);
  set("seed", p.seed);
  set("width", p.width);
  set("height", p.height);
  const preset = `${p.width}x${p.height}`;
  $("size_preset").value = [...$("size_preset").options].some((o) => o.value === preset)
    ? preset : "custom";
  if (p.sampler && [...$("sampler").options].some((o) => o.value === p.sampler)) {
    $("sampler").value = p.sampler;
  }
  if (p.scheduler && [...$("scheduler").options].some((o) => o.value === p.scheduler)) {
    $("scheduler").value = p.scheduler;
  }
  const model = [...$("model").options].find((o) => p.model_name &&
    o.value.replace(/\.[^.]+$/, "") === p.model_name);
  if (model) $("model").value = model.value;
  if (p.strength !== undefined && p.strength !== null) set("strength", p.strength);
  $("strength_out").value = $("strength").value;
}

// ---- generating --------------------------------------------------------------------------

async function editInputs(m) {
  if (m === "txt2img") return {};
  if (!stage.loaded) throw new ApiError(`${m} needs an image: load one, or use "send to ` +
    `${m === "inpaint" ? "inpaint" : "img2img"}" on a result`);
  const inputs = { init_image: await blobToBase64(await stage.sourcePNG()),
    strength: number("strength", "Strength", { min: 0.01, whole: false }),
    width: null, height: null };
  if (m === "inpaint") {
    if (!stage.painted()) throw new ApiError("inpaint needs a mask: paint over the part of " +
      "the image to repaint (white), or switch to img2img");
    inputs.mask = await blobToBase64(await stage.maskPNG());
  }
  if (m === "outpaint") {
    const sides = outpaintSides();
    if (sides.every((v) => v === 0)) throw new ApiError("outpaint needs at least one side " +
      "to extend by (left, top, right or bottom, in pixels, multiples of 8)");
    inputs.outpaint = sides;
  }
  return inputs;
}

function onJobEvent(msg, index, count) {
  if (msg.type === "preview") {
    const old = $("preview").src;
    $("preview").src = URL.createObjectURL(msg.blob);
    $("preview").hidden = false;
    if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  } else if (msg.type === "progress") {
    $("progress").max = msg.data.max;
    $("progress").value = msg.data.value;
    $("progress_text").textContent = `image ${index + 1}/${count}: step ` +
      `${msg.data.value}/${msg.data.max}`;
  } else if (msg.type === "execution_start") {
    $("progress_text").textContent = `image ${index + 1}/${count}: started`;
  }
}

async function runOne(settings, index, count) {
  $("progress").value = 0;
  $("progress_text").textContent = `image ${index + 1}/${count}: queued`;
  const job = await post("/api/generate", { ...settings, wait: false, response: "json",
    client_id: events.clientId });
  const entry = await waitJob(events, job.prompt_id, (msg) => onJobEvent(msg, index, count));
  for (const image of entry.outputs?.generate?.images ?? []) await addResult(image);
}

async function generate() {
  if (busy) return;
  clearError();
  busy = true;
  $("generate").disabled = true;
  try {
    await events.ready;
    const m = mode();
    const base = { ...readForm(), ...(await editInputs(m)) };
    const count = number("batch_count", "Batch count", { min: 1 });
    for (let i = 0; i < count; i++) {
      const seed = base.seed === null ? null : base.seed + i;
      await runOne({ ...base, seed }, i, count);
    }
    $("progress_text").textContent = "done";
  } catch (e) {
    showError(e.message);
    $("progress_text").textContent = "stopped";
  } finally {
    busy = false;
    $("generate").disabled = false;
  }
}

// ---- results -----------------------------------------------------------------------------

const SHOWN = [["prompt", "Prompt"], ["negative_prompt", "Negative"], ["seed", "Seed"],
  ["steps", "Steps"], ["cfg_scale", "CFG"], ["sampler", "Sampler"],
  ["scheduler", "Scheduler"], ["size", "Size"], ["strength", "Strength"],
  ["model_name", "Model"]];

async function readSettings(blob) {
  const info = await post("/sdapi/v1/png-info", { image: await blobToBase64(blob) });
  return { params: info.parameters ?? {}, text: info.info ?? "" };
}

async function addResult(image) {
  const url = viewURL(image);
  const answer = await fetch(url);
  if (!answer.ok) throw new ApiError(`GET ${url} failed (HTTP ${answer.status})`);
  const blob = await answer.blob();
  const { params, text } = await readSettings(blob);
  if (params.seed !== undefined) lastSeed = params.seed;
  $("gallery").prepend(card(url, image.filename, blob, params, text));
}

function card(url, filename, blob, params, text) {
  const el = document.createElement("article");
  el.className = "card";
  const img = new Image();
  img.src = url;
  img.alt = params.prompt ?? "generated image";
  const dl = document.createElement("dl");
  const values = { ...params, size: params.width ? `${params.width}x${params.height}` : null };
  for (const [key, label] of SHOWN) {
    if (values[key] === undefined || values[key] === null || values[key] === "") continue;
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = label;
    dd.textContent = String(values[key]);
    dd.dataset.key = key;
    dl.append(dt, dd);
  }
  dl.title = text;
  const actions = document.createElement("div");
  actions.className = "actions";
  const download = document.createElement("a");
  download.href = url;
  download.download = filename;
  download.textContent = "Download";
  const button = (label, fn) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.addEventListener("click", fn);
    return b;
  };
  actions.append(download,
    button("Reuse settings", () => fillForm(params)),
    button("Send to img2img", () => sendTo(blob, "img2img")),
    button("Send to inpaint", () => sendTo(blob, "inpaint")),
    button("Send to outpaint", () => sendTo(blob, "outpaint")));
  el.append(img, dl, actions);
  return el;
}

async function sendTo(blob, target) {
  setMode(target);
  await stage.load(blob);
  stage.setOutpaint(target === "outpaint" ? outpaintSides() : [0, 0, 0, 0]);
  $("edit_hint").textContent = target === "inpaint"
    ? "Paint over what to repaint (white); the rest is kept." : "";
  $("edit").scrollIntoView({ behavior: "smooth", block: "start" });
}

// ---- dropping a PNG ------------------------------------------------------------------------

async function dropped(file) {
  clearError();
  try {
    if (!file.type.startsWith("image/")) {
      throw new ApiError(`"${file.name}" is not an image; drop a PNG made by noisecraft or ` +
        "AUTOMATIC1111");
    }
    const { params } = await readSettings(file);
    if (!params.prompt && params.steps === undefined) {
      throw new ApiError(`"${file.name}" carries no generation settings (no "parameters" ` +
        "text chunk); only PNGs saved by noisecraft or AUTOMATIC1111 have them");
    }
    fillForm(params);
    $("progress_text").textContent = `settings loaded from ${file.name}`;
  } catch (e) {
    showError(e.message);
  }
}

// ---- wiring ------------------------------------------------------------------------------

function wire() {
  $("settings").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); generate(); }
  });
  $("interrupt").addEventListener("click", () => post("/interrupt", {}).catch(
    (e) => showError(e.message)));
  $("seed_random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed_reuse").addEventListener("click", () => {
    if (lastSeed === null) showError("no seed to reuse yet: generate an image first");
    else $("seed").value = lastSeed;
  });
  $("size_preset").addEventListener("change", () => {
    const [w, h] = $("size_preset").value.split("x");
    if (h) { $("width").value = w; $("height").value = h; }
  });
  for (const id of ["width", "height"]) {
    $(id).addEventListener("input", () => { $("size_preset").value = "custom"; });
  }
  document.querySelectorAll("input[name=mode]").forEach((r) =>
    r.addEventListener("change", updateMode));
  $("strength").addEventListener("input", () => { $("strength_out").value = $("strength").value; });
  $("brush").addEventListener("input", () => { stage.brush = Number($("brush").value); });
  $("eraser").addEventListener("change", () => { stage.eraser = $("eraser").checked; });
  $("mask_clear").addEventListener("click", () => stage.clear());
  $("mask_invert").addEventListener("click", () => stage.invert());
  for (const id of ["out_left", "out_top", "out_right", "out_bottom"]) {
    $(id).addEventListener("change", updateMode);
  }
  $("init_file").addEventListener("change", async () => {
    const file = $("init_file").files[0];
    if (file) await stage.load(file).catch((e) => showError(`cannot read ${file.name}: ${e}`));
    updateMode();
  });
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; $("drop_overlay").hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) $("drop_overlay").hidden = true; });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    $("drop_overlay").hidden = true;
    const file = e.dataTransfer?.files?.[0];
    if (file && !e.target.closest?.("#edit")) dropped(file);
    else if (file) stage.load(file).then(updateMode);
  });
}

wire();
updateMode();
loadPickers().catch((e) => showError(e.message));
window.noisecraft = { stage, fillForm, readForm };
