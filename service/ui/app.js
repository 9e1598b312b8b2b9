// The web page of the image-classifier service: jobs, models, datasets and classify, over the /v1 API only.
// Plain JavaScript, no build step, no dependency; every request goes to this page's own origin.
//
// - api() sends the bearer key when one was given; a 401 opens the key dialog (once for every waiting
//   request) and the request is retried with the new key. The key lives in sessionStorage: this tab only.
// - A job is followed over its Server-Sent Events stream, read with fetch() (EventSource cannot send the
//   Authorization header) and parsed here; a few streams at most, since a browser opens only ~6 connections
//   per host and the page needs some for everything else.
// - Uploads use XMLHttpRequest for its upload progress events; PNGs and downloads are fetched with the key
//   and shown or saved as blob: URLs.
"use strict";

(() => {
  // ----- small DOM helpers -----

  const $ = (selector, root = document) => root.querySelector(selector);
  const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));
  const SVG_NS = "http://www.w3.org/2000/svg";

  /** An element: h("p", {class: "x", onclick: fn, dataset: {k: "v"}}, "text", child, [more]). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  /** An SVG element, same calling convention. */
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (name === "dataset") Object.assign(el.dataset, value);
      else if (name === "text") el.textContent = value;
      else el.setAttribute(name, value === true ? "" : String(value));
    }
  }

  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  /** Replace `old` by `fresh`, keeping the focus (and a typed value) on the control with the same data-key. */
  function replaceKeepingFocus(old, fresh) {
    const active = document.activeElement;
    const key = active && old.contains(active) ? active.dataset.key : undefined;
    const typed = key && "value" in active ? active.value : undefined;
    old.replaceWith(fresh);
    if (!key) return;
    const again = fresh.querySelector(`[data-key="${CSS.escape(key)}"]`);
    if (!again) return;
    if (typed !== undefined && again.tagName === "INPUT") again.value = typed;
    again.focus();
  }

  /** Show `keyed` elements (each with a unique id) in `list` in this order, reusing unchanged ones. */
  function renderKeyed(list, items, render, signature) {
    const seen = new Set();
    let position = 0;
    for (const item of items) {
      const sig = signature(item);
      const id = render.idOf(item);
      seen.add(id);
      let el = document.getElementById(id);
      if (!el || el.dataset.sig !== sig) {
        const fresh = render(item);
        fresh.id = id;
        fresh.dataset.sig = sig;
        if (el) replaceKeepingFocus(el, fresh);
        el = fresh;
      }
      if (list.children[position] !== el) list.insertBefore(el, list.children[position] || null);
      position += 1;
    }
    for (const child of Array.from(list.children)) if (!seen.has(child.id)) child.remove();
  }

  // ----- formatting -----

  const pct = (x) => (typeof x === "number" ? `${(x * 100).toFixed(1)}%` : "–");
  const fixed = (x, digits = 3) => (typeof x === "number" ? x.toFixed(digits) : "–");
  const count = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : "–");
  const when = (iso) => (iso ? new Date(iso).toLocaleString([], { dateStyle: "medium", timeStyle: "short" }) : "–");

  function bytes(n) {
    if (typeof n !== "number") return "–";
    const units = ["B", "KB", "MB", "GB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
  }

  function seconds(total) {
    if (typeof total !== "number") return "–";
    if (total < 60) return `${total.toFixed(1)} s`;
    const m = Math.floor(total / 60);
    return `${m} min ${Math.round(total - m * 60)} s`;
  }

  function randomKey() {  // crypto.randomUUID needs a secure context; getRandomValues does not
    return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // ----- notices -----

  let noticeTimer = 0;

  /** A short message at the top of the page (an error when `error`). */
  function notify(message, error = false) {
    const notice = $("#notice");
    notice.textContent = message;
    notice.classList.toggle("bad", error);
    notice.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { notice.hidden = true; }, error ? 12000 : 6000);
  }

  function showError(el, message) {
    el.textContent = message || "";
    el.hidden = !message;
  }

  /** Run an async handler; what it throws becomes a notice instead of an unhandled rejection. */
  function guarded(fn) {
    return (...args) => Promise.resolve().then(() => fn(...args)).catch((err) => {
      if (err && err.name === "AbortError") return;
      notify(err && err.message ? err.message : String(err), true);
    });
  }

  // ----- the API, with the key -----

  const KEY_STORAGE = "tl-api-key";
  let apiKey = sessionStorage.getItem(KEY_STORAGE);
  let keyPrompt = null;

  class ApiError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  /** A problem+json answer as one sentence: its detail, and where each invalid field is. */
  function problemText(status, body) {
    if (!body || typeof body !== "object") return `the service answered ${status}`;
    let text = body.detail || body.title || body.error || `the service answered ${status}`;
    if (typeof text !== "string") text = JSON.stringify(text);
    if (Array.isArray(body.errors) && body.errors.length) {
      const fields = body.errors.map((e) => {
        const where = (e.loc || []).filter((part) => part !== "body").join(".");
        return where ? `${where}: ${e.msg}` : e.msg;
      });
      if (!fields.some((f) => text.includes(f))) text = `${text} (${fields.join("; ")})`;
    }
    return text;
  }

  /** Open the key dialog (one for every request that is waiting); resolves once a key is entered. */
  function askKey(refused, detail) {
    if (!keyPrompt) {
      keyPrompt = new Promise((resolve) => {
        const dialog = $("#key-dialog");
        const message = $("#key-message");
        message.textContent = refused
          ? `That key was not accepted (${detail || "invalid bearer token"}). Check TL_API_KEY and try again.`
          : "This service needs its API key (TL_API_KEY). It is kept for this tab only.";
        message.classList.toggle("bad", refused);
        const form = $("#key-form");
        const input = $("#key-input");
        input.value = "";
        form.onsubmit = (event) => {
          event.preventDefault();
          const key = input.value.trim();
          if (!key) { input.focus(); return; }
          apiKey = key;
          sessionStorage.setItem(KEY_STORAGE, key);
          $("#forget-key").hidden = false;
          dialog.close();
          keyPrompt = null;
          resolve();
        };
        if (!dialog.open) dialog.showModal();
        input.focus();
      });
    }
    return keyPrompt;
  }

  function withKey(headers) {
    const all = new Headers(headers || {});
    if (apiKey) all.set("Authorization", `Bearer ${apiKey}`);
    return all;
  }

  async function bodyOf(response) {
    const type = response.headers.get("content-type") || "";
    if (!type.includes("json")) return null;
    try { return await response.json(); } catch { return null; }
  }

  /** fetch() of a same-origin path with the key; a 401 asks for the key and tries again. */
  async function api(path, options = {}) {
    for (;;) {
      const sent = apiKey;
      const response = await fetch(path, { ...options, headers: withKey(options.headers), credentials: "omit" });
      if (response.status !== 401) return response;
      const body = await bodyOf(response);
      if (apiKey !== sent) continue;  // another request brought a new key meanwhile
      if (sent) sessionStorage.removeItem(KEY_STORAGE);
      await askKey(Boolean(sent), body && body.detail);
    }
  }

  /** A JSON call: the parsed body of a 2xx answer (null for 204), else an ApiError with the problem's text. */
  async function apiJSON(path, options = {}) {
    const init = { ...options, headers: { Accept: "application/json", ...(options.headers || {}) } };
    if (options.json !== undefined) {
      init.method = init.method || "POST";
      init.body = JSON.stringify(options.json);
      init.headers["Content-Type"] = "application/json";
      delete init.json;
    }
    const response = await api(path, init);
    const body = response.status === 204 ? null : await bodyOf(response);
    if (!response.ok) throw new ApiError(response.status, problemText(response.status, body), body);
    return body;
  }

  /** A multipart upload with progress: resolves {status, body}; `onProgress(loaded, total)`. */
  function uploadWithProgress(path, form, onProgress, onStart) {
    return new Promise((resolve, reject) => {
      const sent = apiKey;
      const xhr = new XMLHttpRequest();
      xhr.open("POST", path);
      xhr.responseType = "text";
      xhr.setRequestHeader("Accept", "application/json");
      if (apiKey) xhr.setRequestHeader("Authorization", `Bearer ${apiKey}`);
      xhr.upload.onprogress = (event) => onProgress(event.loaded, event.lengthComputable ? event.total : 0);
      xhr.onload = () => {
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch { body = null; }
        if (xhr.status === 401 && apiKey === sent) {
          if (sent) sessionStorage.removeItem(KEY_STORAGE);
          askKey(Boolean(sent), body && body.detail)
            .then(() => uploadWithProgress(path, form, onProgress, onStart)).then(resolve, reject);
        } else if (xhr.status === 401) {
          uploadWithProgress(path, form, onProgress, onStart).then(resolve, reject);
        } else {
          resolve({ status: xhr.status, body });
        }
      };
      xhr.onerror = () => reject(new Error("the upload failed: the connection to the service was lost"));
      xhr.onabort = () => reject(new DOMException("upload stopped", "AbortError"));
      onStart(xhr);
      xhr.send(form);  // FormData: the browser sets multipart/form-data with its boundary
    });
  }

  /** The events of a text/event-stream response, as {event, data} objects (comments skipped). */
  async function* eventStream(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let event = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (!line || line.startsWith(":")) continue;
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "event") event = text;
            else if (field === "data") data.push(text);
          }
          if (data.length) yield { event, data: data.join("\n") };
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  /** A PNG of the API as a blob: URL (cached: model and dataset files never change). */
  const imageCache = new Map();

  function apiImage(path) {
    if (!imageCache.has(path)) {
      const loading = api(path).then(async (response) => {
        if (!response.ok) {
          const body = await bodyOf(response);
          throw new ApiError(response.status, problemText(response.status, body), body);
        }
        return URL.createObjectURL(await response.blob());
      });
      loading.catch(() => imageCache.delete(path));
      imageCache.set(path, loading);
    }
    return imageCache.get(path);
  }

  // Images load when they scroll into view.
  const imageObserver = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      imageObserver.unobserve(entry.target);
      loadImage(entry.target);
    }
  }, { rootMargin: "200px" });

  function loadImage(img) {
    apiImage(img.dataset.src).then((url) => { img.src = url; }, (err) => {
      const note = h("p", { class: "muted" }, `Not available: ${err.message}`);
      img.replaceWith(note);
    });
  }

  function lazyImage(path, alt) {
    const img = h("img", { alt, dataset: { src: path }, decoding: "async" });
    imageObserver.observe(img);
    return img;
  }

  // ----- views (#jobs, #models, #datasets, #classify; #models/<id> scrolls to a model) -----

  const VIEWS = ["jobs", "models", "datasets", "classify"];
  let currentView = null;

  function route() {
    const [name, target] = location.hash.replace(/^#/, "").split("/");
    let view = name || "jobs";
    if (!VIEWS.includes(view)) {  // e.g. #main from the skip link: stay where we are
      if (currentView) return;
      view = "jobs";
    }
    for (const v of VIEWS) $(`#view-${v}`).hidden = v !== view;
    for (const link of $$("nav a")) {
      if (link.dataset.view === view) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    const changed = currentView !== view;
    currentView = view;
    if (changed && ready) refreshView(view);
    if (target) showTarget(view, decodeURIComponent(target));
  }

  function go(view, target) {
    const hash = target ? `#${view}/${encodeURIComponent(target)}` : `#${view}`;
    if (location.hash === hash) route();
    else location.hash = hash;
  }

  function showTarget(view, target) {
    if (view === "models") {
      const card = document.getElementById(`model-${target}`);
      if (card) { card.scrollIntoView({ block: "start" }); $("h4", card).focus(); }
    } else if (view === "classify") {
      const select = $("#classify-model");
      if (Array.from(select.options).some((o) => o.value === target)) select.value = target;
    }
  }

  function refreshView(view) {
    const load = { jobs: loadJobs, models: loadModels, datasets: loadDatasets, classify: loadModels }[view];
    guarded(load)();
  }

  // ----- health (open endpoint) -----

  async function loadHealth() {
    const el = $("#health");
    try {
      const response = await fetch("/readyz", { headers: { Accept: "application/json" }, credentials: "omit" });
      const body = await bodyOf(response);
      if (!response.ok || !body) {
        el.textContent = "Redis unavailable: jobs cannot start";
        el.className = "health bad";
      } else if (!body.workers) {
        el.textContent = "No training worker running: new jobs will wait";
        el.className = "health warn";
      } else {
        el.textContent = `Ready · ${body.workers} worker${body.workers === 1 ? "" : "s"}`;
        el.className = "health ok";
      }
    } catch {
      el.textContent = "The service does not answer";
      el.className = "health bad";
    }
  }

  // ----- jobs -----

  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const MAX_STREAMS = 3;
  const JOBS_PAGE = 20;
  const jobs = new Map();  // id -> Job
  let jobOrder = [];  // ids, newest first
  let jobsCursor = null;
  let olderLoaded = false;
  const streams = new Map();  // id -> AbortController

  async function loadJobs() {
    const page = await apiJSON(`/v1/jobs?limit=${JOBS_PAGE}`);
    for (const job of page.items) mergeJob(job);
    if (!olderLoaded) jobsCursor = page.next_cursor;
    showJobs(page.items);
    followJobs();
  }

  async function loadOlderJobs() {
    if (!jobsCursor) return;
    const page = await apiJSON(`/v1/jobs?limit=${JOBS_PAGE}&cursor=${encodeURIComponent(jobsCursor)}`);
    for (const job of page.items) mergeJob(job);
    olderLoaded = true;
    jobsCursor = page.next_cursor;
    showJobs(page.items);
  }

  /** Add jobs to the list shown (every job seen stays, newest first). */
  function showJobs(items) {
    const ids = new Set([...jobOrder, ...items.map((job) => job.id)]);
    jobOrder = [...ids].sort((a, b) => (jobs.get(b).created_at || "").localeCompare(jobs.get(a).created_at || ""));
    renderJobs();
  }

  /** Take a newer view of a job; a job that just succeeded brings its model into the model list. */
  function mergeJob(job) {
    const before = jobs.get(job.id);
    jobs.set(job.id, job);
    if (job.status === "succeeded" && before && before.status !== "succeeded") guarded(loadModels)();
    return before;
  }

  function updateJob(job) {
    mergeJob(job);
    showJobs([job]);
  }

  function renderJobs() {
    const list = $("#job-list");
    renderKeyed(list, jobOrder.map((id) => jobs.get(id)), jobCard,
      (job) => JSON.stringify([job.status, job.progress, job.history.length, job.error, job.model_id]));
    $("#jobs-empty").hidden = jobOrder.length > 0;
    $("#jobs-more").hidden = !jobsCursor;
  }

  /** Follow the newest unfinished jobs over SSE, a few at a time. */
  function followJobs() {
    for (const id of jobOrder) {
      if (streams.size >= MAX_STREAMS) break;
      const job = jobs.get(id);
      if (job && !TERMINAL.has(job.status) && !streams.has(id)) follow(id);
    }
  }

  async function follow(id, attempt = 0) {
    const controller = new AbortController();
    streams.set(id, controller);
    let gotEvent = false;
    try {
      const response = await api(`/v1/jobs/${encodeURIComponent(id)}/events`, {
        headers: { Accept: "text/event-stream" }, signal: controller.signal, cache: "no-store",
      });
      if (!response.ok) {
        const body = await bodyOf(response);
        throw new ApiError(response.status, problemText(response.status, body), body);
      }
      for await (const message of eventStream(response)) {
        if (message.event !== "job") continue;
        gotEvent = true;
        updateJob(JSON.parse(message.data));
      }
    } catch (err) {
      if (err.name === "AbortError") return;
      if (err instanceof ApiError && err.status === 404) return;  // the record expired
    } finally {
      streams.delete(id);
    }
    const job = jobs.get(id);
    if (job && !TERMINAL.has(job.status) && attempt < 20) {
      // The stream ended before the job did (a restart, a proxy): come back in a moment.
      setTimeout(() => { if (!streams.has(id)) follow(id, gotEvent ? 0 : attempt + 1); }, 1000 + attempt * 1000);
    } else {
      followJobs();
    }
  }

  const STAGES = {
    queued: "queued", loading_data: "loading data", extracting_features: "extracting features",
    training: "training", fine_tuning: "fine-tuning", evaluating: "evaluating", saving: "saving", done: "done",
  };

  function jobCard(job) {
    const spec = job.spec || {};
    const p = job.progress || {};
    const progressId = `progress-${job.id}`;
    const title = spec.name || `${spec.model} job`;
    const stage = STAGES[p.stage] || p.stage || "";
    const epochText = p.epochs ? `, epoch ${p.epoch} of ${p.epochs}` : "";
    const fraction = TERMINAL.has(job.status) && job.status === "succeeded" ? 1 : p.fraction || 0;
    const duration = job.started_at && job.finished_at
      ? ` · took ${seconds((Date.parse(job.finished_at) - Date.parse(job.started_at)) / 1000)}` : "";
    return h("li", { class: `card job status-${job.status}` },
      h("div", { class: "card-head" },
        h("h4", {}, title, " ", h("span", { class: "id" }, job.id)),
        h("span", { class: `badge ${job.status}` }, job.status)),
      h("p", { class: "meta" },
        `${spec.model} on ${datasetName(spec.dataset)} · ${spec.epochs} epoch${spec.epochs === 1 ? "" : "s"}`,
        spec.train_samples ? ` · ${count(spec.train_samples)} train / ${count(spec.test_samples)} test images` : "",
        ` · created ${when(job.created_at)}${duration}`),
      h("div", { class: "progress-row" },
        h("label", { for: progressId }, `Stage: ${stage}${epochText}`),
        h("progress", { id: progressId, max: 1, value: fraction }, pct(fraction)),
        h("span", { class: "pct" }, pct(fraction))),
      job.error ? h("p", { class: "error job-error", tabindex: 0, dataset: { key: `error-${job.id}` } },
        h("strong", {}, `${job.error.type || "Error"}: `), job.error.message || "") : null,
      job.history && job.history.length ? curves(job) : null,
      job.metrics ? h("p", { class: "metrics" },
        `Test accuracy ${pct(job.metrics.test_accuracy)}`,
        typeof job.metrics.macro_f1 === "number" ? ` · macro F1 ${fixed(job.metrics.macro_f1)}` : "",
        ` · ${count(job.metrics.params_total)} parameters`) : null,
      h("p", { class: "actions" },
        TERMINAL.has(job.status) ? null : h("button", {
          type: "button", class: "danger", dataset: { key: `cancel-${job.id}` },
          disabled: job.status === "cancelling", onclick: guarded(() => cancelJob(job.id)),
        }, job.status === "cancelling" ? "Cancelling…" : "Cancel"),
        job.model_id ? h("a", { href: `#models/${encodeURIComponent(job.model_id)}`, class: "button quiet" },
          "Open its model") : null));
  }
  jobCard.idOf = (job) => `job-${job.id}`;

  async function cancelJob(id) {
    // No body, but a JSON content type: state-changing requests always say what they carry.
    const job = await apiJSON(`/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST", json: {} });
    updateJob(job);
    notify(`Job ${id}: ${job.status}`);
  }

  // Curves: accuracy and loss per epoch, train and test, as inline SVG.

  function curves(job) {
    const history = job.history;
    const epochs = Math.max(job.progress && job.progress.epochs ? job.progress.epochs : 0,
      history[history.length - 1].epoch, 1);
    const series = (key) => history.filter((e) => typeof e[key] === "number").map((e) => [e.epoch, e[key]]);
    const losses = history.flatMap((e) => [e.loss, e.val_loss]).filter((v) => typeof v === "number" && isFinite(v));
    const maxLoss = Math.max(...losses, 0.1) * 1.1;
    return h("div", { class: "charts" },
      chart("Accuracy", epochs, 1, [["train", series("accuracy")], ["test", series("val_accuracy")]], pct),
      chart("Loss", epochs, maxLoss, [["train", series("loss")], ["test", series("val_loss")]], (v) => fixed(v, 3)));
  }

  function chart(title, epochs, yMax, series, format) {
    const W = 320, H = 170, L = 48, R = 14, T = 28, B = 26;
    const x = (epoch) => (epochs <= 1 ? L + (W - L - R) / 2 : L + ((epoch - 1) / (epochs - 1)) * (W - L - R));
    const y = (value) => T + (1 - Math.min(Math.max(value / yMax, 0), 1)) * (H - T - B);
    const last = series.map(([name, points]) =>
      points.length ? `${name} ${format(points[points.length - 1][1])}` : null).filter(Boolean);
    const lastEpoch = Math.max(0, ...series.flatMap(([, points]) => points.map((pt) => pt[0])));
    const label = `${title} per epoch: ${last.join(", ")} after epoch ${lastEpoch} of ${epochs}`;
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, class: "chart" },
      s("title", {}, label),
      s("text", { x: L, y: 14, class: "chart-title" }, title),
      // legend
      series.map(([name], i) => s("g", { class: `legend s-${name}` },
        s("line", { x1: W - 130 + i * 66, y1: 11, x2: W - 112 + i * 66, y2: 11 }),
        s("text", { x: W - 108 + i * 66, y: 15 }, name))),
      // grid and y labels
      [0, 0.5, 1].map((f) => s("g", { class: "grid" },
        s("line", { x1: L, x2: W - R, y1: y(f * yMax), y2: y(f * yMax) }),
        s("text", { x: L - 4, y: y(f * yMax) + 4, "text-anchor": "end" }, format(f * yMax)))),
      // x labels
      [...new Set([1, Math.ceil(epochs / 2), epochs])].map((e) =>
        s("text", { x: x(e), y: H - 8, "text-anchor": "middle", class: "axis" }, String(e))),
      series.map(([name, points]) => s("g", { class: `series s-${name}` },
        points.length > 1 ? s("polyline", { points: points.map(([e, v]) => `${x(e)},${y(v)}`).join(" ") }) : null,
        points.map(([e, v]) => s("circle", { cx: x(e), cy: y(v), r: 3 },
          s("title", {}, `${name} ${title.toLowerCase()}, epoch ${e}: ${format(v)}`))))));
    return h("figure", { class: "chart-box" }, svg,
      h("figcaption", { class: "visually-hidden" }, label));
  }

  // Start a job.

  function readJobForm(form) {
    const f = form.elements;
    const body = { model: f.model.value, dataset: f.dataset.value };
    const number = (name, parse = Number) => {
      const raw = f[name].value.trim();
      if (raw === "") return;
      const value = parse(raw);
      if (Number.isNaN(value)) throw new Error(`${name.replace(/_/g, " ")} must be a number`);
      body[name] = value;
    };
    for (const name of ["epochs", "train_samples", "test_samples", "batch_size", "seed"]) number(name, (v) => Number(v));
    number("learning_rate");
    const name = f.name.value.trim();
    if (name) body.name = name;
    if (f.class_weight.checked) body.class_weight = "balanced";
    const augment = $$('input[name="augment"]:checked', form).map((el) => el.value);
    if (augment.length) body.augment = augment;
    if (body.model === "transfer") {
      for (const field of ["image_size", "dropout", "fine_tune_layers", "fine_tune_epochs", "fine_tune_learning_rate"]) {
        number(field);
      }
      if (f.alpha.value) body.alpha = Number(f.alpha.value);
      const units = f.dense_units.value.trim();
      if (units) {
        body.dense_units = units.toLowerCase() === "none" ? [] : units.split(/[\s,]+/).filter(Boolean).map(Number);
        if (body.dense_units.some(Number.isNaN)) throw new Error("dense units: numbers separated by commas");
      }
    }
    return body;
  }

  async function startJob(event) {
    event.preventDefault();
    const form = event.currentTarget;
    const error = $("#job-form-error");
    showError(error, "");
    let body;
    try { body = readJobForm(form); } catch (err) { showError(error, err.message); return; }
    const button = $('button[type="submit"]', form);
    button.disabled = true;
    try {
      const job = await apiJSON("/v1/jobs", { method: "POST", json: body, headers: { "Idempotency-Key": randomKey() } });
      updateJob(job);
      followJobs();
      notify(`Job ${job.id} queued`);
    } catch (err) {
      showError(error, `Not started: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  }

  function syncTransferFields() {
    const form = $("#job-form");
    const transfer = form.elements.model.value === "transfer";
    $("#transfer-fields").disabled = !transfer;
    const uploaded = form.elements.dataset.value !== "cifar10";
    for (const name of ["train_samples", "test_samples"]) {
      const input = form.elements[name];
      input.min = uploaded ? 1 : 100;
      input.placeholder = uploaded ? "all" : name === "train_samples" ? "5000" : "1000";
    }
  }

  // ----- models -----

  let models = [];

  async function loadModels() {
    const page = await apiJSON("/v1/models");
    models = page.items;
    renderModels();
  }

  const modelLabel = (m) => (m.name ? `${m.name} (${m.id})` : m.id);

  function modelFormats(model) {
    if (model.exports && typeof model.exports === "object" && Object.keys(model.exports).length) {
      const formats = Object.keys(model.exports);
      return formats.includes("keras") ? formats : ["keras", ...formats];
    }
    return ["keras", "tflite"];
  }

  function renderModels() {
    const list = $("#model-list");
    const aliasNames = models.flatMap((m) => m.aliases || []);
    renderKeyed(list, models, modelCard, (m) => JSON.stringify([m.aliases, m.name, Object.keys(m.exports || {})]));
    $("#models-empty").hidden = models.length > 0;
    let datalist = $("#alias-names");
    if (!datalist) { datalist = h("datalist", { id: "alias-names" }); document.body.append(datalist); }
    datalist.replaceChildren(...[...new Set(["default", ...aliasNames])].map((a) => h("option", { value: a })));
    fillModelSelects();
  }

  function fillModelSelects() {
    const preferred = (models.find((m) => (m.aliases || []).includes("default")) || models[0] || {}).id;
    for (const select of $$(".model-select")) {
      const before = select.value;
      const options = models.map((m) => h("option", { value: m.id },
        `${modelLabel(m)}${m.aliases && m.aliases.length ? ` [${m.aliases.join(", ")}]` : ""}`));
      select.replaceChildren(...options);
      const fallback = select.name === "b" && models[1] ? models[1].id : preferred;
      select.value = models.some((m) => m.id === before) ? before : fallback || "";
      select.disabled = models.length === 0;
    }
  }

  function modelCard(model) {
    const m = model.metrics || {};
    const ref = encodeURIComponent(model.id);
    const aliasInput = `alias-${model.id}`;
    return h("li", { class: "card model" },
      h("div", { class: "card-head" },
        h("h4", { tabindex: -1 }, model.name || model.id, " ", model.name ? h("span", { class: "id" }, model.id) : null),
        h("span", { class: "badge kind" }, model.kind)),
      h("dl", { class: "facts" },
        fact("Dataset", model.dataset ? model.dataset.name || model.dataset.id : "CIFAR-10"),
        fact("Test accuracy", pct(m.test_accuracy)),
        fact("Macro F1", fixed(m.macro_f1)),
        fact("Parameters", `${count(m.params_total)}${typeof m.params_trainable !== "number" ? ""
          : m.params_trainable === m.params_total ? " (all trainable)" : ` (${count(m.params_trainable)} trainable)`}`),
        fact("Classes", String((model.classes || []).length)),
        fact("Trained", `${model.spec ? model.spec.epochs : "?"} epochs in ${seconds(m.train_seconds)}`),
        fact("Created", when(model.created_at))),
      h("div", { class: "aliases" },
        h("h5", {}, "Aliases"),
        (model.aliases || []).length
          ? h("ul", { class: "chips" }, model.aliases.map((alias) => h("li", { class: "chip" }, alias,
            h("button", {
              type: "button", class: "chip-remove", "aria-label": `Remove alias ${alias}`, title: `Remove alias ${alias}`,
              dataset: { key: `unalias-${model.id}-${alias}` }, onclick: guarded(() => removeAlias(alias)),
            }, "×"))))
          : h("p", { class: "muted" }, "none"),
        h("form", { class: "inline", novalidate: true, onsubmit: guarded((event) => setAlias(event, model)) },
          h("label", { for: aliasInput }, "Set or move alias"),
          h("input", {
            id: aliasInput, name: "alias", type: "text", list: "alias-names", placeholder: "default",
            pattern: "[a-z][a-z0-9_\\-]{0,31}", maxlength: 32, autocomplete: "off", required: true,
            dataset: { key: `alias-input-${model.id}` },
          }),
          h("button", { type: "submit", dataset: { key: `alias-set-${model.id}` } }, "Set"))),
      h("div", { class: "figures" },
        h("figure", {}, lazyImage(`/v1/models/${ref}/curves.png`, `Training curves of ${modelLabel(model)}`),
          h("figcaption", {}, "Accuracy and loss per epoch")),
        h("figure", {}, lazyImage(`/v1/models/${ref}/confusion.png`, `Confusion matrix of ${modelLabel(model)}`),
          h("figcaption", {}, "Confusion matrix (test subset)"))),
      downloads(model),
      h("p", { class: "actions" },
        h("button", { type: "button", dataset: { key: `classify-${model.id}` }, onclick: () => go("classify", model.id) },
          "Classify with it"),
        h("button", {
          type: "button", class: "danger", dataset: { key: `delete-${model.id}` },
          onclick: guarded(() => deleteModel(model)),
        }, "Delete")));
  }
  modelCard.idOf = (model) => `model-${model.id}`;

  /** The model's formats: a download button each, with the export's size and its check against Keras. */
  function downloads(model) {
    const formats = modelFormats(model);
    const info = (format) => (model.exports && model.exports[format]) || {};
    const checked = formats.some((f) => f !== "keras" && typeof info(f).top1_agreement === "number");
    return h("div", { class: "downloads" },
      h("h5", {}, "Download"),
      h("div", { class: "table-wrap" }, h("table", { class: "formats" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Format"), h("th", { scope: "col" }, "Size"),
          checked ? h("th", { scope: "col", title: "top-1 agreement with the Keras model on the test subset" },
            "Agrees") : null,
          checked ? h("th", { scope: "col" }, "Test accuracy") : null)),
        h("tbody", {}, formats.map((format) => {
          const e = info(format);
          return h("tr", {},
            h("th", { scope: "row" }, h("button", {
              type: "button", class: "quiet", dataset: { key: `dl-${model.id}-${format}` },
              onclick: guarded((event) => download(event.currentTarget, model, format)),
            }, format)),
            h("td", {}, bytes(e.bytes)),
            checked ? h("td", {}, format === "keras" ? "–" : pct(e.top1_agreement)) : null,
            checked ? h("td", {}, pct(e.test_accuracy)) : null);
        })))));
  }

  function fact(term, value) {
    return h("div", {}, h("dt", {}, term), h("dd", {}, value));
  }

  async function setAlias(event, model) {
    event.preventDefault();
    const input = event.currentTarget.elements.alias;
    const alias = input.value.trim();
    if (!/^[a-z][a-z0-9_-]{0,31}$/.test(alias)) {
      notify("An alias is 1 to 32 lowercase letters, digits, - or _, starting with a letter", true);
      input.focus();
      return;
    }
    const previous = models.find((m) => m.id !== model.id && (m.aliases || []).includes(alias));
    await apiJSON(`/v1/aliases/${encodeURIComponent(alias)}`, { method: "PUT", json: { model_id: model.id } });
    notify(previous ? `Alias ${alias} moved from ${modelLabel(previous)} to ${modelLabel(model)}`
      : `Alias ${alias} now points at ${modelLabel(model)}`);
    await loadModels();
  }

  async function removeAlias(alias) {
    await apiJSON(`/v1/aliases/${encodeURIComponent(alias)}`, { method: "DELETE" });
    notify(`Alias ${alias} removed`);
    await loadModels();
  }

  async function deleteModel(model) {
    const aliases = (model.aliases || []).length ? ` Its aliases (${model.aliases.join(", ")}) go with it.` : "";
    if (!window.confirm(`Delete model ${modelLabel(model)}?${aliases} This cannot be undone.`)) return;
    await apiJSON(`/v1/models/${encodeURIComponent(model.id)}`, { method: "DELETE" });
    notify(`Model ${modelLabel(model)} deleted`);
    await loadModels();
  }

  const EXTENSIONS = { keras: ".keras", tflite: ".tflite", "tflite-float16": "-float16.tflite",
    "tflite-int8": "-int8.tflite", savedmodel: "-savedmodel.tar.gz" };

  async function download(button, model, format) {
    const label = button.textContent;
    button.disabled = true;
    button.textContent = `${format}: downloading…`;
    try {
      const query = format === "keras" ? "" : `?format=${encodeURIComponent(format)}`;
      const response = await api(`/v1/models/${encodeURIComponent(model.id)}/weights${query}`);
      if (!response.ok) {
        const body = await bodyOf(response);
        throw new ApiError(response.status, `${format}: ${problemText(response.status, body)}`, body);
      }
      const disposition = response.headers.get("content-disposition") || "";
      const named = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
      const filename = named ? decodeURIComponent(named[1]) : `${model.id}${EXTENSIONS[format] || `.${format}`}`;
      const url = URL.createObjectURL(await response.blob());
      const link = h("a", { href: url, download: filename, hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  }

  // Compare two models side by side.

  function compare(event) {
    event.preventDefault();
    const f = event.currentTarget.elements;
    const a = models.find((m) => m.id === f.a.value);
    const b = models.find((m) => m.id === f.b.value);
    const out = $("#compare-result");
    if (!a || !b) { out.replaceChildren(h("p", { class: "muted" }, "Pick two models.")); return; }
    const ma = a.metrics || {}, mb = b.metrics || {};
    const better = (x, y, higher = true) => (typeof x === "number" && typeof y === "number" && x !== y
      ? ((x > y) === higher ? "a" : "b") : "");
    const rows = [
      ["Kind", a.kind, b.kind, ""],
      ["Dataset", a.dataset ? a.dataset.name || a.dataset.id : "", b.dataset ? b.dataset.name || b.dataset.id : "", ""],
      ["Test accuracy", pct(ma.test_accuracy), pct(mb.test_accuracy), better(ma.test_accuracy, mb.test_accuracy)],
      ["Macro F1", fixed(ma.macro_f1), fixed(mb.macro_f1), better(ma.macro_f1, mb.macro_f1)],
      ["Train accuracy", pct(ma.train_accuracy), pct(mb.train_accuracy), ""],
      ["Test loss", fixed(ma.test_loss), fixed(mb.test_loss), better(ma.test_loss, mb.test_loss, false)],
      ["Parameters", count(ma.params_total), count(mb.params_total), ""],
      ["Trainable parameters", count(ma.params_trainable), count(mb.params_trainable), ""],
      ["Epochs", a.spec ? a.spec.epochs : "–", b.spec ? b.spec.epochs : "–", ""],
      ["Train time", seconds(ma.train_seconds), seconds(mb.train_seconds), ""],
    ];
    const head = h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Metric"),
      h("th", { scope: "col" }, modelLabel(a)), h("th", { scope: "col" }, modelLabel(b))));
    const metricTable = h("table", { class: "compare" }, h("caption", {}, "Metrics"), head,
      h("tbody", {}, rows.map(([name, x, y, win]) => h("tr", {}, h("th", { scope: "row" }, name),
        h("td", { class: win === "a" ? "win" : "" }, x), h("td", { class: win === "b" ? "win" : "" }, y)))));
    const perClass = (metrics) => new Map((metrics.per_class || []).map((c) => [c.class, c]));
    const pa = perClass(ma), pb = perClass(mb);
    const classes = [...new Set([...(a.classes || []), ...(b.classes || [])])];
    let classTable;
    if (!pa.size && !pb.size) {
      classTable = h("p", { class: "muted" }, "Neither model has per-class scores.");
    } else {
      classTable = h("table", { class: "compare" }, h("caption", {}, "F1 per class"),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Class"), h("th", { scope: "col" }, modelLabel(a)),
          h("th", { scope: "col" }, modelLabel(b)), h("th", { scope: "col" }, "Difference"))),
        h("tbody", {}, classes.map((name) => {
          const x = pa.get(name), y = pb.get(name);
          const fx = x ? x.f1 : undefined, fy = y ? y.f1 : undefined;
          const win = better(fx, fy);
          const diff = typeof fx === "number" && typeof fy === "number" ? (fy - fx).toFixed(3) : "–";
          return h("tr", {}, h("th", { scope: "row" }, name),
            h("td", { class: win === "a" ? "win" : "" }, fixed(fx)), h("td", { class: win === "b" ? "win" : "" }, fixed(fy)),
            h("td", {}, diff.startsWith("-") || diff === "–" ? diff : `+${diff}`));
        })));
    }
    out.replaceChildren(h("div", { class: "table-wrap" }, metricTable), h("div", { class: "table-wrap" }, classTable),
      h("p", { class: "hint" }, "Bold: the better of the two. Difference: second minus first."));
  }

  // ----- datasets -----

  let datasets = [];
  let datasetPoll = 0;

  async function loadDatasets() {
    const page = await apiJSON("/v1/datasets");
    datasets = page.items;
    renderDatasets();
  }

  function datasetName(id) {
    const found = datasets.find((d) => d.id === id);
    return found ? found.name || found.id : id;
  }

  function renderDatasets() {
    renderKeyed($("#dataset-list"), datasets, datasetCard,
      (d) => JSON.stringify([d.status, d.counts, d.skipped_count, d.error]));
    const select = $("#job-dataset");
    const before = select.value;
    select.replaceChildren(...datasets.filter((d) => d.status === "ready")
      .map((d) => h("option", { value: d.id }, `${d.name || d.id} (${d.id})`)));
    select.value = datasets.some((d) => d.id === before && d.status === "ready") ? before : "cifar10";
    syncTransferFields();
    clearTimeout(datasetPoll);
    if (datasets.some((d) => d.status === "processing")) {
      datasetPoll = setTimeout(guarded(loadDatasets), 1500);
    }
  }

  function datasetCard(d) {
    const counts = d.counts || {};
    const train = counts.train || {}, test = counts.test || {};
    const classes = d.classes || Object.keys(train);
    const total = (split) => Object.values(split).reduce((a, b) => a + b, 0);
    const builtin = d.id === "cifar10";
    const table = classes.length ? h("details", { class: "counts", open: classes.length <= 12 },
      h("summary", {}, `${classes.length} classes: ${count(total(train))} train, ${count(total(test))} test images`),
      h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Class"), h("th", { scope: "col" }, "Train"),
          h("th", { scope: "col" }, "Test"))),
        h("tbody", {}, classes.map((name) => h("tr", {}, h("th", { scope: "row" }, name),
          h("td", {}, count(train[name])), h("td", {}, count(test[name]))))),
        h("tfoot", {}, h("tr", {}, h("th", { scope: "row" }, "All"), h("td", {}, count(total(train))),
          h("td", {}, count(total(test)))))))) : null;
    const skipped = d.skipped_count ? h("details", { class: "skipped" },
      h("summary", {}, `${count(d.skipped_count)} file${d.skipped_count === 1 ? "" : "s"} skipped`),
      h("ul", {}, (d.skipped || []).map((entry) => h("li", {}, h("code", {}, entry.path), `: ${entry.reason}`))),
      d.skipped_count > (d.skipped || []).length
        ? h("p", { class: "muted" }, `… and ${count(d.skipped_count - d.skipped.length)} more`) : null) : null;
    const dup = d.duplicates && (d.duplicates.within_split || d.duplicates.train_test)
      ? h("p", { class: "muted" }, `Duplicates: ${d.duplicates.within_split || 0} within a split, `,
        `${d.duplicates.train_test || 0} removed from test (also in train)`) : null;
    return h("li", { class: `card dataset status-${d.status}` },
      h("div", { class: "card-head" },
        h("h4", {}, d.name || d.id, " ", h("span", { class: "id" }, d.id)),
        h("span", { class: `badge ${d.status}` }, d.status === "processing" ? "processing…" : d.status)),
      h("p", { class: "meta" }, builtin ? "built in" : `uploaded ${when(d.created_at)}`,
        d.bytes ? ` · ${bytes(d.bytes)}` : "",
        d.image_shape ? ` · stored at ${d.image_shape.slice(0, 2).join("×")}` : ""),
      d.status === "processing" ? h("p", { class: "muted" }, "Checking and normalising the images…") : null,
      d.error ? h("p", { class: "error" }, h("strong", {}, `${d.error.type || "Error"}: `), d.error.message || "") : null,
      table, skipped, dup,
      d.status === "ready" && !builtin
        ? h("figure", {}, lazyImage(`/v1/datasets/${encodeURIComponent(d.id)}/preview.png`, `A few images of every class of ${d.name || d.id}`),
          h("figcaption", {}, "Preview")) : null,
      h("p", { class: "actions" },
        d.status === "ready" ? h("button", {
          type: "button", dataset: { key: `train-${d.id}` }, onclick: () => trainOn(d.id),
        }, "Train on it") : null,
        builtin ? null : h("button", {
          type: "button", class: "danger", dataset: { key: `delete-${d.id}` }, onclick: guarded(() => deleteDataset(d)),
        }, "Delete")));
  }
  datasetCard.idOf = (d) => `dataset-${d.id}`;

  function trainOn(id) {
    go("jobs");
    const form = $("#job-form");
    form.elements.dataset.value = id;
    syncTransferFields();
    form.elements.model.focus();
  }

  async function deleteDataset(d) {
    if (!window.confirm(`Delete dataset ${d.name || d.id}? Models trained on it keep working.`)) return;
    await apiJSON(`/v1/datasets/${encodeURIComponent(d.id)}`, { method: "DELETE" });
    notify(`Dataset ${d.name || d.id} deleted`);
    await loadDatasets();
  }

  let uploading = null;

  async function uploadDataset(event) {
    event.preventDefault();
    const form = event.currentTarget;
    const f = form.elements;
    const error = $("#dataset-form-error");
    showError(error, "");
    const file = f.file.files[0];
    if (!file) { showError(error, "Choose an archive first"); f.file.focus(); return; }
    const body = new FormData();
    body.append("file", file, file.name);
    if (f.name.value.trim()) body.append("name", f.name.value.trim());
    if (f.test_fraction.value.trim()) body.append("test_fraction", f.test_fraction.value.trim());
    const status = $("#upload-status"), bar = $("#upload-progress"), text = $("#upload-text");
    const submit = $('button[type="submit"]', form), abort = $("#upload-abort");
    status.hidden = false;
    bar.value = 0;
    text.textContent = `0 of ${bytes(file.size)}`;
    submit.disabled = true;
    abort.hidden = false;
    try {
      const answer = await uploadWithProgress("/v1/datasets", body, (loaded, total) => {
        total = total || file.size;
        bar.value = total ? loaded / total : 0;
        text.textContent = `${bytes(loaded)} of ${bytes(total)} (${pct(total ? loaded / total : 0)})`;
      }, (xhr) => { uploading = xhr; });
      if (answer.status !== 202) throw new Error(problemText(answer.status, answer.body));
      bar.value = 1;
      text.textContent = `${bytes(file.size)} uploaded; processing…`;
      datasets = [answer.body, ...datasets.filter((d) => d.id !== answer.body.id)];
      renderDatasets();
      form.reset();
      notify(`Dataset ${answer.body.name || answer.body.id} uploaded: checking its images`);
    } catch (err) {
      if (err.name === "AbortError") { text.textContent = "Upload stopped"; return; }
      showError(error, `Not uploaded: ${err.message}`);
      status.hidden = true;
    } finally {
      uploading = null;
      submit.disabled = false;
      abort.hidden = true;
    }
  }

  // ----- classify -----

  const MAX_IMAGES = 64;
  const MAX_BYTES = 10 * 1024 * 1024 - 64 * 1024;  // the predict limit, less room for the multipart framing

  function batches(files) {
    const out = [];
    let current = [], size = 0;
    for (const file of files) {
      if (current.length && (current.length >= MAX_IMAGES || size + file.size > MAX_BYTES)) {
        out.push(current);
        current = [];
        size = 0;
      }
      current.push(file);
      size += file.size;
    }
    if (current.length) out.push(current);
    return out;
  }

  async function classify(fileList) {
    const error = $("#classify-error");
    showError(error, "");
    const files = Array.from(fileList || []);
    if (!files.length) return;
    const ref = $("#classify-model").value;
    if (!ref) { showError(error, "No model yet: train one first (Jobs)."); return; }
    const list = $("#predictions");
    const model = models.find((m) => m.id === ref);
    for (const batch of batches(files)) {
      const cards = batch.map((file) => h("li", { class: "card prediction" },
        h("img", { src: URL.createObjectURL(file), alt: file.name, class: "thumb" }),
        h("div", {}, h("h4", {}, file.name), h("p", { class: "muted" }, "Classifying…"))));
      list.prepend(...cards);
      const body = new FormData();
      for (const file of batch) body.append("file", file, file.name);  // multipart/form-data, set by the browser
      try {
        const answer = await apiJSON(`/v1/models/${encodeURIComponent(ref)}/predict?top_k=3`, { method: "POST", body });
        answer.predictions.forEach((prediction, i) => fillPrediction(cards[i], batch[i], prediction, model));
      } catch (err) {
        for (const card of cards) card.remove();
        showError(error, `Not classified: ${err.message}`);
      }
    }
  }

  function fillPrediction(card, file, prediction, model) {
    const info = card.lastElementChild;
    info.replaceChildren(
      h("h4", {}, file.name),
      h("p", { class: "answer" }, h("strong", { class: "label" }, prediction.label), ` ${pct(prediction.probability)}`),
      h("ol", { class: "topk" }, prediction.top_k.map((entry) => {
        const bar = h("span", { class: "bar-fill" });
        bar.style.width = `${Math.max(0, Math.min(1, entry.probability)) * 100}%`;
        return h("li", {}, h("span", { class: "top-label" }, entry.label),
          h("span", { class: "bar", "aria-hidden": "true" }, bar), h("span", { class: "top-pct" }, pct(entry.probability)));
      })),
      model ? h("p", { class: "muted" }, `by ${modelLabel(model)}`) : null);
  }

  function wireDropZone() {
    const zone = $("#drop-zone");
    const input = $("#classify-files");
    input.addEventListener("change", guarded(async () => { await classify(input.files); input.value = ""; }));
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add("over"); });
    }
    for (const type of ["dragleave", "dragend"]) zone.addEventListener(type, () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      guarded(classify)(event.dataTransfer.files);
    });
    // A file dropped beside the zone must not navigate away from the page.
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => event.preventDefault());
  }

  // ----- start -----

  let ready = false;

  async function start() {
    $("#forget-key").hidden = !apiKey;
    $("#forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      apiKey = null;
      $("#forget-key").hidden = true;
      notify("Key forgotten for this tab");
    });
    $("#key-dialog").addEventListener("cancel", (event) => event.preventDefault());  // the page needs a key
    const jobForm = $("#job-form");
    jobForm.addEventListener("submit", guarded(startJob));
    jobForm.elements.model.addEventListener("change", syncTransferFields);
    jobForm.elements.dataset.addEventListener("change", syncTransferFields);
    $("#jobs-refresh").addEventListener("click", guarded(loadJobs));
    $("#jobs-more").addEventListener("click", guarded(loadOlderJobs));
    $("#compare-form").addEventListener("submit", compare);
    $("#models-refresh").addEventListener("click", guarded(loadModels));
    $("#datasets-refresh").addEventListener("click", guarded(loadDatasets));
    $("#dataset-form").addEventListener("submit", guarded(uploadDataset));
    $("#upload-abort").addEventListener("click", () => { if (uploading) uploading.abort(); });
    $("#classify-form").addEventListener("submit", (event) => event.preventDefault());
    wireDropZone();
    window.addEventListener("hashchange", route);
    route();
    syncTransferFields();
    loadHealth();
    setInterval(() => { if (!document.hidden) loadHealth(); }, 15000);
    // One request first: if it needs the key, the dialog asks once, before the others go out.
    await loadDatasets();
    ready = true;
    await Promise.all([loadJobs(), loadModels()]);
    route();  // a #models/<id> link opened from elsewhere: its card exists now
    // Jobs started elsewhere (curl, a script) show up too.
    setInterval(() => { if (!document.hidden && currentView === "jobs" && !keyPrompt) guarded(loadJobs)(); }, 10000);
  }

  document.addEventListener("DOMContentLoaded", guarded(start));
})();
