// The results page: search by photo, neighbours of an image (/?id=...), near-duplicate groups.
"use strict";

const $ = (selector) => document.querySelector(selector);
const thumbUrl = (id) => "/thumb/" + encodeURIComponent(id);
const k = () => Math.max(1, Math.min(200, parseInt($("#k").value, 10) || 12));

function setStatus(text, isError = false) {
  $("#status").textContent = text;
  $("#status").classList.toggle("error", isError);
}

function showQuery(src, title, note) {
  $("#query").hidden = false;
  $("#query-thumb").src = src;
  $("#query-title").textContent = title;
  $("#query-note").textContent = note || "";
}

function renderResults(results) {
  const list = $("#results");
  list.replaceChildren();
  for (const { id, distance } of results) {
    const item = document.createElement("li");
    item.className = "result";
    item.dataset.id = id;
    item.dataset.distance = distance;
    const link = document.createElement("a");
    link.href = "/?id=" + encodeURIComponent(id);
    link.addEventListener("click", (event) => {
      event.preventDefault();
      history.pushState({}, "", link.href);
      route();
    });
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = id;
    img.src = thumbUrl(id);
    const caption = document.createElement("div");
    caption.innerHTML = '<span class="distance"></span> <span class="muted">bits apart</span><div class="id"></div>';
    caption.querySelector(".distance").textContent = distance;
    caption.querySelector(".id").textContent = id;
    link.append(img, caption);
    item.append(link);
    list.append(item);
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body.status) return `${body.status}: ${body.error || ""}`;
    return body.detail || response.statusText;
  } catch {
    return response.statusText;
  }
}

async function searchFile(file) {
  if (!file) return;
  history.pushState({}, "", "/");
  $("#duplicates-view").hidden = true;
  showQuery(URL.createObjectURL(file), file.name, "your photo");
  setStatus("Searching…");
  $("#results").replaceChildren();
  const form = new FormData();
  form.append("image", file);
  form.append("k", String(k()));
  const response = await fetch("/search", { method: "POST", body: form });
  if (!response.ok) {
    setStatus("This photo could not be searched: " + (await errorText(response)), true);
    return;
  }
  const answer = await response.json();
  setStatus(`${answer.results.length} nearest catalogue images`);
  renderResults(answer.results);
}

async function showSimilar(id) {
  $("#duplicates-view").hidden = true;
  showQuery(thumbUrl(id), id, "catalogue image");
  setStatus("Loading…");
  const response = await fetch(`/similar/${encodeURIComponent(id)}?k=${k()}`);
  if (!response.ok) {
    $("#results").replaceChildren();
    setStatus(await errorText(response), true);
    return;
  }
  const answer = await response.json();
  setStatus(`${answer.results.length} nearest images to ${id}`);
  renderResults(answer.results);
}

async function showDuplicates() {
  $("#query").hidden = true;
  $("#results").replaceChildren();
  $("#duplicates-view").hidden = false;
  setStatus("Grouping near-duplicates…");
  const maxDistance = $("#max-distance").value;
  const url = "/duplicates" + (maxDistance ? `?max_distance=${encodeURIComponent(maxDistance)}` : "");
  const response = await fetch(url);
  if (!response.ok) {
    setStatus(await errorText(response), true);
    return;
  }
  const answer = await response.json();
  $("#max-distance").value = answer.max_distance;
  setStatus("");
  const fitted = answer.fitted
    ? ` Threshold fitted on this catalogue: about ${Math.round(100 * Object.values(answer.fitted.found).reduce((a, b) => a + b, 0) / Object.keys(answer.fitted.found).length)}% of copies found, ` +
      `${(100 * answer.fitted.false_pairs).toFixed(1)}% of distinct images paired.`
    : "";
  $("#dup-summary").textContent =
    `${answer.groups.length} groups among ${answer.images} images; ` +
    `${answer.removable} files could go (the outlined one of each group is kept).` + fitted;
  const groups = $("#groups");
  groups.replaceChildren();
  answer.groups.forEach((group, n) => {
    const box = document.createElement("div");
    box.className = "group";
    box.innerHTML = `<h3>Group ${n + 1}</h3><ol></ol>`;
    group.forEach(({ id, distance }, i) => {
      const item = document.createElement("li");
      item.className = i === 0 ? "kept" : "";
      item.dataset.id = id;
      const link = document.createElement("a");
      link.href = "/?id=" + encodeURIComponent(id);
      const img = document.createElement("img");
      img.loading = "lazy";
      img.alt = id;
      img.src = thumbUrl(id);
      const caption = document.createElement("div");
      caption.className = "id";
      caption.textContent = i === 0 ? `kept: ${id}` : `${id} (${distance} bits)`;
      link.append(img, caption);
      item.append(link);
      box.querySelector("ol").append(item);
    });
    groups.append(box);
  });
}

function route() {
  const params = new URLSearchParams(location.search);
  if (params.get("view") === "duplicates") return showDuplicates();
  if (params.has("id")) return showSimilar(params.get("id"));
  $("#query").hidden = true;
  $("#duplicates-view").hidden = true;
  $("#results").replaceChildren();
  setStatus("");
}

$("#file").addEventListener("change", (event) => searchFile(event.target.files[0]));
const drop = $("#drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  searchFile(event.dataTransfer.files[0]);
});
$("#dup-link").addEventListener("click", (event) => {
  event.preventDefault();
  history.pushState({}, "", "/?view=duplicates");
  route();
});
$("#dup-form").addEventListener("submit", (event) => { event.preventDefault(); showDuplicates(); });
window.addEventListener("popstate", route);

fetch("/healthz").then((r) => r.json()).then((h) => {
  $("#catalogue").textContent = `${h.images} images · ${h.backbone} ${h.layout} · ${h.kind} index`;
});
route();
