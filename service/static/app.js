// vitserve demo page: a browser client of the public API (the routes the SDK uses), nothing more.
//
//   GET  /v1/models                         the model list and each model's facts
//   POST /v1/models/{name}/classify         top-k predictions, once per image
//   POST /v1/models/{name}/attention        the attention map as JSON (format=json), once per image and method
//
// The image stays in the page: changing the method, layer, head, discard ratio or the class a relevance map
// explains asks for the new map with the same bytes (no re-upload by the user, no new classification), maps
// already fetched are cached, and the opacity slider and patch grid only redraw the canvas. The classes offered
// for a relevance map are the image's predictions.
//
// API keys: the page learns that the server wants one from a 401 (the first call, GET /v1/models, gets it), then
// shows the key form. The key is kept in sessionStorage (this tab only, gone when it closes), sent as
// `Authorization: Bearer`, never put in a URL, the DOM after submitting, or the console.
"use strict";

(() => {
  const VIEW_SIDE = 640; // the attention canvas' long side, in canvas pixels
  const TOP_K = 5;
  const PAD_BACKGROUND = "#000";
  const PAD_INK = "#fff";
  const DRAW_SETTLE_MS = 350; // classify a drawing this long after the pen lifts, unless it goes down again
  const KEY_STORAGE = "vitserve.apiKey"; // sessionStorage, not localStorage: the key leaves with the tab
  // Inferno: the same anchors as service/core/overlay.py, so the page and the PNG overlay read alike.
  const INFERNO = [
    [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99],
    [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164],
  ];
  const LUT = buildLut(INFERNO, 256);
  const ERROR_TITLES = {
    bad_image: "Not a readable image",
    bad_request: "Bad request",
    unauthorized: "API key needed",
    not_found: "Not found",
    payload_too_large: "Too large",
    unsupported_media_type: "Not an accepted image type",
    invalid_parameter: "Invalid parameter",
    unavailable: "The server is not ready",
    overloaded: "The server is busy",
    internal_error: "Server error",
    network: "Cannot reach the server",
  };

  const $ = (id) => document.getElementById(id);
  const el = {
    main: $("main"),
    model: $("model"),
    message: $("message"),
    messageTitle: $("message-title"),
    messageText: $("message-text"),
    messageClose: $("message-close"),
    keyForm: $("key-form"),
    apiKey: $("api-key"),
    keyForget: $("key-forget"),
    dropzone: $("dropzone"),
    pick: $("pick"),
    file: $("file"),
    fileName: $("file-name"),
    pad: $("pad"),
    padEmpty: $("pad-empty"),
    brush: $("brush"),
    clear: $("clear"),
    view: $("view"),
    placeholder: $("placeholder"),
    spinner: $("spinner"),
    caption: $("map-caption"),
    method: $("method"),
    target: $("target"),
    layer: $("layer"),
    head: $("head"),
    fusion: $("fusion"),
    discard: $("discard"),
    discardValue: $("discard-value"),
    opacity: $("opacity"),
    opacityValue: $("opacity-value"),
    grid: $("grid"),
    predictions: $("predictions"),
    predictionsEmpty: $("predictions-empty"),
    timing: $("timing"),
    facts: $("facts"),
  };

  const state = {
    models: [],
    model: null, // the selected model's info from /v1/models
    image: null, // { blob, name, source: "file" | "paste" | "drop" | "drawing" }
    bitmap: null, // the decoded image for the canvas (null when this browser cannot decode it)
    maps: new Map(), // attention query string -> response, for the current image and model
    map: null, // the attention response drawn now
    imageToken: 0, // bumps with every new image or model: late answers for an older one are dropped
    loadingImage: false, // classify + first map in flight: a control change waits for them (see setImage)
    mapToken: 0,
    keyRequired: false, // the server answered 401 once: the key form stays on screen
  };

  class ApiError extends Error {
    constructor(status, code, message, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  // ---- talking to the API -------------------------------------------------------------------------------

  async function api(path, options) {
    const key = storedKey();
    const headers = new Headers(options && options.headers);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      throw new ApiError(0, "network", `the request did not reach the server (${err.message})`, null);
    }
    if (response.ok) return response.json();
    let error = null;
    try {
      error = (await response.json()).error;
    } catch {
      // not our JSON error body (a proxy's page, say): fall back to the status line
    }
    const message = (error && error.message) || `${response.status} ${response.statusText}`.trim();
    if (response.status === 401) {
      state.keyRequired = true;
      if (key && storedKey() === key) forgetKey(); // refused: asking again beats resending a wrong key
    }
    throw new ApiError(response.status, error && error.code, message, response.headers.get("retry-after"));
  }

  // ---- the API key ---------------------------------------------------------------------------------------

  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return ""; // storage disabled: the page works as on a keyless server
    }
  }

  function storeKey(key) {
    try {
      sessionStorage.setItem(KEY_STORAGE, key);
    } catch {
      // storage disabled: nothing to keep the key in, so the next call gets the 401 again
    }
  }

  function forgetKey() {
    try {
      sessionStorage.removeItem(KEY_STORAGE);
    } catch {
      // nothing stored
    }
  }

  function syncKeyForm() {
    const key = storedKey();
    el.keyForm.hidden = !state.keyRequired && !key;
    el.keyForget.hidden = !key;
    el.apiKey.placeholder = key ? "a key is set for this tab; enter another to replace it" : "paste your API key";
  }

  function imageForm() {
    const form = new FormData();
    form.append("file", state.image.blob, state.image.name);
    return form;
  }

  function modelPath(route) {
    return `/v1/models/${encodeURIComponent(state.model.name)}/${route}`;
  }

  function classifyImage() {
    const k = Math.min(TOP_K, state.model.labels_count);
    return api(`${modelPath("classify")}?top_k=${k}`, { method: "POST", body: imageForm() });
  }

  function attentionQuery() {
    const params = new URLSearchParams({ format: "json", top_k: "1", method: el.method.value });
    if (el.method.value === "relevance") {
      if (el.target.value !== "") params.set("target", el.target.value);
      return params.toString();
    }
    const oneHead = el.method.value === "layer" && el.head.value !== "";
    if (el.method.value === "layer") {
      params.set("layer", el.layer.value);
      if (oneHead) params.set("head", el.head.value);
    }
    if (!oneHead) params.set("head_fusion", el.fusion.value);
    if (el.method.value === "rollout" && Number(el.discard.value) > 0) params.set("discard_ratio", el.discard.value);
    return params.toString();
  }

  async function fetchAttention(query) {
    const body = await api(`${modelPath("attention")}?${query}`, { method: "POST", body: imageForm() });
    body.query = query; // which controls it answers: the canvas says so in data-map
    return body;
  }

  // ---- page state ---------------------------------------------------------------------------------------

  function setState(name) {
    el.main.dataset.state = name;
    const busy = name === "busy" || name === "loading";
    el.main.setAttribute("aria-busy", String(busy));
    el.spinner.hidden = name !== "busy";
  }

  function showError(err) {
    const title = ERROR_TITLES[err.code] || (err.status ? `Error ${err.status}` : "Error");
    let text = err.message;
    if (err.status) text += ` (HTTP ${err.status}${err.code ? `, ${err.code}` : ""})`;
    if (err.retryAfter) text += ` Try again in ${err.retryAfter} s.`;
    el.messageTitle.textContent = `${title}:`;
    el.messageText.textContent = text;
    el.message.dataset.status = String(err.status || 0);
    el.message.hidden = false;
  }

  function hideMessage() {
    el.message.hidden = true;
  }

  function fail(err) {
    if (!(err instanceof ApiError)) {
      console.error(err); // a bug in this page, not an answer from the server
      err = new ApiError(0, null, String(err.message || err), null);
    }
    showError(err);
    syncKeyForm();
    setState(err.status === 401 ? "key" : "error");
    if (err.status === 401) el.apiKey.focus();
  }

  // ---- models -------------------------------------------------------------------------------------------

  async function loadModels() {
    setState("loading");
    let list;
    try {
      list = await api("/v1/models");
    } catch (err) {
      el.model.replaceChildren(new Option("No models", ""));
      fail(err);
      return false;
    }
    state.models = list.models;
    el.model.replaceChildren(
      ...list.models.map((m) => new Option(`${m.name} (${m.precision})`, m.name, false, m.name === list.default)),
    );
    el.model.disabled = list.models.length < 2;
    selectModel(list.default);
    syncKeyForm();
    setState("idle");
    return true;
  }

  function selectModel(name) {
    state.model = state.models.find((m) => m.name === name) || state.models[0];
    el.model.value = state.model.name;
    const m = state.model;
    el.layer.replaceChildren(
      ...Array.from({ length: m.layers }, (_, i) =>
        new Option(i === m.layers - 1 ? `${i + 1} (last)` : String(i + 1), String(i)),
      ),
    );
    el.layer.value = String(m.layers - 1);
    el.head.replaceChildren(
      new Option("all (fused)", ""),
      ...Array.from({ length: m.heads }, (_, i) => new Option(String(i + 1), String(i))),
    );
    syncControls();
    renderFacts(m);
  }

  // Whether the selected model draws the chosen map: relevance maps come from their own graph (FP32 exports).
  function canMap() {
    if (!state.model) return false;
    return el.method.value === "relevance" ? Boolean(state.model.relevance) : Boolean(state.model.attention);
  }

  // The classes a relevance map may explain: the top prediction (the server's default), then each prediction.
  function setTargets(predictions) {
    const chosen = el.target.value;
    el.target.replaceChildren(
      new Option("top prediction", ""),
      ...predictions.map((p) => new Option(`${p.label} (${percent(p.probability)})`, String(p.index))),
    );
    el.target.value = predictions.some((p) => String(p.index) === chosen) ? chosen : "";
  }

  function syncControls() {
    const m = state.model;
    const relevanceOption = el.method.querySelector('option[value="relevance"]');
    relevanceOption.disabled = !(m && m.relevance);
    if (m && !m.relevance && el.method.value === "relevance") el.method.value = "rollout";
    if (m && !m.attention && m.relevance) el.method.value = "relevance";
    const attention = canMap();
    const layer = el.method.value === "layer";
    const relevance = el.method.value === "relevance";
    el.method.disabled = !(m && (m.attention || m.relevance));
    el.target.disabled = !attention || !relevance;
    el.layer.disabled = !attention || !layer;
    el.head.disabled = !attention || !layer;
    el.fusion.disabled = !attention || relevance || (layer && el.head.value !== "");
    el.discard.disabled = !attention || el.method.value !== "rollout";
    el.opacity.disabled = !attention;
    el.grid.disabled = !state.model;
  }

  // ---- an image: classify it and fetch its map ----------------------------------------------------------

  async function setImage(blob, name, source) {
    if (!state.model) return;
    state.image = { blob, name, source };
    el.fileName.textContent = source === "drawing" ? "" : `${name} · ${formatBytes(blob.size)}`;
    const token = ++state.imageToken;
    state.maps.clear();
    state.map = null;
    setTargets([]); // another image, other predictions: a relevance map starts from the top one
    state.loadingImage = true;
    hideMessage();
    setState("busy");
    // The browser decodes only for the picture; whether the bytes are an image is the server's call.
    const bitmap = createImageBitmap(blob).catch(() => null);
    const query = attentionQuery();
    try {
      const [classified, attention, decoded] = await Promise.all([
        classifyImage(),
        canMap() ? fetchAttention(query) : null,
        bitmap,
      ]);
      if (token !== state.imageToken) return;
      state.loadingImage = false;
      state.bitmap = decoded;
      if (attention) state.maps.set(query, attention);
      renderPredictions(classified);
      if (attention && attentionQuery() !== query) {
        draw(); // the new image now, its map for the controls as they are next
        updateMap(); // the controls changed while the first map was on its way
        return;
      }
      state.map = attention;
      draw();
      setState("ready");
    } catch (err) {
      if (token !== state.imageToken) return;
      state.loadingImage = false;
      state.image = null;
      state.bitmap = null;
      clearResults();
      fail(err);
    }
  }

  async function updateMap() {
    syncControls();
    if (!state.image || !canMap() || state.loadingImage) return;
    const query = attentionQuery();
    const cached = state.maps.get(query);
    if (cached) {
      state.mapToken++; // an answer still on its way is for a choice already left
      state.map = cached;
      draw();
      setState("ready");
      return;
    }
    const imageToken = state.imageToken;
    const token = ++state.mapToken;
    setState("busy");
    try {
      const attention = await fetchAttention(query);
      state.maps.set(query, attention);
      if (token !== state.mapToken || imageToken !== state.imageToken) return;
      state.map = attention;
      draw();
      setState("ready");
    } catch (err) {
      if (token === state.mapToken && imageToken === state.imageToken) fail(err);
    }
  }

  function clearResults() {
    el.predictions.replaceChildren();
    el.predictionsEmpty.hidden = false;
    el.timing.textContent = "";
    el.caption.textContent = "";
    draw();
  }

  // ---- predictions and facts ----------------------------------------------------------------------------

  function renderPredictions(body) {
    el.predictions.replaceChildren(
      ...body.predictions.map((p, i) => {
        const row = document.createElement("li");
        row.className = i === 0 ? "bar-row top" : "bar-row";
        row.dataset.label = p.label;
        row.dataset.probability = String(p.probability);
        const label = span("bar-label", p.label);
        label.title = p.label;
        const track = span("bar-track");
        track.setAttribute("aria-hidden", "true");
        const fill = span("bar-fill");
        track.append(fill);
        row.append(label, track, span("bar-value", percent(p.probability)));
        // Set after insertion so the bar grows (CSSOM: allowed under a CSP without 'unsafe-inline').
        requestAnimationFrame(() => {
          fill.style.width = `${(Math.max(0, Math.min(1, p.probability)) * 100).toFixed(2)}%`;
        });
        return row;
      }),
    );
    el.predictionsEmpty.hidden = true;
    setTargets(body.predictions);
    const t = body.timings;
    el.timing.textContent = `${t.total_ms.toFixed(1)} ms on the server (inference ${t.inference_ms.toFixed(1)} ms)`;
  }

  function renderFacts(m) {
    const p = m.parity;
    const parity = document.createDocumentFragment();
    parity.append(badge(p.passed ? "passed" : "failed", p.passed ? "ok" : "bad"), ` against ${p.reference}`);
    const checks = [`max |Δ logit| ${sci(p.max_abs_logit_diff)} (tolerance ${sci(p.tolerance)})`];
    if (p.max_abs_attention_diff != null) checks.push(`max |Δ attention| ${sci(p.max_abs_attention_diff)}`);
    if (p.max_abs_relevance_diff != null) checks.push(`max |Δ relevance| ${sci(p.max_abs_relevance_diff)}`);
    if (p.top1_agreement != null) checks.push(`top-1 agreement ${percent(p.top1_agreement)}`);
    if (p.accuracy_delta_points != null) checks.push(`accuracy Δ ${p.accuracy_delta_points.toFixed(2)} points`);
    const list = document.createElement("ul");
    list.className = "checks";
    list.append(...checks.map((text) => Object.assign(document.createElement("li"), { textContent: text })));
    parity.append(list);
    const pre = m.preprocessing;
    const rows = [
      ["Model", `${m.name} v${m.version}`],
      ["Input size", `${m.input_size[1]} × ${m.input_size[0]} px`],
      ["Patches", `${m.patch_size} px → ${m.grid.width} × ${m.grid.height} grid`],
      ["Layers", String(m.layers)],
      ["Heads", String(m.heads)],
      ["Classes", String(m.labels_count)],
      ["Provider", m.provider],
      ["Precision", m.precision],
      ["Attention", m.attention ? "exported" : "not in this artifact"],
      ["Relevance", m.relevance ? "exported" : m.precision === "fp32" ? "not in this artifact" : "FP32 models only"],
      ["Preprocessing", `${pre.resize.replace("_", " ")} ${pre.resize_size[0]}, crop ${pre.crop_size[1]} × ${pre.crop_size[0]}, ${pre.interpolation}`],
      ["Source", [m.source.framework, m.source.model].filter(Boolean).join(" · ")],
      ["Parity", parity],
    ];
    el.facts.replaceChildren(
      ...rows.flatMap(([term, value]) => {
        const dt = document.createElement("dt");
        dt.textContent = term;
        const dd = document.createElement("dd");
        dd.append(value);
        return [dt, dd];
      }),
    );
  }

  // ---- the attention canvas -----------------------------------------------------------------------------

  function draw() {
    const canvas = el.view;
    const ctx = canvas.getContext("2d");
    const m = state.model;
    if (!state.image || !m) {
      canvas.classList.add("empty");
      canvas.dataset.map = "";
      el.placeholder.hidden = false;
      return;
    }
    canvas.classList.remove("empty");
    el.placeholder.hidden = true;
    const bmp = state.bitmap;
    const [w, h] = bmp ? [bmp.width, bmp.height] : [m.input_size[1], m.input_size[0]];
    const scale = VIEW_SIDE / Math.max(w, h);
    canvas.width = Math.max(1, Math.round(w * scale));
    canvas.height = Math.max(1, Math.round(h * scale));
    const W = canvas.width;
    const H = canvas.height;
    ctx.clearRect(0, 0, W, H);
    if (bmp) {
      ctx.imageSmoothingEnabled = scale < 1; // shrink smoothly, enlarge crisply: a 32 px digit stays sharp
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(bmp, 0, 0, W, H);
    } else {
      ctx.fillStyle = "#222";
      ctx.fillRect(0, 0, W, H);
    }
    // The map covers the model's input: the part of the image that the preprocessing's crop keeps.
    const [l, t, r, b] = cropBox(w, h, m.preprocessing).map((v) => v * scale);
    const covers = l <= 0 && t <= 0 && r >= W && b >= H;
    if (!covers) {
      ctx.fillStyle = "rgba(0, 0, 0, 0.55)";
      ctx.beginPath();
      ctx.rect(0, 0, W, H);
      ctx.rect(l, t, r - l, b - t);
      ctx.fill("evenodd");
    }
    const map = state.map;
    if (map) {
      ctx.save();
      ctx.globalAlpha = Number(el.opacity.value) / 100;
      ctx.imageSmoothingEnabled = true; // the patch grid upsampled smoothly, as the PNG overlay does
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(heatmap(map.map), l, t, r - l, b - t);
      ctx.restore();
    }
    if (el.grid.checked) drawGrid(ctx, [l, t, r, b], m.grid);
    if (!covers) {
      ctx.strokeStyle = "rgba(235, 235, 235, 0.9)";
      ctx.lineWidth = 2;
      ctx.strokeRect(l - 1, t - 1, r - l + 2, b - t + 2);
    }
    canvas.dataset.map = map ? map.query : "";
    el.caption.textContent = map ? describe(map) : canMap() ? "" : "this model has no such map (see its facts)";
    const top = map && map.predictions[0];
    canvas.setAttribute(
      "aria-label",
      map ? `Attention map (${describe(map)}) over the image${top ? `; top prediction ${top.label}` : ""}` : "The image",
    );
  }

  function heatmap(rows) {
    const gh = rows.length;
    const gw = rows[0].length;
    const small = document.createElement("canvas");
    small.width = gw;
    small.height = gh;
    const ctx = small.getContext("2d");
    const pixels = ctx.createImageData(gw, gh);
    for (let y = 0; y < gh; y++) {
      for (let x = 0; x < gw; x++) {
        const v = Math.max(0, Math.min(1, rows[y][x]));
        const c = LUT[Math.round(v * (LUT.length - 1))];
        const i = (y * gw + x) * 4;
        pixels.data[i] = c[0];
        pixels.data[i + 1] = c[1];
        pixels.data[i + 2] = c[2];
        pixels.data[i + 3] = 255;
      }
    }
    ctx.putImageData(pixels, 0, 0);
    return small;
  }

  function drawGrid(ctx, [l, t, r, b], grid) {
    ctx.save();
    ctx.strokeStyle = "rgba(255, 255, 255, 0.35)";
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let i = 1; i < grid.width; i++) {
      const x = Math.round(l + ((r - l) * i) / grid.width) + 0.5;
      ctx.moveTo(x, t);
      ctx.lineTo(x, b);
    }
    for (let i = 1; i < grid.height; i++) {
      const y = Math.round(t + ((b - t) * i) / grid.height) + 0.5;
      ctx.moveTo(l, y);
      ctx.lineTo(r, y);
    }
    ctx.stroke();
    ctx.restore();
  }

  function describe(map) {
    const p = map.params;
    const fusion = p.head_fusion || "mean";
    if (map.method === "relevance") {
      const top = map.target.index === map.predictions[0].index ? ", the top prediction" : "";
      return `relevance for class ${map.target.label}${top}: attention weighted by its gradient, all layers`;
    }
    if (map.method === "rollout") {
      const discarded = p.discard_ratio ? `, weakest ${Math.round(p.discard_ratio * 100)}% discarded per layer` : "";
      return `rollout over all layers, heads fused by ${fusion}${discarded}`;
    }
    if (map.method === "cls") return `class-token attention, last layer, heads fused by ${fusion}`;
    const layers = state.model.layers;
    const layer = p.layer < 0 ? layers + p.layer : p.layer;
    const head = p.head == null ? `heads fused by ${fusion}` : `head ${p.head + 1} of ${state.model.heads}`;
    return `layer ${layer + 1} of ${layers}, ${head}`;
  }

  // The region of an image of w x h pixels that the model sees, in its pixels: service/preprocessing.py's
  // crop_box (torchvision's truncating resize and round-half-even crop offset for "shortest_edge",
  // transformers' floor offset for "squash").
  function cropBox(w, h, pre) {
    let rw;
    let rh;
    if (pre.resize === "squash") {
      [rh, rw] = pre.resize_size;
    } else {
      const short = Math.min(w, h);
      const long = Math.max(w, h);
      const newShort = pre.resize_size[0];
      const newLong = Math.trunc((newShort * long) / short);
      [rw, rh] = w <= h ? [newShort, newLong] : [newLong, newShort];
    }
    const [ch, cw] = pre.crop_size;
    const left = cropOffset(rw, cw, pre.resize);
    const top = cropOffset(rh, ch, pre.resize);
    return [(left * w) / rw, (top * h) / rh, ((left + cw) * w) / rw, ((top + ch) * h) / rh];
  }

  function cropOffset(length, crop, resize) {
    if (resize === "squash") return Math.floor((length - crop) / 2);
    if (crop > length) return -Math.floor((crop - length) / 2);
    return roundHalfEven((length - crop) / 2);
  }

  function roundHalfEven(x) {
    const f = Math.floor(x);
    if (x - f !== 0.5) return Math.round(x);
    return f % 2 === 0 ? f : f + 1;
  }

  function buildLut(anchors, size) {
    const out = [];
    for (let i = 0; i < size; i++) {
      const pos = (i / (size - 1)) * (anchors.length - 1);
      const k = Math.min(Math.floor(pos), anchors.length - 2);
      const f = pos - k;
      out.push(anchors[k].map((a, c) => Math.round(a + (anchors[k + 1][c] - a) * f)));
    }
    return out;
  }

  // ---- the drawing pad ----------------------------------------------------------------------------------

  const pad = el.pad.getContext("2d");
  let pen = null; // the last point while the pen is down
  let settle = 0;
  let padInked = false;

  function clearPad() {
    pad.fillStyle = PAD_BACKGROUND;
    pad.fillRect(0, 0, el.pad.width, el.pad.height);
    padInked = false;
    el.padEmpty.hidden = false;
  }

  function padPoint(event) {
    const rect = el.pad.getBoundingClientRect();
    return [
      ((event.clientX - rect.left) * el.pad.width) / rect.width,
      ((event.clientY - rect.top) * el.pad.height) / rect.height,
    ];
  }

  function stroke(from, to) {
    pad.strokeStyle = PAD_INK;
    pad.lineWidth = Number(el.brush.value);
    pad.lineCap = "round";
    pad.lineJoin = "round";
    pad.beginPath();
    pad.moveTo(from[0], from[1]);
    pad.lineTo(to[0], to[1]);
    pad.stroke();
  }

  el.pad.addEventListener("pointerdown", (event) => {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    event.preventDefault();
    clearTimeout(settle);
    el.pad.setPointerCapture(event.pointerId);
    pen = padPoint(event);
    stroke(pen, pen); // a dot for a tap
    padInked = true;
    el.padEmpty.hidden = true;
  });

  el.pad.addEventListener("pointermove", (event) => {
    if (!pen) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const e of events.length ? events : [event]) {
      const point = padPoint(e);
      stroke(pen, point);
      pen = point;
    }
  });

  function penUp() {
    if (!pen) return;
    pen = null;
    clearTimeout(settle);
    settle = setTimeout(() => {
      if (padInked) el.pad.toBlob((blob) => blob && setImage(blob, "drawing.png", "drawing"), "image/png");
    }, DRAW_SETTLE_MS);
  }

  el.pad.addEventListener("pointerup", penUp);
  el.pad.addEventListener("pointercancel", penUp);

  el.clear.addEventListener("click", () => {
    clearTimeout(settle);
    clearPad();
    if (state.image && state.image.source === "drawing") {
      state.imageToken++;
      state.loadingImage = false;
      state.image = null;
      state.bitmap = null;
      state.map = null;
      clearResults();
      hideMessage();
      setState("idle");
    }
  });

  // ---- files: pick, drop, paste -------------------------------------------------------------------------

  el.pick.addEventListener("click", () => el.file.click());
  el.file.addEventListener("change", () => {
    const file = el.file.files[0];
    if (file) setImage(file, file.name, "file");
    el.file.value = ""; // picking the same file again is a new request
  });

  // The whole page takes a drop (a near miss must not navigate away); the drop zone shows it.
  let dragDepth = 0;
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth++;
    el.dropzone.classList.add("dragging");
  });
  document.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) el.dropzone.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    el.dropzone.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (file) setImage(file, file.name, "drop");
  });

  document.addEventListener("paste", (event) => {
    const files = Array.from((event.clipboardData && event.clipboardData.files) || []);
    const file = files.find((f) => f.type.startsWith("image/")) || files[0];
    if (!file) return;
    event.preventDefault();
    setImage(file, file.name || "pasted image", "paste");
  });

  function hasFiles(event) {
    return Boolean(event.dataTransfer && Array.from(event.dataTransfer.types).includes("Files"));
  }

  // ---- controls -----------------------------------------------------------------------------------------

  el.model.addEventListener("change", () => {
    selectModel(el.model.value);
    state.map = null;
    if (state.image) {
      setImage(state.image.blob, state.image.name, state.image.source);
    } else {
      draw();
    }
  });
  for (const control of [el.method, el.target, el.layer, el.head, el.fusion, el.discard]) {
    control.addEventListener("change", updateMap); // a slider: once it is let go, not at every step
  }
  el.discard.addEventListener("input", () => {
    el.discardValue.value = `${Math.round(Number(el.discard.value) * 100)}%`;
  });
  el.opacity.addEventListener("input", () => {
    el.opacityValue.value = `${el.opacity.value}%`;
    draw();
  });
  el.grid.addEventListener("change", draw);
  el.messageClose.addEventListener("click", hideMessage);

  el.keyForm.addEventListener("submit", (event) => {
    event.preventDefault(); // no navigation: the key never reaches a URL (and the CSP allows no form action)
    const key = el.apiKey.value.trim();
    if (!key) {
      el.apiKey.focus();
      return;
    }
    storeKey(key);
    el.apiKey.value = ""; // kept in sessionStorage only, not in the page
    hideMessage();
    reload();
  });
  el.keyForget.addEventListener("click", () => {
    forgetKey();
    syncKeyForm();
    reload();
  });

  function reload() {
    // The models again, with the key as it is now; an image on screen is classified again once they load.
    const image = state.image;
    state.imageToken++;
    state.loadingImage = false;
    state.image = null;
    state.map = null;
    clearResults();
    loadModels().then((loaded) => {
      if (loaded && image) setImage(image.blob, image.name, image.source);
    });
  }

  // ---- small helpers ------------------------------------------------------------------------------------

  function span(className, text) {
    const s = document.createElement("span");
    s.className = className;
    if (text != null) s.textContent = text;
    return s;
  }

  function badge(text, kind) {
    const b = span(`badge ${kind}`, text);
    return b;
  }

  function percent(p) {
    if (p > 0 && p < 0.001) return "<0.1%";
    return `${(p * 100).toFixed(1)}%`;
  }

  function sci(x) {
    if (x == null) return "n/a";
    return x === 0 ? "0" : x.toExponential(1);
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  }

  clearPad();
  el.opacityValue.value = `${el.opacity.value}%`;
  el.discardValue.value = `${Math.round(Number(el.discard.value) * 100)}%`;
  syncKeyForm();
  draw();
  loadModels();
})();
