"""The single HTML page of ``finealign serve``: plain HTML + CSS + JavaScript, no external assets.
It only calls the JSON API (app.py); element ids are what tests/test_browser.py checks."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>finealign serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font-family: system-ui, sans-serif; margin: 1.2em auto; max-width: 1100px; color: #222; }
  h1 { font-size: 1.4em; margin-bottom: .2em; }
  h2 { font-size: 1.1em; margin: 0 0 .5em 0; }
  section { border: 1px solid #ddd; border-radius: 6px; padding: .8em 1em; margin: .8em 0; }
  #info { color: #555; font-size: .9em; }
  .grid { display: flex; flex-wrap: wrap; gap: .6em; margin-top: .6em; }
  figure { margin: 0; text-align: center; font-size: .8em; }
  figure img { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated;
               border: 1px solid #ccc; background: #f6f6f6; }
  .row { display: flex; gap: 1.5em; flex-wrap: wrap; align-items: flex-start; margin-top: .6em; }
  #text-results { flex: 1 1 340px; min-width: 0; }
  .error { color: #b00020; font-weight: 600; }
  #preview, #relevance-img { width: 192px; height: 192px; object-fit: contain; image-rendering: pixelated;
                             border: 1px solid #ccc; }
  ol { margin: .3em 0; padding-left: 1.4em; }
  .score { color: #777; font-size: .85em; }
  input[type=text] { width: 22em; padding: .25em; }
</style>
</head>
<body>
<h1>finealign serve</h1>
<div id="info">loading model info&hellip;</div>

<section>
  <h2>Search the gallery</h2>
  <form id="search-form">
    <input type="text" id="query" name="q" placeholder="a large red circle on the left" required>
    <button type="submit" id="search-button">Search</button>
  </form>
  <div id="search-error" class="error"></div>
  <div id="search-results" class="grid"></div>
</section>

<section>
  <h2>Caption an image &middot; patch&ndash;text relevance</h2>
  <form id="upload-form">
    <input type="file" id="file" name="file" accept="image/*" required>
    <input type="text" id="rel-text" name="text" placeholder="text for the relevance map (optional)">
    <button type="submit" id="upload-button">Upload</button>
  </form>
  <div id="upload-error" class="error"></div>
  <div class="row">
    <div><img id="preview" alt="uploaded image" hidden></div>
    <div id="text-results">
      <div><b>Generated caption</b> <span id="captioner" class="score"></span></div>
      <ol id="captions"></ol>
      <div><b>Closest captions</b> <span id="closest-source" class="score"></span></div>
      <ol id="closest"></ol>
    </div>
    <div id="relevance-box" hidden>
      <div><b>Relevance</b> <span id="relevance-text" class="score"></span></div>
      <img id="relevance-img" alt="patch-text relevance map">
    </div>
  </div>
</section>

<script>
"use strict";
const $ = (id) => document.getElementById(id);

async function api(url, options) {
  const r = await fetch(url, options);
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) {
    let msg = body && body.detail !== undefined ? body.detail : r.statusText;
    if (typeof msg !== "string") msg = JSON.stringify(msg);
    throw new Error(r.status + ": " + msg);
  }
  return body;
}

function li(text, score) {
  const el = document.createElement("li");
  el.textContent = text;
  if (score !== undefined) {
    const s = document.createElement("span");
    s.className = "score";
    s.textContent = "  " + score.toFixed(3);
    el.appendChild(s);
  }
  return el;
}

api("/api/info").then((info) => {
  const g = info.gallery;
  $("info").textContent = "model " + info.arch + " (" + info.checkpoint + "), captioner: " +
    (info.captioner || "none") + " | gallery: " + g.images + " images" +
    (g.skipped.length ? " (" + g.skipped.length + " unreadable, skipped)" : "") +
    (g.from_cache ? ", from cache" : ", embedded now") + " | candidate captions: " + g.captions +
    " (" + g.captions_source + ")";
}).catch((e) => { $("info").textContent = "info failed: " + e.message; });

$("search-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("search-error").textContent = "";
  const box = $("search-results");
  box.replaceChildren();
  try {
    const res = await api("/api/search?k=8&q=" + encodeURIComponent($("query").value));
    for (const r of res.results) {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = r.url;
      img.alt = r.name;
      img.title = r.name;
      const cap = document.createElement("figcaption");
      cap.textContent = "#" + r.rank + " " + r.name + " (" + r.score.toFixed(3) + ")";
      fig.append(img, cap);
      box.appendChild(fig);
    }
    box.dataset.done = "1";
  } catch (e) { $("search-error").textContent = e.message; }
});

$("upload-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  for (const id of ["upload-error", "captioner", "closest-source"]) $(id).textContent = "";
  $("captions").replaceChildren();
  $("closest").replaceChildren();
  $("relevance-box").hidden = true;
  const file = $("file").files[0];
  if (!file) { $("upload-error").textContent = "choose an image first"; return; }
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  const fd = new FormData();
  fd.append("file", file);
  try {
    const res = await api("/api/caption", { method: "POST", body: fd });
    $("captioner").textContent = res.message;
    for (const c of res.captions) $("captions").appendChild(li(c));
    $("closest-source").textContent = "from " + res.closest_source;
    for (const c of res.closest) $("closest").appendChild(li(c.caption, c.score));
    $("captions").dataset.done = "1";
  } catch (e) { $("upload-error").textContent = e.message; return; }
  const text = $("rel-text").value.trim();
  if (!text) return;
  const fd2 = new FormData();
  fd2.append("file", file);
  fd2.append("text", text);
  try {
    const rel = await api("/api/relevance", { method: "POST", body: fd2 });
    $("relevance-img").src = rel.overlay;
    $("relevance-text").textContent = "\\u201c" + rel.text + "\\u201d (" + rel.grid + "\\u00d7" + rel.grid + " patches)";
    $("relevance-box").hidden = false;
    $("relevance-box").dataset.done = "1";
  } catch (e) { $("upload-error").textContent = e.message; }
});
</script>
</body>
</html>
"""
