// The learning view: frames of the forward process and the schedule table come from the
// server (/api/noisecraft/forward, /api/noisecraft/schedule); the denoising playback records
// the per-step previews the server streams over /ws while it generates; the grid queues
// ordinary generations.  The page draws; it computes nothing of the diffusion itself.
import { Events, blobToBase64, get, post, viewURL, waitJob } from "./api.js";

const $ = (id) => document.getElementById(id);
const events = new Events();
let frames = [];
let steps = [];
let playing = null;
let model = null; // the server's current checkpoint (GET /sdapi/v1/options)

function showError(message) { $("error").textContent = message; $("error").hidden = false; }
const fail = (e) => showError(e.message ?? String(e));

// ---- forward process ---------------------------------------------------------------------

function sampleImage() {
  const c = document.createElement("canvas");
  c.width = c.height = 128;
  const ctx = c.getContext("2d");
  ctx.fillStyle = "#2050c0";
  ctx.fillRect(0, 0, 128, 128);
  ctx.fillStyle = "#e03020";
  ctx.beginPath();
  ctx.arc(44, 44, 28, 0, 2 * Math.PI);
  ctx.fill();
  ctx.fillStyle = "#f0d040";
  ctx.fillRect(70, 76, 40, 30);
  return new Promise((resolve) => c.toBlob(resolve, "image/png"));
}

let forwardSource = null;

async function loadForward() {
  const image = await blobToBase64(forwardSource ?? await sampleImage());
  const answer = await post("/api/noisecraft/forward",
    { image, schedule: $("schedule").value, frames: 21, seed: 0 });
  frames = answer.frames;
  $("t_slider").max = frames.length - 1;
  showFrame();
}

function showFrame() {
  const f = frames[Number($("t_slider").value)];
  if (!f) return;
  $("fw_image").src = `data:image/png;base64,${f.image}`;
  const snr = f.snr === null ? "∞" : f.snr.toPrecision(3);
  $("fw_caption").textContent = `t = ${f.t}   ᾱ_t = ${f.alpha_bar.toFixed(4)}   SNR = ${snr}`;
}

// ---- schedule plot -----------------------------------------------------------------------

async function loadPlot() {
  const q = new URLSearchParams({ schedule: $("schedule").value,
    steps: $("plot_steps").value, spacing: $("spacing").value || "normal" });
  draw(await get(`/api/noisecraft/schedule?${q}`));
}

