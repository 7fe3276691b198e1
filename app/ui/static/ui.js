/* The try-it page: every number it shows comes from the service's public API (GET model, POST predict,
   POST explain?format=json), called with relative URLs, so the page works under any path prefix. No build step,
   no dependencies. */
"use strict";

const KEY_STORAGE = "petclf.apiKey"; // sessionStorage only: the key dies with the tab, and is never a cookie
const $ = (id) => document.getElementById(id);
const keysRequired = () => document.body.dataset.keysRequired === "true";
const percent = (p) => (100 * p).toFixed(1) + "%";
const fixed = (digits) => (x) => Number(x).toFixed(digits);
const METRICS = [
  ["val_acc", "Validation accuracy", percent],
  ["macro_f1", "Macro F1", fixed(3)],
  ["val_loss", "Validation loss", fixed(3)],
  ["ece_before", "Calibration error (ECE), raw", fixed(3)],
  ["ece_after", "Calibration error (ECE), calibrated", fixed(3)],
  ["epoch", "Best epoch (counted from 0)", String],
];

let model = null; // the answer of GET model, once loaded
let generation = 0; // the latest photo; answers for older ones are dropped
let lastFile = null;
let retryAfterKey = false;
let previewUrl = null;

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

/* One API call: the JSON answer, or an ApiError carrying the API's own code and message. */
async function callApi(path, init = {}) {
  const headers = new Headers(init.headers || {});
  if (apiKey()) headers.set("Authorization", "Bearer " + apiKey());
  let response;
  try {
    response = await fetch(path, { ...init, headers, cache: "no-store" });
  } catch (error) {
    throw new ApiError(0, "network_error", "The service could not be reached (" + error.message + ").");
  }
  const json = (response.headers.get("Content-Type") || "").includes("json");
  const body = json ? await response.json().catch(() => null) : null;
  if (response.ok) return body;
  const error = body && body.error;
  if (error && error.message) throw new ApiError(response.status, error.code, error.message);
  throw new ApiError(response.status, "http_" + response.status, `HTTP ${response.status} ${response.statusText}`);
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(error) {
  const box = $("error");
  box.textContent = "";
  const message = document.createElement("strong");
  message.className = "error-message";
  message.textContent = error.message;
  box.append(message);
  if (error.status) box.append(` (${error.code}, HTTP ${error.status})`);
  box.hidden = false;
  setStatus("");
  if (error.status === 401) askForKey(error.message);
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function askForKey(message) {
  retryAfterKey = true;
  $("key-section").hidden = false;
  showKeyEntry(true);
  $("key-state").textContent = "The API answered: " + message;
  $("api-key").focus();
}

/* The key field, or (once a key is stored) one line saying so with a button to forget it. */
function showKeyEntry(entry) {
  $("key-form").hidden = !entry;
  $("key-help").hidden = !entry;
  $("key-stored").hidden = entry;
}

function formWith(file) {
  const form = new FormData();
  form.append("image", file, file.name || "pasted-image");
  return form;
}

/* A photo from the file input, a drop or a paste: preview, prediction, then the explanation. */
async function classify(file) {
  const mine = ++generation;
  lastFile = file;
  clearError();
  setStatus(`Classifying ${file.name || "the pasted image"}...`);
  let prediction;
  try {
    prediction = await callApi("predict", { method: "POST", body: formWith(file) });
  } catch (error) {
    if (mine === generation) {
      $("result").hidden = true;
      showError(error);
    }
    return;
  }
  if (mine !== generation) return;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview").src = previewUrl;
  renderPrediction(prediction);
  $("result").hidden = false;
  setStatus(announcement(prediction));
  explain(file, mine);
}

function unknownText(prediction) {
  if (prediction.ood_score === null || prediction.ood_score === undefined) {
    return "This model has no unknown-input detector.";
  }
  const threshold = model && model.ood ? `, threshold ${fixed(2)(model.ood.threshold)}` : "";
  const score = `(unusualness score ${fixed(2)(prediction.ood_score)}${threshold})`;
  return prediction.unknown
    ? `Looks unknown: unlike the images the model was trained on ${score}, so treat the answer as a guess.`
    : `Looks like the images the model was trained on ${score}.`;
}

function announcement(prediction) {
  const answer = `Prediction: ${prediction.predicted_class}, ${percent(prediction.confidence)}`;
  if (prediction.ood_score === null || prediction.ood_score === undefined) return answer + ".";
  return answer + (prediction.unknown ? "; it looks unknown." : "; it looks like the training images.");
}

function renderPrediction(prediction) {
  $("predicted-class").textContent = prediction.predicted_class;
  $("confidence").textContent = percent(prediction.confidence);
  const unknown = $("unknown");
  unknown.textContent = unknownText(prediction);
  unknown.classList.toggle("is-unknown", prediction.unknown === true);
  const sorted = Object.entries(prediction.all_probabilities).sort((a, b) => b[1] - a[1]);
  $("bars").replaceChildren(...sorted.map(([label, probability]) => bar(label, probability, prediction)));
}

function bar(label, probability, prediction) {
  const item = document.createElement("li");
  item.className = "bar" + (label === prediction.predicted_class ? " is-top" : "");
  const name = document.createElement("span");
  name.className = "bar-label";
  name.textContent = label;
  const track = document.createElement("span");
  track.className = "bar-track";
  const fill = document.createElement("span");
  fill.className = "bar-fill";
  fill.style.width = percent(probability); // CSSOM, which the page's Content-Security-Policy allows
  track.append(fill);
  const value = document.createElement("span");
  value.className = "bar-value";
  value.textContent = percent(probability);
  item.append(name, track, value);
  return item;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const EXPLAIN_TRIES = 4;

/* The server computes few explanations at once and answers 503 explain_busy beyond them: wait a little, retry. */
async function explainWithRetry(file, mine) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await callApi("explain?format=json", { method: "POST", body: formWith(file) });
    } catch (error) {
      if (error.status !== 503 || attempt === EXPLAIN_TRIES || mine !== generation) throw error;
      await sleep(1000 * attempt);
    }
  }
}

