// The page for people (serve/ui.py): one card per served model, read from /ui/models.json, and a way to
// try each one through the same HTTP endpoints any client calls. Plain DOM, no framework; text goes in
// through textContent only, so nothing from the model store is ever parsed as HTML.
"use strict";

const $ = (root, selector) => root.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

const num = (v, digits = 4) => (typeof v === "number" ? Number(v.toPrecision(digits)).toString() : "—");
const sci = (v) => (typeof v === "number" ? v.toExponential(2) : "—");

async function main() {
  const main = document.getElementById("models");
  let models;
  try {
    const reply = await fetch("/ui/models.json");
    models = (await reply.json()).models;
  } catch (e) {
    main.replaceChildren(el("p", { class: "error", text: `Cannot read /ui/models.json: ${e}` }));
    return;
  }
  main.replaceChildren();
  if (!models.length) main.append(el("p", { class: "note", text: "No model is served: train and export one." }));
  for (const model of models) main.append(card(model));
}

// --- the card ---------------------------------------------------------------------------------------

function card(m) {
  const node = document.getElementById("card").content.firstElementChild.cloneNode(true);
  node.dataset.model = m.name;
  $(node, "[data-field=name]").textContent = m.name;
  $(node, "[data-field=tag]").textContent = m.tag || "no version served";
  const problem = m.error || m.card_error;
  if (problem) Object.assign($(node, "[data-field=error]"), { hidden: false, textContent: problem });

  const facts = $(node, ".facts");
  const fact = (name, value, field, title) => {
    const dd = el("dd", { "data-field": field, text: value ?? "—" });
    if (title) dd.title = title;
    facts.append(el("dt", { text: name }), dd);
  };
  fact("task", m.task, "task");
  fact("kind", m.kind, "kind");
  fact("architecture", m.arch, "arch");
  fact("parameters", m.parameters?.toLocaleString("en"), "parameters");
  fact("trained", m.created && m.created.replace("T", " ").replace("+00:00", " UTC"), "created");
  fact("training time", m.train_seconds != null ? `${num(m.train_seconds, 3)} s` : null, "train_seconds");
  fact("best epoch", m.epoch, "epoch");
  fact("checkpoint SHA-256", m.checkpoint_sha256 && m.checkpoint_sha256.slice(0, 16) + "…", "sha256",
       m.checkpoint_sha256);
  if (m.versions) fact("exported with", Object.entries(m.versions).map(([k, v]) => `${k} ${v}`).join(", "),
                       "versions");

  const metrics = $(node, ".metrics tbody");
  const test = m.test_metrics || {}, val = m.training_metrics || {};
  for (const key of new Set([...Object.keys(test), ...Object.keys(val)])) {
    if (typeof (test[key] ?? val[key]) !== "number") continue;  // per-class lists stay in the store
    metrics.append(el("tr", { "data-metric": key }, el("td", { text: key }),
                      el("td", { class: "test", text: num(test[key]) }), el("td", { text: num(val[key]) })));
  }
  if (!metrics.children.length) metrics.append(el("tr", {}, el("td", { colspan: 3, text: "none recorded" })));

  const parity = m.parity;
  $(node, ".parity-note").textContent = parity
    ? `${parity.passed ? "passed" : "FAILED"}: ${parity.inputs}; tolerance atol ${parity.atol}, rtol ${parity.rtol}; ` +
      `batches ${parity.batch_sizes.join(", ")}`
    : "no parity record in the model store";
  for (const [format, worst] of Object.entries(parity?.worst || {})) {
    $(node, ".parity tbody").append(el("tr", { "data-format": format }, el("td", { text: format }),
      el("td", { text: worst.batch }), el("td", { class: "max-abs", text: sci(worst.max_abs_err) }),
      el("td", { text: sci(worst.max_rel_err) })));
  }

  const q = m.quantization;
  if (q) {
    const box = $(node, ".quantization");
    box.hidden = false;
    const g = q.gate || {};
    const cost = g.accuracy_drop != null
      ? `test accuracy ${num(g.quantized_accuracy)}% vs ${num(g.float_accuracy)}% float32`
      : `test MRE ${num(g.quantized_mre)}% vs ${num(g.float_mre)}% float32`;
    $(box, ".quant-note").textContent = `${m.variant}, ${q.method}` + (q.int8_format ? ` ${q.int8_format}` : "") +
      (q.requires_vnni ? " (needs a CPU with VNNI)" : "") + `: ${cost}` +
      (q.cpu ? `; measured on ${q.cpu.model} (${q.cpu.flags.join(", ") || "no flags read"})` : "");
    const kept = q.kept_float || [];
    for (const layer of kept) {
      $(box, ".kept-float").append(el("li", { "data-layer": layer.module || layer.node,
        text: `${layer.module || layer.node} (${layer.op}) stays float32: ${layer.why}` }));
    }
    if (q.int8_format && !kept.length) $(box, ".kept-float").append(el("li", { text: "every layer is int8" }));
  }

  const contract = m.contract || {};
  for (const [side, list] of [["in", contract.inputs || []], ["out", contract.outputs || []]]) {
    for (const t of list) {
      $(node, ".contract tbody").append(el("tr", {}, el("td", { text: side }), el("td", { text: t.name }),
        el("td", { text: t.dtype }), el("td", { text: `[${t.shape.join(", ")}]` }),
        el("td", { text: t.range ? `[${t.range.join(", ")}]` : "any" })));
    }
  }
  if (contract.classes) $(node, ".classes").textContent = `classes: ${contract.classes.join(", ")}`;

  const plots = $(node, ".plots");
  for (const src of m.plots) {
    const name = src.split("/").pop().replace(".png", "").replaceAll("_", " ");
    plots.append(el("figure", {}, el("img", { src, alt: `${m.name}: ${name}` }),
                    el("figcaption", { text: name })));
  }
  if (!m.plots.length) plots.append(el("p", { class: "note", text: "no training plots in the model store" }));

  if (m.try) $(node, ".try").append(el("h3", { text: "Try it" }), TRY[m.try.how](m, m.try));
  return node;
}