function draw(table) {
  const c = $("plot");
  const ctx = c.getContext("2d");
  const pad = 30;
  const W = c.width - 2 * pad;
  const H = c.height - 2 * pad;
  const T = table.num_timesteps - 1;
  const x = (t) => pad + (t / T) * W;
  const yA = (a) => pad + (1 - a) * H;
  const yS = (s) => pad + (1 - (Math.max(-4, Math.min(4, s)) + 4) / 8) * H;
  ctx.clearRect(0, 0, c.width, c.height);
  ctx.strokeStyle = "#555";
  ctx.strokeRect(pad, pad, W, H);
  ctx.fillStyle = "#aaa";
  ctx.font = "11px sans-serif";
  ctx.fillText("t = 0", pad, c.height - 10);
  ctx.fillText(`t = ${T}`, pad + W - 40, c.height - 10);
  const line = (values, y, color) => {
    ctx.strokeStyle = color;
    ctx.beginPath();
    values.forEach((v, t) => (t ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
    ctx.stroke();
  };
  line(table.alphas_cumprod, yA, "#4c8dff");
  line(table.log10_snr, yS, "#ff9f43");
  ctx.fillStyle = "#fff";
  table.run_timesteps.forEach((t, i) => {
    const s = table.run_sigmas[i];
    if (s <= 0) return;
    const a = 1 / (1 + s * s);
    ctx.beginPath();
    ctx.arc(x(t), yA(a), 3, 0, 2 * Math.PI);
    ctx.fill();
  });
}

// ---- denoising playback ------------------------------------------------------------------

async function record() {
  steps = [];
  $("dn_run").disabled = true;
  try {
    await events.ready;
    const total = Number($("dn_steps").value);
    const job = await post("/api/generate", { prompt: $("dn_prompt").value, steps: total, model,
      width: 64, height: 64, seed: 3, wait: false, response: "json",
      client_id: events.clientId });
    let step = 0;
    const entry = await waitJob(events, job.prompt_id, (msg) => {
      if (msg.type === "progress") step = msg.data.value;
      if (msg.type === "preview") steps.push({ step, total, url: URL.createObjectURL(msg.blob) });
    });
    const image = entry.outputs?.generate?.images?.[0];
    if (image) steps.push({ step: total, total, url: viewURL(image), final: true });
    $("dn_slider").max = Math.max(0, steps.length - 1);
    $("dn_slider").value = 0;
    showStep();
  } finally {
    $("dn_run").disabled = false;
  }
}

function showStep() {
  const s = steps[Number($("dn_slider").value)];
  if (!s) return;
  $("dn_x0").src = s.url;
  $("dn_x0_caption").textContent = s.final ? `final image (after step ${s.total})`
    : `x0 estimate after step ${s.step}/${s.total}`;
  $("dn_xt").hidden = true;
  $("dn_xt_caption").textContent = "x_t: not streamed by the server yet";
  $("dn_note").textContent = "The server streams one preview per step: the decoded x0 " +
    "estimate. The noisy state x_t itself is not sent yet, so only x0 is shown.";
}

function play() {
  if (playing) { clearInterval(playing); playing = null; $("dn_play").textContent = "Play"; return; }
  $("dn_play").textContent = "Pause";
  playing = setInterval(() => {
    const s = $("dn_slider");
    s.value = (Number(s.value) + 1) % (Number(s.max) + 1);
    showStep();
  }, 400);
}

// ---- CFG x steps grid ----------------------------------------------------------------------

function numbers(id, what) {
  const values = $(id).value.split(",").map((v) => Number(v.trim()));
  if (values.length === 0 || values.length > 5 || values.some((v) => !Number.isFinite(v))) {
    throw new Error(`${what}: give 1 to 5 numbers separated by commas, got "${$(id).value}"`);
  }
  return values;
}

async function makeGrid() {
  const cfgs = numbers("grid_cfg", "CFG values");
  const counts = numbers("grid_steps", "Step counts");
  const grid = $("grid");
  grid.style.gridTemplateColumns = `auto repeat(${cfgs.length}, 1fr)`;
  const head = (text) => Object.assign(document.createElement("div"), { className: "head",
    textContent: text });
  const cells = [head("steps \\ CFG"), ...cfgs.map((c) => head(`CFG ${c}`))];
  const jobs = [];
  await events.ready;
  for (const n of counts) {
    cells.push(head(`${n} steps`));
    for (const cfg of cfgs) {
      const img = new Image();
      img.alt = `CFG ${cfg}, ${n} steps`;
      cells.push(img);
      jobs.push({ img, body: { prompt: $("dn_prompt").value, cfg_scale: cfg, steps: n, model,
        width: 64, height: 64, seed: 11, wait: false, response: "json",
        client_id: events.clientId } });
    }
  }
  grid.replaceChildren(...cells);
  for (const { img, body } of jobs) {
    const job = await post("/api/generate", body);
    const entry = await waitJob(events, job.prompt_id);
    const image = entry.outputs?.generate?.images?.[0];
    if (image) img.src = viewURL(image);
  }
}

// ---- wiring ----------------------------------------------------------------------------

async function start() {
  const [schedulers, options] = await Promise.all([get("/sdapi/v1/schedulers"),
    get("/sdapi/v1/options")]);
  model = options.sd_model_checkpoint ?? null;
  $("spacing").replaceChildren(...schedulers.map((s) => new Option(s.label, s.name)));
  $("spacing").value = "normal";
  $("t_slider").addEventListener("input", showFrame);
  $("schedule").addEventListener("change", () => {
    loadForward().catch(fail);
    loadPlot().catch(fail);
  });
  $("fw_file").addEventListener("change", () => {
    forwardSource = $("fw_file").files[0] ?? null;
    loadForward().catch(fail);
  });
  for (const id of ["plot_steps", "spacing"]) $(id).addEventListener("change", () => loadPlot().catch(fail));
  $("dn_run").addEventListener("click", () => record().catch(fail));
  $("dn_slider").addEventListener("input", showStep);
  $("dn_play").addEventListener("click", play);
  $("grid_run").addEventListener("click", () => makeGrid().catch(fail));
  await Promise.all([loadForward(), loadPlot()]);
}

start().catch(fail);
