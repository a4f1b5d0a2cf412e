// The curate gallery: plain JavaScript over the REST API, no build step.
"use strict";

const PAGE = Number(new URLSearchParams(location.search).get("page")) || 48;
const $ = (sel) => document.querySelector(sel);
const state = { offset: 0, total: 0, loading: null, generation: 0, where: null, selected: "", observer: null };

function esc(text) {
  const div = document.createElement("div");
  div.textContent = text == null ? "" : String(text);
  return div.innerHTML;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

// The API's JSON answer, or an error with its reason (a 401 asks for the token).
async function answer(response) {
  if (response.status === 401) {
    $("#token-box").hidden = false;
    throw new Error("this server needs a token");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function api(path) {
  return answer(await fetch(path, { credentials: "same-origin" }));
}

async function post(path, body) {
  return answer(await fetch(path, {
    method: "POST", credentials: "same-origin", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json" },
  }));
}

function query(params) {
  const out = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") out.set(key, value);
  }
  return out.toString();
}

// A clip plays from its own cut of the source: H.264 MP4 first, VP9 WebM where the
// browser lacks H.264. The sample view's player loads the whole clip ("auto") so it is
// ready to play; a hovered card autoplays.
function clipVideo(id, attributes, preload = "metadata") {
  return `<video ${attributes} poster="samples/${id}/thumbnail?size=512" preload="${preload}">
    <source src="samples/${id}/media" type="video/mp4">
    <source src="samples/${id}/media?format=webm" type="video/webm"></video>`;
}

function isClip(row) {
  return row.media_type === "video_clip";
}

function clipSpan(row) {
  return `${Number(row.clip_start_s).toFixed(2)}–${Number(row.clip_end_s).toFixed(2)} s`;
}

function card(row) {
  let name = String(row.uri || row.sample_id).split(/[/#]/).pop();
  if (isClip(row)) name += ` · clip ${row.clip_index} · ${clipSpan(row)}`;
  const kept = row.selected === true;
  const picture = row.error || !row.content_hash
    ? `<div class="none">${esc(row.error || "no media")}</div>`
    : `<img loading="lazy" alt="${esc(name)}" src="samples/${row.sample_id}/thumbnail?size=256"${
      isClip(row) ? ' data-clip="1"' : ""}>`;
  const distance = row._distance !== undefined ? ` · d ${row._distance.toFixed(3)}` : "";
  return `<div class="card" data-testid="card" data-id="${row.sample_id}">${picture}
    <div class="meta"><div class="name" title="${esc(row.uri)}">${esc(name)}</div>
    <span class="badge ${kept ? "kept" : "out"}">${kept ? "selected" : "rejected"}</span>
    <span class="reason" title="${esc(row.reject_reason)}">${esc(row.reject_reason || "")}${distance}</span>
    </div></div>`;
}

function bindCards(root) {
  root.querySelectorAll(".card").forEach((el) => {
    el.addEventListener("click", () => { location.hash = `#/sample/${el.dataset.id}`; });
    const poster = el.querySelector("img[data-clip]");
    if (!poster) return;
    // hovering a clip's card plays it, muted and looping, in place of its poster
    el.addEventListener("mouseenter", () => {
      if (el.querySelector("video")) return;
      poster.insertAdjacentHTML("afterend", clipVideo(el.dataset.id,
        'class="hover" muted autoplay loop playsinline data-testid="card-video"'));
      poster.hidden = true;
    });
    el.addEventListener("mouseleave", () => {
      const video = el.querySelector("video");
      if (video) video.remove();
      poster.hidden = false;
    });
  });
}

// --- filters --------------------------------------------------------------------------
function currentFilter() {
  const parts = [];
  const media = $("#f-media").value;
  if (media) parts.push(`media_type = '${media}'`);
  const reason = $("#f-reason").value;  // the filter /stats gives each reason
  if (reason) parts.push(reason);
  const score = $("#f-score").value;
  if (score) {
    const low = $("#f-min").value, high = $("#f-max").value;
    if (low !== "") parts.push(`${score} >= ${Number(low)}`);
    if (high !== "") parts.push(`${score} <= ${Number(high)}`);
    if (low === "" && high === "") parts.push(`${score} IS NOT NULL`);
  }
  return parts.join(" AND ") || null;
}

async function loadFilterChoices() {
  const stats = await api("stats");
  const reasons = $("#f-reason");
  for (const group of stats.rejected_by_reason) {
    const option = document.createElement("option");
    option.value = group.where;
    option.textContent = `${group.stage}: ${group.reason} (${group.rows})`;
    reasons.appendChild(option);
  }
  const scores = $("#f-score");
  for (const name of Object.keys(stats.histograms)) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    scores.appendChild(option);
  }
}

// --- grid with infinite scroll ----------------------------------------------------------
async function showGrid() {
  // a new grid: pages still in flight for the previous one are dropped when they arrive
  state.generation = (state.generation || 0) + 1;
  state.offset = 0;
  state.where = currentFilter();
  state.selected = $("#f-selected").value;
  $("#view").innerHTML = `<div class="grid" id="grid"></div><div id="sentinel"></div>`;
  if (state.observer) state.observer.disconnect();
  state.observer = new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadPage();
  });
  state.observer.observe($("#sentinel"));
  await loadPage();
}

// The columns a card shows; a table with clips adds where each clip lies.
const CARD_COLUMNS = "uri,selected,reject_reason,content_hash,error";
const CLIP_COLUMNS = ",media_type,clip_index,clip_start_s,clip_end_s";

async function cardColumns() {
  if (state.cardColumns === undefined) {
    const first = await api("samples?limit=1");
    const row = first.rows[0] || {};
    state.cardColumns = CARD_COLUMNS + ("clip_start_s" in row ? CLIP_COLUMNS : "");
  }
  return state.cardColumns;
}

async function loadPage() {
  const generation = state.generation;
  if (state.loading === generation || (state.offset > 0 && state.offset >= state.total)) return;
  state.loading = generation;
  try {
    const page = await api("samples?" + query({
      where: state.where, selected: state.selected, limit: PAGE, offset: state.offset,
      columns: await cardColumns(),
    }));
    if (generation !== state.generation) return;  // the filter changed meanwhile
    state.total = page.total;
    state.offset += page.rows.length;
    const grid = $("#grid");
    if (!grid) return;
    const holder = document.createElement("div");
    holder.innerHTML = page.rows.map(card).join("");
    bindCards(holder);
    grid.append(...holder.children);
    state.ids = [...grid.querySelectorAll(".card")].map((el) => el.dataset.id);
    $("#count").textContent = `${Math.min(state.offset, state.total)} of ${state.total} shown`;
    showError("");
  } catch (error) {
    showError(error.message);
  } finally {
    if (state.loading === generation) state.loading = null;
  }
  // a page that does not fill the window leaves the sentinel in view: load on
  if (generation === state.generation && state.offset < state.total && sentinelInView()) {
    setTimeout(loadPage, 0);
  }
}

function sentinelInView() {
  const sentinel = $("#sentinel");
  return sentinel !== null && sentinel.getBoundingClientRect().top < window.innerHeight;
}

async function showSearch(text) {
  $("#view").innerHTML = `<h2>Images like “${esc(text)}”</h2><div class="grid" id="grid"></div>`;
  try {
    const result = await api("search?" + query({
      text, k: PAGE, where: currentFilter(), selected: $("#f-selected").value,
    }));
    $("#grid").innerHTML = result.rows.map(card).join("");
    bindCards($("#grid"));
    $("#count").textContent = `${result.rows.length} nearest`;
    showError("");
  } catch (error) {
    showError(error.message);
  }
}

// --- one sample ---------------------------------------------------------------------------
function columnsTable(row) {
  return `<table class="columns" data-testid="columns">${Object.entries(row).map(([key, value]) =>
    `<tr><td>${esc(key)}</td><td>${esc(typeof value === "object" && value !== null
      ? JSON.stringify(value) : value)}</td></tr>`).join("")}</table>`;
}

async function showSample(id) {
  const view = $("#view");
  // a view asked for meanwhile (j pressed twice, a click) wins: this one draws nothing
  const generation = state.generation = (state.generation || 0) + 1;
  try {
    const row = await api(`samples/${id}`);
    if (generation !== state.generation) return;
    const clip = isClip(row) && !row.error;
    let picture = row.content_hash && !row.error
      ? `<img class="main" alt="sample" src="samples/${id}/thumbnail?size=1024">`
      : `<div class="card"><div class="none">${esc(row.error)}</div></div>`;
    if (clip) {
      const at = [0.1, 0.3, 0.5, 0.7, 0.9];
      picture = `${clipVideo(id, 'class="main" controls muted data-testid="clip-video"', "auto")}
        <h2>Frames</h2><div class="frames" data-testid="frames">${at.map((a) =>
          `<img alt="frame at ${a}" src="samples/${id}/thumbnail?size=160&at=${a}">`).join("")}
        </div>`;
    }
    view.innerHTML = `<div class="sample" data-testid="sample"><div>${picture}
      <p><a href="samples/${id}/media" target="_blank">${clip ? "this clip (MP4)"
        : "original file"}</a></p></div>
      <div>${reviewPanel()}${columnsTable(row)}</div></div>
      ${clip ? `<h2>Other clips of this video</h2>
      <div class="strip" id="siblings" data-testid="siblings"></div>` : ""}
      <h2>Duplicates</h2><div class="strip" id="duplicates" data-testid="duplicates"></div>
      <h2>Similar images</h2><div class="strip" id="similar" data-testid="similar"></div>`;
    bindReview(id);
    if (clip) {
      const where = `input_id = '${row.input_id}' AND sample_id != '${id}'`;
      const siblings = await api(`samples?${query({ where, limit: 50, order_by: "clip_index" })}`);
      if (generation !== state.generation) return;
      $("#siblings").innerHTML = siblings.rows.length
        ? siblings.rows.map(card).join("") : "<p>No other clips.</p>";
      bindCards($("#siblings"));
    }
    const groups = await api(`duplicates/${id}`);
    if (generation !== state.generation) return;
    $("#duplicates").innerHTML = groups.members.length > 1
      ? groups.members.map(card).join("") : "<p>No duplicates.</p>";
    bindCards($("#duplicates"));
    try {
      const similar = await api(`samples/${id}/similar?k=12`);
      if (generation !== state.generation) return;
      $("#similar").innerHTML = similar.rows.map(card).join("");
      bindCards($("#similar"));
    } catch (error) {
      $("#similar").textContent = error.message;
    }
    showError("");
  } catch (error) {
    showError(error.message);
  }
}

// --- a person's verdict on the sample in view (POST /reviews) ------------------------------
function reviewPanel() {
  return `<div class="review" data-testid="review">
    <div><strong>Your verdict</strong> <span id="verdict" data-testid="verdict">…</span></div>
    <label>Reviewer <input id="r-who" data-testid="reviewer" size="12"
      value="${esc(localStorage.getItem("curate-reviewer") || "")}"></label>
    <label>Reason <input id="r-reason" data-testid="reason" size="22"
      placeholder="why reject (needed)"></label>
    <label>Tags <input id="r-tags" data-testid="tags" size="16" placeholder="a, b"></label>
    <div><button id="r-accept" data-testid="accept" type="button">Accept <kbd>a</kbd></button>
      <button id="r-reject" data-testid="reject" type="button">Reject <kbd>r</kbd></button>
      <button id="r-undo" data-testid="undo" type="button">Undo <kbd>u</kbd></button>
      <small><kbd>j</kbd>/<kbd>k</kbd> next/previous sample</small></div></div>`;
}

// What people said of the sample: its last verdict, given since the last run or before.
async function showVerdict(id) {
  const { reviews } = await api(`samples/${id}/reviews`);
  const last = reviews[reviews.length - 1];
  const text = !last || !last.review ? "none"
    : `${last.review}${last.review_reason ? `: ${last.review_reason}` : ""} (by ${
      last.reviewed_by}${last.review_tags && last.review_tags.length
        ? `; tags ${last.review_tags.join(", ")}` : ""})`;
  const box = $("#verdict");
  if (box) {
    box.textContent = text;
    box.dataset.review = last && last.review ? last.review : "";
  }
  return reviews;
}

async function review(id, verdict) {
  const reviewer = $("#r-who").value.trim();
  localStorage.setItem("curate-reviewer", reviewer);
  const tags = $("#r-tags").value.split(",").map((t) => t.trim()).filter(Boolean);
  try {
    await post("reviews", {
      sample_ids: [id], review: verdict, reviewer,
      reason: verdict === "reject" ? $("#r-reason").value : null,
      tags: verdict === "clear" ? null : tags,
    });
    await showVerdict(id);
    showError("");
  } catch (error) {
    showError(error.message);
  }
}

// Undo takes back the verdict given last: the one before it, or none.
async function undo(id) {
  const { reviews } = await api(`samples/${id}/reviews`);
  const earlier = reviews[reviews.length - 2];
  if (!earlier || !earlier.review) return review(id, "clear");
  $("#r-reason").value = earlier.review_reason || "";
  $("#r-tags").value = (earlier.review_tags || []).join(", ");
  return review(id, earlier.review);
}

function bindReview(id) {
  state.reviewing = id;
  $("#r-accept").addEventListener("click", () => review(id, "accept"));
  $("#r-reject").addEventListener("click", () => review(id, "reject"));
  $("#r-undo").addEventListener("click", () => undo(id));
  showVerdict(id).catch((error) => showError(error.message));
}

// Keys on a sample's view: a accept, r reject (with the reason typed), u undo, j/k the
// next/previous sample of the grid it was opened from. Not while typing in a field.
function onKey(event) {
  const id = state.reviewing;
  if (!id || !location.hash.startsWith("#/sample/") || event.ctrlKey || event.metaKey
      || event.altKey || ["INPUT", "SELECT", "TEXTAREA"].includes(event.target.tagName)) return;
  const actions = {
    a: () => review(id, "accept"), r: () => review(id, "reject"), u: () => undo(id),
    j: () => step(id, 1), k: () => step(id, -1),
  };
  const action = actions[event.key];
  if (action) {
    event.preventDefault();
    action();
  }
}

function step(id, by) {
  const ids = state.ids || [];
  const next = ids[ids.indexOf(id) + by];
  if (ids.includes(id) && next) location.hash = `#/sample/${next}`;
}

// --- stats ----------------------------------------------------------------------------------
function svg(width, height, body) {
  return `<svg width="${width}" height="${height}" role="img">${body}</svg>`;
}

function funnelChart(stages) {
  const top = Math.max(1, ...stages.map((s) => s.rows_in));
  const width = 720, label = 150, line = 24, room = width - label - 110;
  const body = stages.map((s, i) => {
    const y = i * line, kept = room * s.kept / top, out = room * s.dropped / top;
    return `<text x="0" y="${y + 16}" font-size="12">${esc(s.name)}</text>
      <rect x="${label}" y="${y + 4}" width="${kept}" height="16" fill="var(--kept)"/>
      <rect x="${label + kept}" y="${y + 4}" width="${out}" height="16" fill="var(--out)"/>
      <text x="${label + kept + out + 4}" y="${y + 16}" font-size="11">${s.kept} kept, ${s.dropped} out</text>`;
  }).join("");
  return svg(width, stages.length * line + 4, body);
}

function histogramChart(name, h) {
  if (!h.edges.length) return "";
  const width = 320, height = 150, plot = height - 36;
  const totals = h.selected.map((k, i) => k + h.rejected[i]);
  const top = Math.max(1, ...totals), step = (width - 10) / totals.length;
  const bars = h.selected.map((kept, i) => {
    const x = 5 + i * step, kh = plot * kept / top, dh = plot * h.rejected[i] / top;
    const base = height - 18;
    return `<rect x="${x}" y="${base - kh}" width="${step - 1}" height="${kh}" fill="var(--kept)"/>
      <rect x="${x}" y="${base - kh - dh}" width="${step - 1}" height="${dh}" fill="var(--out)"/>`;
  }).join("");
  return `<div class="chart" data-testid="histogram">${svg(width, height,
    `<text x="0" y="12" font-size="12" font-weight="600">${esc(name)}</text>${bars}
     <text x="0" y="${height - 3}" font-size="10">${h.edges[0].toPrecision(3)}</text>
     <text x="${width}" y="${height - 3}" font-size="10" text-anchor="end">${h.edges[h.edges.length - 1].toPrecision(3)}</text>`)}</div>`;
}

async function showStats() {
  try {
    const stats = await api("stats");
    const reasons = stats.rejected_by_reason.map((r) =>
      `<tr><td>${esc(r.stage)}</td><td>${esc(r.reason)}</td><td>${r.rows}</td></tr>`).join("");
    $("#view").innerHTML = `<h2>${stats.selected} of ${stats.rows} samples selected</h2>
      <h2>Funnel</h2><div class="chart" data-testid="funnel">${funnelChart(stats.funnel)}</div>
      <h2>Score distributions <small>(green selected, red rejected)</small></h2>
      <div class="charts">${Object.entries(stats.histograms).map(([n, h]) => histogramChart(n, h)).join("")}</div>
      <h2>Rejected by reason</h2><table class="columns">${reasons}</table>`;
    $("#count").textContent = "";
    showError("");
  } catch (error) {
    showError(error.message);
  }
}

// --- routing --------------------------------------------------------------------------------
function route() {
  const hash = location.hash || "#/";
  state.reviewing = null;
  if (hash.startsWith("#/sample/")) return showSample(hash.slice(9));
  if (hash === "#/stats") return showStats();
  if (hash.startsWith("#/search/")) return showSearch(decodeURIComponent(hash.slice(9)));
  return showGrid();
}

function init() {
  $("#search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("#search").value.trim();
    location.hash = text ? `#/search/${encodeURIComponent(text)}` : "#/";
  });
  $("#f-apply").addEventListener("click", () => {
    if (location.hash.startsWith("#/search/")) route();
    else if (location.hash === "" || location.hash === "#/") showGrid();
    else location.hash = "#/";
  });
  $("#token-save").addEventListener("click", () => {
    document.cookie = `curate_token=${encodeURIComponent($("#token").value)}; path=/; SameSite=Strict`;
    $("#token-box").hidden = true;
    loadFilterChoices().catch((e) => showError(e.message));
    route();
  });
  window.addEventListener("hashchange", route);
  document.addEventListener("keydown", onKey);
  loadFilterChoices().catch((e) => showError(e.message));
  route();
}

init();
