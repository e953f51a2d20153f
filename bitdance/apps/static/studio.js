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
  if (m.kind === "text_to_image") {
    p.prompt = $("prompt").value;
    if (m.any_resolution) { p.height = num($("height").value); p.width = num($("width").value); }
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
  const what = p.prompt !== undefined ? "\u201c" + p.prompt + "\u201d " + p.height + "x" + p.width
    : "class " + p.classes.map(c => names ? c + " " + names[c] : c).join(", ");
  const who = S.info.models.length > 1 ? p.model + " (P " + p.parallel_num + "x) \u00b7 " : "";
  return who + what + " \u00b7 " + p.num_images + " img \u00b7 seed " + p.seed + " \u00b7 " + p.steps + " steps \u00b7 cfg " + p.guidance;
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
    if (s.images.length > 1) s.images.forEach((u, k) =>
      card.append(el("a", {href: u, download: "bitdance-" + s.id + "-" + k + ".png", title: "image " + (k + 1)}, "#" + (k + 1))));
    h.append(card);
  }
}

init().catch(err => { $("error").textContent = "could not load the model info: " + err; });
