// The demo page: text search, photo search (drop or choose), a grid of results and the stage timings.
// Plain browser JavaScript against the same HTTP API as any client; no build step.
"use strict";

const $ = (id) => document.getElementById(id);

function options() {
  return { k: Number($("opt-k").value) || 12, rerank: $("opt-rerank").checked };
}

function headers(extra = {}) {
  const key = $("opt-key").value.trim();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function readResponse(response) {
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

function render(body, what) {
  const list = $("results");
  list.replaceChildren();
  const template = $("result-card");
  for (const hit of body.results) {
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.id = hit.id;
    const photo = card.querySelector(".photo");
    photo.src = hit.image_url;
    photo.alt = hit.title;
    card.querySelector(".title").textContent = hit.title || hit.id;
    const ranker = hit.rerank_score === null ? "recall" : "re-rank";
    card.querySelector(".meta").textContent =
      `#${hit.rank} · ${ranker} score ${hit.score.toFixed(2)} · recall ${hit.recall_score.toFixed(3)}`;
    list.append(card);
  }
  $("status").textContent = `${body.results.length} of ${body.total} results for ${what}`;
  const t = body.timings;
  $("timings").textContent =
    `took ${body.took_ms.toFixed(1)} ms: encode ${t.encode.toFixed(1)} ms · ` +
    `recall ${t.recall.toFixed(1)} ms · re-rank ${t.rerank.toFixed(1)} ms ` +
    `(index ${body.index.version}, ${body.index.items} items, ${body.model.device})`;
  $("timings").hidden = false;
}

async function run(what, request) {
  showError("");
  $("status").textContent = `searching for ${what}…`;
  document.body.dataset.busy = "true";
  try {
    render(await readResponse(await request()), what);
  } catch (error) {
    $("status").textContent = "";
    showError(error.message);
  } finally {
    delete document.body.dataset.busy;
  }
}

function searchText(query) {
  return run(`“${query}”`, () =>
    fetch("/search/text", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ query, ...options() }),
    }),
  );
}

function searchImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError("Please choose an image file (JPEG, PNG, WebP, GIF, BMP or TIFF).");
    return Promise.resolve();
  }
  const preview = $("query-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const form = new FormData();
  form.append("file", file, file.name || "query");
  const { k, rerank } = options();
  return run(`your photo (${file.name || "image"})`, () =>
    fetch(`/search/image?k=${k}&rerank=${rerank}`, { method: "POST", headers: headers(), body: form }),
  );
}

async function pollReadiness() {
  const badge = $("readiness");
  try {
    const response = await fetch("/readyz");
    const body = await response.json();
    if (response.ok) {
      badge.dataset.state = "ready";
      badge.textContent = `ready · ${body.index.items} items`;
      return;
    }
    badge.dataset.state = body.error && body.error.message.startsWith("startup failed") ? "error" : "loading";
    badge.textContent = body.error ? body.error.message : "loading";
  } catch {
    badge.dataset.state = "error";
    badge.textContent = "server unreachable";
  }
  setTimeout(pollReadiness, 2000);
}

function wire() {
  $("text-search").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = $("query").value.trim();
    if (query) searchText(query);
  });
  $("image-file").addEventListener("change", (event) => searchImage(event.target.files[0]));

  const zone = $("drop-zone");
  zone.addEventListener("click", (event) => {
    if (event.target.tagName !== "LABEL") $("image-file").click();
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("image-file").click();
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    searchImage(event.dataTransfer.files[0]);
  });
  pollReadiness();
}

document.addEventListener("DOMContentLoaded", wire);