async function explain(file, mine) {
  const figure = $("heatmap-figure");
  const image = $("heatmap");
  const caption = $("heatmap-caption");
  figure.hidden = false;
  image.hidden = true;
  caption.textContent = "Computing the explanation...";
  try {
    const answer = await explainWithRetry(file, mine);
    if (mine !== generation) return;
    image.src = "data:image/png;base64," + answer.heatmap_png;
    image.hidden = false;
    caption.textContent = `What drove "${answer.explained_class}" (Grad-CAM heat map)`;
  } catch (error) {
    if (mine !== generation) return;
    if (error.status === 404 || error.status === 405) figure.hidden = true; // a service without /explain
    else caption.textContent = "No explanation: " + error.message;
  }
}

function fact(list, term, value) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  list.append(dt, dd);
}

function renderModel(info) {
  const facts = $("model-facts");
  facts.replaceChildren();
  fact(facts, "Name", info.name);
  fact(facts, "Version", info.version);
  fact(facts, "Architecture", info.arch);
  fact(facts, `Classes (${info.num_classes})`, info.class_names.join(", "));
  fact(facts, "Runs on", `${info.device}, ${info.precision}`);
  const temperature = info.calibration && info.calibration.temperature;
  fact(facts, "Temperature", typeof temperature === "number" ? fixed(3)(temperature) : "per member");
  fact(facts, "Unknown-input detector", info.ood ? `${info.ood.score}, threshold ${fixed(3)(info.ood.threshold)}` : "none");
  if (info.members.length > 1) fact(facts, "Ensemble of", `${info.members.length} bundles`);
  facts.hidden = false;
  renderMetrics(info);
  $("model-state").textContent = "";
}

function metricRows(metrics) {
  const rows = METRICS.filter(([key]) => typeof metrics[key] === "number").map(([key, label, format]) => [
    label,
    format(metrics[key]),
  ]);
  for (const [name, accuracy] of Object.entries(metrics.per_class_acc || {})) {
    rows.push([`Accuracy on ${name}`, percent(accuracy)]);
  }
  return rows;
}

/* One column for a single bundle; one per member for an ensemble (it has no metrics of its own). */
function renderMetrics(info) {
  const sources = info.members.length > 1 ? info.members : [{ version: "value", metrics: info.metrics || {} }];
  const columns = sources.map((source) => metricRows(source.metrics || {}));
  const labels = [...new Set(columns.flat().map(([label]) => label))];
  const head = $("metrics-head");
  head.replaceChildren(head.firstElementChild);
  for (const source of sources) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = source.version;
    head.append(th);
  }
  $("metrics-body").replaceChildren(
    ...labels.map((label) => {
      const row = document.createElement("tr");
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = label;
      row.append(th);
      for (const column of columns) {
        const td = document.createElement("td");
        td.textContent = (column.find(([name]) => name === label) || [null, "-"])[1];
        row.append(td);
      }
      return row;
    }),
  );
  $("metrics").hidden = labels.length === 0;
}

async function loadModel() {
  try {
    model = await callApi("model");
  } catch (error) {
    $("model-state").textContent = "The model's description could not be loaded: " + error.message;
    if (error.status === 401) askForKey(error.message);
    return;
  }
  renderModel(model);
}

function renderCurl() {
  const base = new URL(".", document.baseURI).href;
  const auth = keysRequired() ? ' -H "Authorization: Bearer $API_KEY"' : "";
  $("curl").textContent = [
    `curl${auth} ${base}model`,
    `curl${auth} -F image=@photo.jpg ${base}predict`,
    `curl${auth} -F image=@photo.jpg '${base}explain?format=json'`,
    `curl${auth} -F image=@photo.jpg ${base}explain -o explanation.png`,
  ].join("\n");
}

function firstFile(transfer) {
  return transfer && transfer.files && transfer.files.length ? transfer.files[0] : null;
}

function dropped(event) {
  event.preventDefault();
  $("drop-zone").classList.remove("is-dragging");
  const file = firstFile(event.dataTransfer);
  if (file) classify(file);
  else showError({ message: "The drop held no file: drop an image file." });
}

function wireInputs() {
  const input = $("file");
  input.addEventListener("change", () => {
    if (input.files.length) classify(input.files[0]);
    input.value = ""; // choosing the same file again (say, after entering a key) is a change too
  });
  const zone = $("drop-zone");
  // Anywhere on the page accepts a drop (and the browser never navigates away to the dropped file).
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("is-dragging");
    });
  }
  for (const type of ["dragleave", "dragend"]) {
    document.addEventListener(type, () => zone.classList.remove("is-dragging"));
  }
  document.addEventListener("drop", dropped);
  document.addEventListener("paste", (event) => {
    const file = firstFile(event.clipboardData);
    if (!file) return; // text pasted into the key field stays text
    event.preventDefault();
    classify(file);
  });
}

function wireKey() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    $("key-state").textContent = "";
    showKeyEntry(false);
    loadModel();
    if (retryAfterKey && lastFile) classify(lastFile);
    retryAfterKey = false;
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    showKeyEntry(true);
    $("key-state").textContent = "The key is forgotten.";
    $("api-key").focus();
  });
  if (apiKey()) {
    $("key-section").hidden = false;
    showKeyEntry(false);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  wireInputs();
  wireKey();
  renderCurl();
  loadModel();
});
