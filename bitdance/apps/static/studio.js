"use strict";
const $ = id => document.getElementById(id);
// Also a hook for the browser test: every progress step and preview the page received.
const S = window.studio = {info: null, progressSteps: [], previewCount: 0, lastPreview: null, current: null, done: []};
const picked = new Set();

function el(tag, props, text) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  if (text !== undefined) e.textContent = text;  // never innerHTML: class names and prompts are data
  return e;
}

function kindName(m) { return m.kind === "text_to_image" ? "text-to-image" : "class-conditional"; }

async function init() {
  const info = S.info = await (await fetch("/api/info")).json();
  S.models = Object.fromEntries(info.models.map(m => [m.name, m]));
  if (info.models.length > 1) {  // one model: no selector, the page is as it always was
    for (const m of info.models)
      $("modelsel").append(el("option", {value: m.name}, m.name + " \u2014 P " + m.parallel_num + "x, " + m.ar_steps +
        " AR steps, " + m.resolution + " px, " + kindName(m)));  // P first: a narrow select cuts the end
    $("modelsel").addEventListener("change", () => useModel($("modelsel").value));
    $("modelbox").hidden = false;
  }
  $("prompt").maxLength = info.limits.prompt_chars;
  const count = () => $("count").textContent = $("prompt").value.length + " / " + info.limits.prompt_chars;
  $("prompt").addEventListener("input", count); count();
  useModel(info.default_model);
  await loadHistory();
}

// Show the inputs of model `name`: its class picker or prompt box, resolutions and defaults. Seed and
// steps stay as typed; guidance and the number of images reset only when the kind changes.
function useModel(name) {
  const prev = S.model, info = S.model = S.models[name];
  $("modelsel").value = name; $("modelsel").title = $("modelsel").selectedOptions[0]?.textContent || "";
  $("model").textContent = (S.info.models.length > 1 ? name + ": " : "") + info.description;
  const d = info.defaults;
  if (!prev) { $("steps").value = d.steps; $("seed").value = d.seed; }
  if (!prev || prev.kind !== info.kind) { $("guidance").value = d.guidance; $("num").value = d.num_images; }
  $("num").max = info.max_images;
  $("t2i").hidden = info.kind !== "text_to_image"; $("cc").hidden = info.kind === "text_to_image";
  if (info.kind === "text_to_image") {
    $("resolution").replaceChildren();
    $("resolution").hidden = info.any_resolution; $("anyres").hidden = !info.any_resolution;
    if (info.any_resolution) {
      $("height").value = d.height; $("width").value = d.width;
      $("height").step = $("width").step = info.resolution_unit;
    } else {
      for (const [h, w] of info.resolutions) {
        const o = el("option", {value: h + "x" + w}, h + " x " + w);
        if (h === d.height && w === d.width) o.selected = true;
        $("resolution").append(o);
      }
    }
  } else {
    const n = info.num_classes, names = info.class_names;
    picked.clear(); $("classes").replaceChildren(); $("classids").value = "";
    $("classes").hidden = n > 100; $("classids").hidden = n <= 100;
    if (n <= 100) {
      $("classhint").textContent = "(click to pick one or more)";
      for (let i = 0; i < n; i++) {
        const b = el("button", {type: "button", title: "class " + i}, names ? i + " " + names[i] : String(i));
        b.dataset.cls = i;
        b.addEventListener("click", () => {
          picked.has(i) ? picked.delete(i) : picked.add(i);
          b.classList.toggle("on", picked.has(i));
          if (picked.size > +$("num").value) $("num").value = Math.min(picked.size, info.max_images);
        });
        $("classes").append(b);
      }
    } else {
      $("classhint").textContent = "(ids 0 to " + (n - 1) + ", comma separated)";
    }
  }
}

// The server takes JSON numbers only (no coercion); text that is no number is sent as typed, so the
// server's message names the field.
const num = v => (String(v).trim() !== "" && Number.isFinite(Number(v))) ? Number(v) : v;

function payload() {
  const m = S.model;
  const p = {model: m.name, num_images: num($("num").value), seed: 0, steps: num($("steps").value),
             guidance: num($("guidance").value)};
  if (S.edit) p.edit = {source: S.edit.source, mask: mask.toDataURL("image/png")};
  if (m.kind === "text_to_image") {
    p.prompt = $("prompt").value;
    if (S.edit) { /* an edit keeps the image's size */ }
    else if (m.any_resolution) { p.height = num($("height").value); p.width = num($("width").value); }
    else { const [h, w] = $("resolution").value.split("x"); p.height = +h; p.width = +w; }
  } else {
    p.schedule = $("schedule").value;
    p.classes = m.num_classes <= 100 ? [...picked].sort((a, b) => a - b)
      : $("classids").value.split(/[\s,]+/).filter(s => s.length).map(num);
  }
  return p;
}