// --- calling the server -----------------------------------------------------------------------------

// POST a body; the parsed answer, or an Error whose message is the server's own error text.
async function post(url, body, type = "application/json", headers = {}) {
  const reply = await fetch(url, { method: "POST", headers: { "Content-Type": type, ...headers }, body });
  const text = await reply.text();
  let answer;
  try { answer = JSON.parse(text); } catch { answer = null; }
  if (reply.ok && answer) return answer;
  let message = answer?.error ?? text;
  if (Array.isArray(answer?.detail)) {
    message += ": " + answer.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  }
  throw new Error(`${reply.status}: ${message}`);
}

function infer(t, name, shape, data) {
  return post(t.endpoint, JSON.stringify({ inputs: [{ name, shape, datatype: "FP32", data }] }));
}

// One file as a BYTES input, in Triton's binary tensor data extension: the JSON header, then the file after its
// 4-byte little-endian length. Binary, not base64 in JSON, so that a photo larger than a JSON body may be is sent.
async function inferFile(t, file) {
  const length = new Uint8Array(4);
  new DataView(length.buffer).setUint32(0, file.size, true);
  const header = new TextEncoder().encode(JSON.stringify({ inputs: [{ name: t.input, shape: [1], datatype: "BYTES",
    parameters: { binary_data_size: 4 + file.size } }] }));
  return post(t.endpoint, new Blob([header, length, file]), "application/octet-stream",
              { "Inference-Header-Content-Length": String(header.length) });
}

// --- what the server does to a file (serve/images.py), for the preview --------------------------------------

// Pillow's bilinear resize of 8-bit pixels (its Resample.c: weights over every source pixel a target pixel covers,
// in 22-bit fixed point, rows first), so that the preview shows the pixels the model receives, not the browser's.
const PRECISION_BITS = 22;

function coefficients(inSize, outSize) {
  const scale = inSize / outSize, filterscale = Math.max(scale, 1), support = filterscale, ss = 1 / filterscale;
  const out = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize);
    const k = [];
    for (let x = xmin; x < xmax; x++) k.push(Math.max(0, 1 - Math.abs((x - center + 0.5) * ss)));
    const total = k.reduce((a, b) => a + b, 0);
    out.push({ xmin, k: k.map((w) => Math.trunc(0.5 + (total ? w / total : w) * 2 ** PRECISION_BITS)) });
  }
  return out;
}

// One pass along one axis: `pixels` (rows x cols x channels, Uint8ClampedArray) -> the axis resized to `size`.
function pass(pixels, rows, cols, channels, size, alongRows) {
  const [inSize, other] = alongRows ? [rows, cols] : [cols, rows];
  const out = new Uint8ClampedArray(size * other * channels);
  const at = (i, j) => (alongRows ? i * cols + j : j * cols + i) * channels;  // i along the axis, j across it
  const outAt = (i, j) => (alongRows ? i * other + j : j * size + i) * channels;
  for (const [i, { xmin, k }] of coefficients(inSize, size).entries()) {
    for (let j = 0; j < other; j++) {
      for (let c = 0; c < channels; c++) {
        let sum = 2 ** (PRECISION_BITS - 1);
        for (let x = 0; x < k.length; x++) sum += pixels[at(xmin + x, j) + c] * k[x];
        out[outAt(i, j) + c] = Math.floor(sum / 2 ** PRECISION_BITS);  // clamped to 0..255 by the array
      }
    }
  }
  return out;
}

// A file as the server decodes it: the EXIF orientation applied, no colour management, alpha dropped, Pillow's "L"
// (ITU-R 601-2 luma) for one channel, resized bilinear. (A transparent pixel's colour is lost in a canvas, so
// there the preview may differ.) Pixels width x height x channels, 0..255.
async function decoded(file, channels, width, height) {
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = el("canvas", { width: bitmap.width, height: bitmap.height });
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  const rgba = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
  let pixels = new Uint8ClampedArray(bitmap.width * bitmap.height * channels);
  for (let i = 0, o = 0; i < rgba.length; i += 4) {
    if (channels === 1) pixels[o++] = (rgba[i] * 19595 + rgba[i + 1] * 38470 + rgba[i + 2] * 7471 + 0x8000) >> 16;
    else { pixels[o++] = rgba[i]; pixels[o++] = rgba[i + 1]; pixels[o++] = rgba[i + 2]; }
  }
  if (bitmap.width !== width) pixels = pass(pixels, bitmap.height, bitmap.width, channels, width, false);
  if (bitmap.height !== height) pixels = pass(pixels, bitmap.height, width, channels, height, true);
  return pixels;
}