// Seeds go up to 2^63 - 1, past what a JS number holds exactly (2^53): their digits go into the JSON text.
function body() {
  const p = payload(), seed = $("seed").value.trim();
  if (/^\d+$/.test(seed)) return JSON.stringify(p).replace('"seed":0', '"seed":' + seed.replace(/^0+(?=\d)/, ""));
  p.seed = num(seed);
  return JSON.stringify(p);
}

$("dice").addEventListener("click", e => { e.preventDefault(); $("seed").value = Math.floor(Math.random() * 2 ** 31); });

$("form").addEventListener("submit", async e => {
  e.preventDefault();
  $("error").textContent = "";
  let r, j;
  try {
    r = await fetch("/api/generate", {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: body()});
    j = await r.json();
  } catch (err) { $("error").textContent = "the server did not answer: " + err; return; }
  if (!r.ok) { $("error").textContent = j.error || ("HTTP " + r.status); return; }
  watch(j.id);
});

function watch(id) {
  S.current = id;
  $("editor").hidden = true;
  $("preview").hidden = true; $("placeholder").hidden = false; $("bar").value = 0;
  const es = new EventSource("/api/jobs/" + id + "/events");
  es.onmessage = ev => {
    const s = JSON.parse(ev.data);
    if (s.status === "done" || s.status === "error") es.close();
    if (S.current === id) show(s);
    if (s.status === "done") { S.done.push(id); loadHistory(); }
  };
  es.onerror = () => { if (es.readyState === EventSource.CLOSED && S.current === id) $("status").textContent = "connection lost"; };
}

function show(s) {
  const st = $("status");
  if (s.status === "queued") st.textContent = s.position ? "Waiting: " + s.position + " request(s) ahead of yours" : "Starting...";
  else if (s.status === "running") st.textContent = "Generating: step " + s.step + " / " + (s.num_steps || "?");
  else if (s.status === "done") st.textContent = "Done in " + s.seconds + " s";
  else { st.textContent = "Failed"; $("error").textContent = s.error; }
  $("bar").max = s.num_steps || 1; $("bar").value = s.status === "done" ? $("bar").max : s.step;
  $("detail").textContent = describe(s.params);
  if (s.preview) {
    S.progressSteps.push(s.preview.step);
    if (s.preview.src !== S.lastPreview) { S.previewCount++; S.lastPreview = s.preview.src; }
    setImage(s.preview.src);
  }
  if (s.status === "done") setImage(s.grid_url);
}

function setImage(src) { $("preview").src = src; $("preview").hidden = false; $("placeholder").hidden = true; }

function describe(p) {
  if (!p) return "";
  const m = S.models[p.model] || S.model, names = m.class_names;
  const edited = p.edit ? " \u00b7 edit of " + p.edit.source + " (" + Math.round(100 * p.edit.masked) + "% painted)" : "";
  const what = p.prompt !== undefined ? "\u201c" + p.prompt + "\u201d " + p.height + "x" + p.width
    : "class " + p.classes.map(c => names ? c + " " + names[c] : c).join(", ");
  const who = S.info.models.length > 1 ? p.model + " (P " + p.parallel_num + "x) \u00b7 " : "";
  return who + what + edited + " \u00b7 " + p.num_images + " img \u00b7 seed " + p.seed + " \u00b7 " + p.steps + " steps \u00b7 cfg " + p.guidance;
}

async function loadHistory() {
  const items = await (await fetch("/api/history")).json();
  const h = $("history");
  h.replaceChildren();
  if (!items.length) { h.append(el("span", {className: "hint"}, "no results yet")); return; }
  for (const s of items) {
    const card = el("div", {className: "item"});
    card.dataset.job = s.id;
    card.append(el("img", {src: s.grid_url, alt: describe(s.params), title: describe(s.params)}));
    card.append(el("div", {className: "meta"}, describe(s.params) + " \u00b7 " + s.seconds + " s"));
    const dl = el("a", {className: "download", href: s.grid_url, download: "bitdance-" + s.id + ".png"}, "Download");
    card.append(dl);
    const ed = el("a", {className: "edit", href: "#", title: "paint a region of this result and regenerate it"}, "Edit");
    ed.addEventListener("click", e => { e.preventDefault(); editResult(s); });
    card.append(ed);
    if (s.images.length > 1) s.images.forEach((u, k) =>
      card.append(el("a", {href: u, download: "bitdance-" + s.id + "-" + k + ".png", title: "image " + (k + 1)}, "#" + (k + 1))));
    h.append(card);
  }
}