function draw(canvas, pixels, channels) {
  const image = canvas.getContext("2d").createImageData(canvas.width, canvas.height);
  for (let i = 0, o = 0; o < image.data.length; o += 4) {
    const [r, g, b] = channels === 1 ? [pixels[i], pixels[i], pixels[i]] : [pixels[i], pixels[i + 1], pixels[i + 2]];
    i += channels;
    image.data.set([r, g, b, 255], o);
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
}

// A file picker for an image input: the file goes to the server as it is; `seen` previews what the model receives.
function filePicker(t, seen, channels, answered) {
  const file = el("input", { type: "file", accept: "image/png,image/jpeg", "aria-label": "a PNG or JPEG image" });
  file.addEventListener("change", async () => {
    if (!file.files.length) return;
    const picked = file.files[0];
    file.value = "";  // so that choosing the same file again sends it again
    try {
      draw(seen, await decoded(picked, channels, t.width, t.height), channels);
    } catch {
      seen.getContext("2d").clearRect(0, 0, t.width, t.height);  // not an image the browser reads: the server says why
    }
    await answered(inferFile(t, picked));
  });
  return el("label", { class: "controls" }, `or send a PNG or JPEG (resized to ${t.width}×${t.height}): `, file);
}

function showError(out, e) {
  out.replaceChildren(el("p", { class: "error", "data-field": "server-error", text: e.message }));
}

function softmax(logits) {
  const top = Math.max(...logits);
  const e = logits.map((v) => Math.exp(v - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

function bars(out, probabilities, classes) {
  const best = probabilities.indexOf(Math.max(...probabilities));
  const list = el("div", { class: "bars" });
  probabilities.forEach((p, i) => {
    const fill = el("span", { class: "fill" });
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    list.append(el("div", { class: i === best ? "bar best" : "bar", "data-p": String(p) },
      el("span", { class: "name", text: classes?.[i] ?? String(i) }), el("span", { class: "track" }, fill),
      el("span", { class: "value", text: `${(100 * p).toFixed(1)}%` })));
  });
  out.replaceChildren(el("p", { class: "answer" }, "label ",
    el("strong", { "data-field": "label", text: `${best}: ${classes?.[best] ?? best}` })), list);
}

// --- ways to try a model ----------------------------------------------------------------------------

const TRY = {
  // A grey image [1, H, W]: draw it, see what the model receives, and its answer.
  pad(m, t) {
    const size = 280;
    const pad = el("canvas", { class: "pad", width: size, height: size, "aria-label": "drawing pad" });
    const small = el("canvas", { class: "seen", width: t.width, height: t.height });
    const brush = el("input", { type: "range", min: 4, max: 48, value: 20, "aria-label": "brush size" });
    const clear = el("button", { type: "button", text: "Clear" });
    const out = el("div", { class: "result", "aria-live": "polite" });
    const ctx = pad.getContext("2d");
    const wipe = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, size, size); };
    wipe();

    let last = null;
    const at = (e) => {
      const r = pad.getBoundingClientRect();
      return [(e.clientX - r.left) * size / r.width, (e.clientY - r.top) * size / r.height];
    };
    pad.addEventListener("pointerdown", (e) => {
      pad.setPointerCapture(e.pointerId);
      last = at(e);
      stroke(last, last);
    });
    pad.addEventListener("pointermove", (e) => { if (last) { const p = at(e); stroke(last, p); last = p; } });
    const end = () => { if (last) { last = null; send(); } };
    pad.addEventListener("pointerup", end);
    pad.addEventListener("pointercancel", end);
    function stroke([x0, y0], [x1, y1]) {
      Object.assign(ctx, { fillStyle: "#fff", strokeStyle: "#fff", lineWidth: Number(brush.value) });
      ctx.lineCap = "round";
      ctx.beginPath();
      if (x0 === x1 && y0 === y1) {  // a tap: a dot (a line of no length draws nothing)
        ctx.arc(x0, y0, ctx.lineWidth / 2, 0, 2 * Math.PI); ctx.fill();
      } else {
        ctx.moveTo(x0, y0); ctx.lineTo(x1, y1); ctx.stroke();
      }
    }
    clear.addEventListener("click", () => {
      wipe();
      small.getContext("2d").clearRect(0, 0, t.width, t.height);
      out.replaceChildren();
    });

    // The drawing, averaged down to the model's H x W, as pixels in [0, 1] (the contract's range).
    async function send() {
      const sctx = small.getContext("2d");
      sctx.imageSmoothingEnabled = true;
      sctx.imageSmoothingQuality = "high";
      sctx.drawImage(pad, 0, 0, t.width, t.height);
      const rgba = sctx.getImageData(0, 0, t.width, t.height).data;
      const data = [];
      for (let i = 0; i < rgba.length; i += 4) data.push(rgba[i] / 255);
      try {
        const answer = await infer(t, t.input, [1, 1, t.height, t.width], data);
        bars(out, softmax(answer.outputs[0].data), m.contract.classes);
      } catch (e) { showError(out, e); }
    }

    const parts = [el("div", { class: "pad-row" }, pad, el("div", { class: "seen-box" },
      el("p", { class: "note", text: `what the model receives (${t.width}×${t.height})` }), small)),
      el("div", { class: "controls" }, el("label", {}, "brush ", brush), clear), out];
    if (t.files) {
      parts.splice(2, 0, filePicker(t, small, 1, async (reply) => {
        try { bars(out, softmax((await reply).outputs[0].data), m.contract.classes); } catch (e) { showError(out, e); }
      }));
    }
    return el("div", {}, ...parts);
  },

  // Any other image model: a PNG or JPEG file, and what the model receives.
  image(m, t) {
    const seen = el("canvas", { class: "seen", width: t.width, height: t.height });
    const out = el("div", { class: "result", "aria-live": "polite" });
    const picker = filePicker(t, seen, t.channels, async (reply) => {
      try {
        const answer = await reply;
        if (t.classification) bars(out, softmax(answer.outputs.find((o) => o.name === t.target).data),
                                   m.contract.classes);
        else outputs(out, answer);
      } catch (e) { showError(out, e); }
    });
    return el("div", {}, picker, el("div", { class: "seen-box" },
      el("p", { class: "note", text: `what the model receives (${t.width}×${t.height})` }), seen), out);
  },

  // The product regressor, through the typed /predict (which also says when it extrapolates).
  product(m, t) {
    const x1 = el("input", { type: "number", step: "any", name: "x1", value: 3, required: "" });
    const x2 = el("input", { type: "number", step: "any", name: "x2", value: 4, required: "" });
    const out = el("div", { class: "result", "aria-live": "polite" });
    const form = el("form", { novalidate: "" }, el("div", { class: "controls" },
      el("label", {}, "x1 ", x1), el("label", {}, "x2 ", x2), el("button", { text: "Predict" })), out);
    const range = m.contract.train_range;
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const value = (input) => (input.value.trim() === "" ? null : Number(input.value));  // empty: JSON null
      try {
        const answer = await post(t.endpoint, JSON.stringify({ x1: value(x1), x2: value(x2) }));
        out.replaceChildren(el("p", { class: "answer" }, "x1 × x2 ≈ ",
          el("strong", { "data-field": "y", text: num(answer.y, 6) })));
        if (answer.extrapolated) {
          out.append(el("p", { class: "warning", "data-field": "extrapolated", text:
            `An input is outside the training range (${range.map((r) => `[${r.join(", ")})`).join(" × ")}): ` +
            "this answer is an extrapolation and may be far off." }));
        }
      } catch (err) { showError(out, err); }
    });
    return form;
  },

  // A vector input: one number field per feature, over /v2.
  fields(m, t) {
    const spec = m.contract.inputs[0];
    const inputs = [];
    for (let i = 0; i < t.features; i++) {
      inputs.push(el("input", { type: "number", step: "any", value: spec.range ? spec.range[0] : 0,
                                "aria-label": `${t.input}[${i}]` }));
    }
    const out = el("div", { class: "result", "aria-live": "polite" });
    const form = el("form", { novalidate: "" }, el("div", { class: "controls fields" },
      ...inputs.map((input, i) => el("label", {}, `${t.input}[${i}] `, input)),
      el("button", { text: "Infer" })), out);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const data = inputs.map((input) => (input.value.trim() === "" ? null : Number(input.value)));
      try {
        outputs(out, await infer(t, t.input, [1, t.features], data));
      } catch (err) { showError(out, err); }
    });
    return form;
  },

  // A model that takes text: type it, the server tokenizes it as training did and makes the padding masks.
  text(m, t) {
    const unit = t.level === "char" ? "characters" : "words";
    // No maxlength: the browser would cut a longer text short without a word; the server says it is too long.
    const input = el("input", { type: "text", name: "text",
                                "aria-label": `${t.input} (text, at most ${t.max_length} ${unit})`, required: "" });
    const out = el("div", { class: "result", "aria-live": "polite" });
    const form = el("form", { novalidate: "" }, el("div", { class: "controls" },
      el("label", {}, `${t.input} `, input), el("button", { text: "Infer" })),
      el("p", { class: "note", text: `text, at most ${t.max_length} ${unit}; tokenized by the server` }), out);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const body = { inputs: [{ name: t.input, shape: [1], datatype: "BYTES", data: [input.value] }] };
      try {
        const answer = await post(t.endpoint, JSON.stringify(body));
        const target = answer.outputs.find((o) => o.name === t.target);
        if (t.classification) bars(out, softmax(target.data), m.contract.classes);
        else outputs(out, answer);
      } catch (err) { showError(out, err); }
    });
    return form;
  },

  // Anything else: the v2 request body itself, with an example of the right shape.
  json(m, t) {
    const DATATYPES = { float32: "FP32", int64: "INT64", bool: "BOOL" };
    const example = { inputs: m.contract.inputs.map((s) => {
      const shape = [1, ...s.shape.slice(1).map((d) => (typeof d === "string" ? 1 : d))];  // a varying size: 1
      const count = shape.reduce((a, b) => a * b, 1);
      const value = s.dtype === "bool" ? false : (s.range ? s.range[0] : 0);
      return { name: s.name, shape, datatype: DATATYPES[s.dtype] || "FP32", data: new Array(count).fill(value) };
    }) };
    const text = el("textarea", { rows: 6, spellcheck: "false", "aria-label": "request body" });
    text.value = JSON.stringify(example);
    const out = el("div", { class: "result", "aria-live": "polite" });
    const form = el("form", {}, text, el("div", { class: "controls" }, el("button", { text: "Infer" })), out);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      try { outputs(out, await post(t.endpoint, text.value)); } catch (err) { showError(out, err); }
    });
    return form;
  },
};

function outputs(out, answer) {
  out.replaceChildren(...answer.outputs.map((o) => el("p", { class: "answer" }, `${o.name} = `,
    el("strong", { "data-field": "output", text: o.data.map((v) => num(v, 6)).join(", ") }))));
}

main();