// ---- editing: an image (an upload or a result) and a painted mask (white = regenerate) ----
const mask = document.createElement("canvas");  // image-sized: black, painted white; sent as PNG
S.edit = null;

// The size an upload is cropped and scaled to: the model's images, or the chosen text-to-image resolution.
function targetSize() {
  const m = S.model;
  if (m.kind !== "text_to_image") return m.resolutions[0];
  if (m.any_resolution) return [+$("height").value, +$("width").value];
  return $("resolution").value.split("x").map(Number);
}

function startEdit(img, source) {
  const upload = source === "upload";
  const [h, w] = upload ? targetSize() : [img.naturalHeight, img.naturalWidth];
  const c = $("editimg"), v = $("maskview");
  c.width = v.width = mask.width = w; c.height = v.height = mask.height = h;
  const ctx = c.getContext("2d");
  if (upload) {  // centre crop to the target's aspect, then scale
    const s = Math.max(w / img.naturalWidth, h / img.naturalHeight), sw = w / s, sh = h / s;
    ctx.drawImage(img, (img.naturalWidth - sw) / 2, (img.naturalHeight - sh) / 2, sw, sh, 0, 0, w, h);
    source = c.toDataURL("image/png");
  } else {
    ctx.drawImage(img, 0, 0);
  }
  const scale = Math.min(384 / w, 384 / h);
  for (const e of [c, v]) { e.style.width = w * scale + "px"; e.style.height = h * scale + "px"; }
  S.edit = {source, w, h, painted: 0};
  clearMask();
  $("editor").hidden = false; $("preview").hidden = true; $("placeholder").hidden = true;
  $("edittools").hidden = false;
  $("edithint").textContent = w + " x " + h + " px: paint on the image what to regenerate";
  $("go").textContent = "Regenerate the painted region";
}

function stopEdit() {
  S.edit = null; $("upload").value = "";
  $("editor").hidden = $("edittools").hidden = true;
  $("go").textContent = "Generate";
}

function clearMask() {
  const m = mask.getContext("2d");
  m.fillStyle = "#000"; m.fillRect(0, 0, mask.width, mask.height);
  $("maskview").getContext("2d").clearRect(0, 0, mask.width, mask.height);
  if (S.edit) S.edit.painted = 0;
}

function editResult(s) {
  const img = new Image();
  img.onload = () => startEdit(img, {job: s.id, index: 0});
  img.src = s.images[0];
}

$("upload").addEventListener("change", () => {
  const f = $("upload").files[0];
  if (!f) return;
  const reader = new FileReader();  // a data: URL (the page's CSP allows data: images, not blob:)
  reader.onload = () => { const img = new Image(); img.onload = () => startEdit(img, "upload"); img.src = reader.result; };
  reader.readAsDataURL(f);
});
$("clearmask").addEventListener("click", clearMask);
$("stopedit").addEventListener("click", stopEdit);
$("brush").addEventListener("input", () => $("brushpx").textContent = $("brush").value + " px");

let last = null;
function paint(ev) {
  const v = $("maskview"), r = v.getBoundingClientRect();
  const x = (ev.clientX - r.left) * v.width / r.width, y = (ev.clientY - r.top) * v.height / r.height;
  const width = Math.max(1, +$("brush").value * v.width / r.width);  // the brush is in screen pixels
  for (const [ctx, colour] of [[mask.getContext("2d"), "#fff"], [v.getContext("2d"), "#ff3b3b"]]) {
    ctx.strokeStyle = ctx.fillStyle = colour; ctx.lineWidth = width; ctx.lineCap = "round";
    ctx.beginPath();
    if (last) { ctx.moveTo(last[0], last[1]); ctx.lineTo(x, y); ctx.stroke(); }
    else { ctx.arc(x, y, width / 2, 0, 2 * Math.PI); ctx.fill(); }
  }
  last = [x, y];
  S.edit.painted++;
}
$("maskview").addEventListener("pointerdown", e => { if (!S.edit) return; last = null; $("maskview").setPointerCapture(e.pointerId); paint(e); });
$("maskview").addEventListener("pointermove", e => { if (S.edit && e.buttons) paint(e); });
$("maskview").addEventListener("pointerup", () => { last = null; });

init().catch(err => { $("error").textContent = "could not load the model info: " + err; });
