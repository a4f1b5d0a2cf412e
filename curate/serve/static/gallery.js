// The curate gallery: plain JavaScript over the REST API, no build step.
"use strict";

const PAGE = Number(new URLSearchParams(location.search).get("page")) || 48;
const $ = (sel) => document.querySelector(sel);
const state = {
  offset: 0, total: 0, loading: null, generation: 0, where: null, selected: "", observer: null,
  fetchPage: null,  // (offset) => {rows, total} of the grid in view (samples or a queue)
  picked: new Set(), pickedView: false, lastPicked: null, focus: null,
};

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
  const picked = state.picked.has(row.sample_id);
  return `<div class="card${picked ? " picked" : ""}" data-testid="card" data-id="${row.sample_id}">${picture}
    <div class="meta"><div class="name" title="${esc(row.uri)}">${esc(name)}</div>
    <span class="pick" role="checkbox" aria-checked="${picked}" aria-label="pick" data-testid="pick"
      title="pick (shift: a range)">✓</span>
    <span class="badge ${kept ? "kept" : "out"}">${kept ? "selected" : "rejected"}</span>
    <span class="verdict" data-testid="card-verdict"></span>
    <span class="reason" title="${esc(row.reject_reason)}">${esc(row.reject_reason || "")}${distance}</span>
    ${row._note ? `<div class="note" data-testid="note">${esc(row._note)}</div>` : ""}
    </div></div>`;
}

function bindCards(root) {
  root.querySelectorAll(".card").forEach((el) => {
    el.addEventListener("click", (event) => {
      if (event.target.closest(".pick")) pick(el, event.shiftKey);
      else location.hash = `#/sample/${el.dataset.id}`;
    });
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

// --- grids with infinite scroll: the samples, or a review queue -----------------------
// A grid under `header`, filled page by page from `fetchPage(offset)` ({rows, total,
// label}) as it scrolls; `render` draws a row; `wholeView`: the whole view can be picked.
async function showPages(header, fetchPage, render = card, wholeView = false) {
  // a new grid: pages still in flight for the previous one are dropped when they arrive
  state.generation = (state.generation || 0) + 1;
  state.offset = 0;
  state.total = 0;
  state.fetchPage = fetchPage;
  state.render = render;
  state.picked = new Set();
  state.pickedView = false;
  state.lastPicked = null;
  state.focus = null;
  $("#view").innerHTML = `${header}${reviewBar(wholeView)}
    <div class="grid" id="grid"></div><div id="sentinel"></div>`;
  bindReview();
  if (state.observer) state.observer.disconnect();
  state.observer = new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadPage();
  });
  state.observer.observe($("#sentinel"));
  await loadPage();
}

async function showGrid() {
  state.where = currentFilter();
  state.selected = $("#f-selected").value;
  const where = state.where, selected = state.selected;
  return showPages("", async (offset) => {
    const page = await api("samples?" + query({
      where, selected, limit: PAGE, offset, columns: await cardColumns(),
    }));
    return { ...page, label: `${Math.min(offset + page.rows.length, page.total)} of ${page.total} shown` };
  }, card, true);
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
    const page = await state.fetchPage(state.offset);
    if (generation !== state.generation) return;  // the view changed meanwhile
    state.total = page.total;
    state.offset += page.rows.length;
    const grid = $("#grid");
    if (!grid) return;
    const holder = document.createElement("div");
    holder.innerHTML = page.rows.map((row) => state.render(row)).join("");
    bindCards(holder);
    const added = [...holder.querySelectorAll(".card")].map((el) => el.dataset.id);
    grid.append(...holder.children);
    state.ids = [...grid.querySelectorAll(".card")].map((el) => el.dataset.id);
    $("#count").textContent = page.label;
    showPicked();
    showError("");
    await showBadges([...new Set(added)]);
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

// Each card's last verdict from people (given since the last run or before).
async function showBadges(ids) {
  for (let i = 0; i < ids.length; i += 100) {
    const chunk = ids.slice(i, i + 100);
    const { reviews } = await api("reviews?" + query({ sample_ids: chunk.join(",") }));
    for (const id of chunk) {
      const r = reviews[id];
      document.querySelectorAll(`.card[data-id="${id}"] .verdict`).forEach((el) => {
        const tags = r && r.review_tags && r.review_tags.length ? r.review_tags.join(", ") : "";
        el.textContent = !r ? "" : r.review ? `review: ${r.review}` : `tags: ${tags}`;
        el.className = r && r.review ? `verdict ${r.review}` : r ? "verdict tagged" : "verdict";
        el.title = r ? `${r.review || "tagged"} by ${r.reviewed_by}${
          r.review_reason ? `: ${r.review_reason}` : ""}${tags ? `; tags ${tags}` : ""}` : "";
      });
    }
  }
}

// --- picking cards of a grid: click their ✓, shift-click a range, x the focused card -----
function pick(el, range) {
  const cards = [...document.querySelectorAll("#grid .card")];
  const index = cards.indexOf(el);
  if (index < 0) return;  // the strips of a sample's view are not picked
  const on = !state.picked.has(el.dataset.id);
  const from = range && state.lastPicked !== null ? Math.min(index, state.lastPicked) : index;
  const to = range && state.lastPicked !== null ? Math.max(index, state.lastPicked) : index;
  // a range picks a queue's rows, not the kept copies shown beside them
  for (const other of cards.slice(from, to + 1)) {
    if (other === el || !other.classList.contains("kept-copy")) setPicked(other.dataset.id, on);
  }
  state.lastPicked = index;
  state.pickedView = false;
  showPicked();
}

function setPicked(id, on) {
  if (on) state.picked.add(id);
  else state.picked.delete(id);
  document.querySelectorAll(`#grid .card[data-id="${id}"]`).forEach((el) => {
    el.classList.toggle("picked", on);
    el.querySelector(".pick").setAttribute("aria-checked", String(on));
  });
}

function showPicked() {
  const box = $("#picked");
  if (box) {
    box.textContent = state.pickedView ? `the whole view (${state.total} rows) picked`
      : `${state.picked.size} picked`;
  }
  const grid = $("#grid");
  if (grid) grid.classList.toggle("all-picked", state.pickedView);
}

function clearPicks() {
  for (const id of [...state.picked]) setPicked(id, false);
  state.pickedView = false;
  state.lastPicked = null;
  showPicked();
}

function pickView() {
  clearPicks();
  state.pickedView = true;
  showPicked();
}

function focusedCard() {
  return [...document.querySelectorAll("#grid .card")][state.focus] || null;
}

function moveFocus(by) {
  const cards = [...document.querySelectorAll("#grid .card")];
  if (!cards.length) return;
  state.focus = state.focus === null ? 0 : Math.min(Math.max(state.focus + by, 0), cards.length - 1);
  cards.forEach((el) => el.classList.remove("focus"));
  cards[state.focus].classList.add("focus");
  cards[state.focus].scrollIntoView({ block: "nearest" });
}

function sentinelInView() {
  const sentinel = $("#sentinel");
  return sentinel !== null && sentinel.getBoundingClientRect().top < window.innerHeight;
}

async function showSearch(text) {
  state.picked = new Set();  // search results are not reviewed from here: open a sample
  $("#view").innerHTML = `<h2>Images like “${esc(text)}”</h2>
    <div class="grid results" id="grid"></div>`;
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
    state.reviewing = id;
    bindReview();
    showVerdict(id).catch((error) => showError(error.message));
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

// --- people's verdicts (POST /reviews): on the sample in view, or on a grid's picks ---------
function reviewFields() {
  return `<label>Reviewer <input id="r-who" data-testid="reviewer" size="12"
      value="${esc(localStorage.getItem("curate-reviewer") || "")}"></label>
    <label>Reason <input id="r-reason" data-testid="reason" size="22"
      placeholder="why reject (needed)"></label>
    <label>Tags <input id="r-tags" data-testid="tags" size="16" placeholder="a, b"></label>
    <div><button id="r-accept" data-testid="accept" type="button">Accept <kbd>a</kbd></button>
      <button id="r-reject" data-testid="reject" type="button">Reject <kbd>r</kbd></button>
      <button id="r-tag" data-testid="tag" type="button">Tag <kbd>t</kbd></button>
      <button id="r-undo" data-testid="undo" type="button">Undo <kbd>u</kbd></button></div>`;
}

function reviewPanel() {
  return `<div class="review" data-testid="review">
    <div><strong>Your verdict</strong> <span id="verdict" data-testid="verdict">…</span></div>
    ${reviewFields()}<small><kbd>j</kbd>/<kbd>k</kbd> next/previous sample</small></div>`;
}

function reviewBar(wholeView) {
  return `<div class="review bar" data-testid="bar"><div>
    <strong id="picked" data-testid="picked">0 picked</strong>
    ${wholeView ? '<button id="pick-view" data-testid="pick-view" type="button">Pick the whole view</button>' : ""}
    <button id="pick-none" data-testid="pick-none" type="button">Clear <kbd>Esc</kbd></button>
    <small>✓ picks a card (shift: a range); keys <kbd>j</kbd>/<kbd>k</kbd> move,
      <kbd>x</kbd> picks, <kbd>o</kbd> opens</small></div>${reviewFields()}</div>`;
}

function bindReview() {
  $("#r-accept").addEventListener("click", () => review("accept"));
  $("#r-reject").addEventListener("click", () => review("reject"));
  $("#r-tag").addEventListener("click", () => review("tag"));
  $("#r-undo").addEventListener("click", () => undo());
  if ($("#pick-view")) $("#pick-view").addEventListener("click", pickView);
  if ($("#pick-none")) $("#pick-none").addEventListener("click", clearPicks);
}

// What people said of the sample: its last verdict, given since the last run or before.
async function showVerdict(id) {
  const { reviews } = await api(`samples/${id}/reviews`);
  const last = reviews[reviews.length - 1];
  const tags = last && last.review_tags && last.review_tags.length
    ? `; tags ${last.review_tags.join(", ")}` : "";
  const text = !last || (!last.review && !tags) ? "none"
    : `${last.review || "none"}${last.review_reason ? `: ${last.review_reason}` : ""} (by ${
      last.reviewed_by}${tags})`;
  const box = $("#verdict");
  if (box) {
    box.textContent = text;
    box.dataset.review = last && last.review ? last.review : "";
  }
  return reviews;
}

function onSampleView() {
  return location.hash.startsWith("#/sample/");
}

// What a verdict is given on: the sample in view; else the grid's picks (or the whole
// view), or the focused card when none is picked.
function targets() {
  if (onSampleView()) return state.reviewing ? { sample_ids: [state.reviewing] } : null;
  if (state.pickedView) {
    return { where: state.where || "sample_id IS NOT NULL",
      selected: state.selected === "" ? null : state.selected === "true" };
  }
  const focused = focusedCard();
  const ids = state.picked.size ? [...state.picked] : focused ? [focused.dataset.id] : [];
  return ids.length ? { sample_ids: ids } : null;
}

// One verdict at a time: a key pressed twice sends its second request after the first's
// answer (an undo then sees the verdict the first undo gave).
function queued(action) {
  state.acting = (state.acting || Promise.resolve()).then(action, action);
  return state.acting;
}

// Ids go in requests of at most MAX_IDS (the server's limits.max_page by default).
const MAX_IDS = 500;

async function inChunks(target, send) {
  if (!target.sample_ids) return send(target);
  for (let i = 0; i < target.sample_ids.length; i += MAX_IDS) {
    await send({ ...target, sample_ids: target.sample_ids.slice(i, i + MAX_IDS) });
  }
}

function review(verdict) {
  return queued(async () => {
    const target = targets();
    if (!target) return showError("pick samples first: click their ✓ (shift-click: a range)");
    const reviewer = $("#r-who").value.trim();
    localStorage.setItem("curate-reviewer", reviewer);
    const tags = $("#r-tags").value.split(",").map((t) => t.trim()).filter(Boolean);
    try {
      await inChunks(target, (part) => post("reviews", {
        ...part, review: verdict, reviewer,
        reason: verdict === "reject" ? $("#r-reason").value : null,
        tags: verdict === "clear" ? null : tags,
      }));
      await reviewed(target);
      showError("");
    } catch (error) {
      showError(error.message);
    }
  });
}

// Undo takes back the last verdict on each target: the one before it again, or none.
function undo() {
  return queued(async () => {
    const target = targets();
    if (!target || !target.sample_ids) {
      return showError("undo takes back verdicts on picked cards: pick them (not a whole view)");
    }
    try {
      await inChunks(target, (part) => post("reviews/undo", {
        sample_ids: part.sample_ids, reviewer: $("#r-who").value.trim() }));
      await reviewed(target);
      showError("");
    } catch (error) {
      showError(error.message);
    }
  });
}

async function reviewed(target) {
  if (onSampleView()) return showVerdict(state.reviewing);
  const ids = target.sample_ids || [...document.querySelectorAll("#grid .card")].map((el) => el.dataset.id);
  await showBadges([...new Set(ids)]);
  if (state.afterReview) await state.afterReview();
}

// Keys on a sample's view and on grids (not while typing in a field): a accept, r reject
// (with the reason typed), t tag (with the tags typed), u undo; on a sample j/k the next/previous sample of the grid it
// was opened from; on a grid j/k move the focus, x picks the focused card, o opens it,
// Escape clears the picks.
function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey
      || ["INPUT", "SELECT", "TEXTAREA"].includes(event.target.tagName)) return;
  const onSample = onSampleView() && state.reviewing;
  if (!onSample && !($("#grid") && $("#r-accept"))) return;
  const actions = {
    a: () => review("accept"), r: () => review("reject"), t: () => review("tag"),
    u: () => undo(),
    j: () => (onSample ? step(1) : moveFocus(1)), k: () => (onSample ? step(-1) : moveFocus(-1)),
  };
  if (!onSample) {
    Object.assign(actions, {
      x: () => { if (focusedCard()) pick(focusedCard(), false); },
      o: () => { if (focusedCard()) location.hash = `#/sample/${focusedCard().dataset.id}`; },
      Escape: clearPicks,
    });
  }
  const action = actions[event.key];
  if (action) {
    event.preventDefault();
    action();
  }
}

function step(by) {
  const id = state.reviewing;
  const ids = state.ids || [];
  const next = ids[ids.indexOf(id) + by];
  if (ids.includes(id) && next) location.hash = `#/sample/${next}`;
}

// --- review queues (GET /queues): where a person's look is worth most ----------------------
const QUEUE_KINDS = {
  threshold: "Near a filter's limit", disagree: "Scores that disagree",
  duplicates: "Copies at the edge of a dedup's limit",
  near: "Just past a dedup's limit: rows it did not call copies", audit: "Audit the selection",
};

async function showQueues() {
  try {
    const { queues } = await api("queues");
    const lists = Object.entries(QUEUE_KINDS).map(([kind, title]) => {
      const mine = queues.filter((q) => q.kind === kind);
      return mine.length ? `<h3>${title}</h3><ul class="queues">${mine.map((q) =>
        `<li><a data-testid="queue" href="#/queue/${encodeURIComponent(q.name)}">${esc(q.title)}</a></li>`).join("")}</ul>` : "";
    }).join("");
    $("#view").innerHTML = `<h2>Review queues</h2>${lists || "<p>This table offers no queue.</p>"}`;
    $("#count").textContent = "";
    showError("");
  } catch (error) {
    showError(error.message);
  }
}

function fmt(value) {
  return typeof value === "number" ? Number(value.toPrecision(4)).toString() : String(value);
}

// A queue's row: its card with what placed it there; a copy beside its kept copy, a row
// just past a dedup's limit beside its nearest.
function queueCard(row) {
  const q = row._queue || {};
  if (row._kept !== undefined) {
    const kept = row._kept ? card(row._kept).replace('class="card', 'class="card kept-copy')
      : '<div class="gone"><div class="none">the other row is gone</div></div>';
    return `<div class="pair" data-testid="pair">${card(row)}${kept}
      <div class="note" data-testid="distance">distance ${q.distance == null ? "?" : fmt(q.distance)}
      (limit ${fmt(q.limit)})</div></div>`;
  }
  if ("passes" in q) row._note = `${fmt(q.value)} vs ${q.side} ${fmt(q.limit)}: ${q.passes ? "passes" : "fails"}`;
  else if ("disagreement" in q) {
    row._note = `${Object.entries(q).filter(([k]) => k !== "disagreement")
      .map(([k, v]) => `${k} ${fmt(v)}`).join(", ")} · rank gap ${q.disagreement}`;
  } else if ("audit_rank" in q) row._note = `audit #${q.audit_rank + 1}`;
  return card(row);
}

function drawEstimate(e) {
  const box = $("#estimate");
  if (!box || !e) return;
  const pct = (x) => `${(100 * x).toFixed(1)}%`;
  box.textContent = e.reviewed
    ? `precision ${pct(e.precision)} (95%: ${pct(e.interval_95[0])}–${pct(e.interval_95[1])}): `
      + `${e.accepted} of ${e.reviewed} reviewed accepted; ${e.reviewed} of ${e.sample} audited`
    : `none of the ${e.sample} samples reviewed yet`;
}

async function showQueue(name, seed) {
  const audit = name === "audit";
  const header = `<h2 data-testid="queue-title" id="queue-title">${esc(name)}</h2>${audit
    ? `<p>A seeded random sample of the selection: the share people accept estimates its
      precision. Seed <input id="audit-seed" data-testid="seed" type="number" value="${seed}">
      <strong id="estimate" data-testid="estimate"></strong></p>` : ""}`;
  const shown = showPages(header, async (offset) => {
    const generation = state.generation;
    const page = await api(`queues/${encodeURIComponent(name)}?` + query({
      offset, limit: PAGE, seed: audit ? seed : null, columns: await cardColumns(),
    }));
    if (generation === state.generation) {  // still this queue's view
      $("#queue-title").textContent = page.queue.title;
      drawEstimate(page.estimate);
    }
    const count = offset + page.rows.length;
    return { rows: page.rows, total: count + (page.more ? 1 : 0),
      label: `${count} shown${page.more ? ", more below" : ""}` };
  }, queueCard);
  // the header is drawn before the first page is asked for
  if (audit) {
    const generation = state.generation;
    state.afterReview = async () => {
      const { estimate } = await api("queues/audit?" + query({ limit: 1, seed }));
      if (generation === state.generation) drawEstimate(estimate);
    };
    $("#audit-seed").addEventListener("change", () => {
      location.hash = `#/queue/audit?seed=${Number($("#audit-seed").value) || 0}`;
    });
  }
  await shown;
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
      <text x="${label + kept + out + 4}" y="${y + 16}" font-size="11">${s.kept} kept, ${s.dropped} out${
        s.pending ? ` (+${s.pending} not computed yet)` : ""}${s.decided_again ? " (decided again)" : ""}</text>`;
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
      <h2>What if <small>(move a limit: the counts come from the stored scores; Apply
        runs the config with it)</small></h2>
      <label>Reviewer <input id="apply-who" data-testid="apply-reviewer" size="12"
        value="${esc(localStorage.getItem("curate-reviewer") || "")}"></label>
      <div id="whatifs"></div>
      <h2>Applied limits</h2><div id="applies"></div>
      <h2>Rejected by reason</h2><table class="columns">${reasons}</table>`;
    $("#count").textContent = "";
    showError("");
    await Promise.all([showWhatIfs(stats), showApplies()]);
  } catch (error) {
    showError(error.message);
  }
}

// A slider and a field per limit of the last run's score filters; each move asks
// GET /whatif for what it would change (the answer of the last move asked wins).
async function showWhatIfs(stats) {
  const { queues } = await api("queues");
  const limits = queues.filter((q) => q.kind === "threshold");
  const box = $("#whatifs");
  if (!box) return;
  box.innerHTML = limits.map((q) => {
    const edges = (stats.histograms[q.column] || {}).edges || [];
    const low = Math.min(q.limit, edges.length ? edges[0] : q.limit);
    const high = Math.max(q.limit, edges.length ? edges[edges.length - 1] : q.limit + 1);
    const step = (high - low) / 200 || 0.01;
    return `<div class="whatif" data-testid="whatif" data-queue="${esc(q.name)}">
      <label>${esc(q.stage)}: ${esc(q.column)} ${q.side}
        <input type="range" data-testid="whatif-range" min="${low}" max="${high}"
          step="${step}" value="${q.limit}">
        <input type="number" data-testid="whatif-value" step="any" value="${q.limit}"></label>
      <span data-testid="whatif-counts">at the run's limit ${fmt(q.limit)}</span>
      <button data-testid="whatif-apply" disabled>Apply</button>
      <div class="strip" data-testid="whatif-strip"></div>
      <details><summary data-testid="whatif-funnel-open">Funnel</summary>
        <div data-testid="whatif-funnel"></div></details></div>`;
  }).join("") || "<p>The last run's filters set no limit on a score.</p>";
  box.querySelectorAll(".whatif").forEach((el) => {
    const range = el.querySelector("[data-testid=whatif-range]");
    const field = el.querySelector("[data-testid=whatif-value]");
    let asked = 0;
    const move = async (value) => {
      const mine = ++asked;
      try {
        const funnel = el.querySelector("details").open;
        const answer = await api(`whatif/${encodeURIComponent(el.dataset.queue)}?` + query({
          value, strip: 12, columns: await cardColumns(), funnel: funnel || null }));
        if (mine !== asked) return;  // a later move was asked meanwhile
        el.querySelector("[data-testid=whatif-counts]").textContent =
          `at ${fmt(answer.value)}: ${answer.selected} → ${answer.selected_after} selected `
          + `before dedup and sampling decide again (${answer.leaving} leave, `
          + `${answer.entering} enter the row filters)`;
        const rows = [...answer.leave.map((r) => ({ ...r, _note: "would leave" })),
          ...answer.enter.map((r) => ({ ...r, _note: "would enter" }))];
        const strip = el.querySelector("[data-testid=whatif-strip]");
        strip.innerHTML = rows.map(card).join("");
        bindCards(strip);
        el.querySelector("[data-testid=whatif-funnel]").innerHTML =
          answer.funnel ? funnelChart(answer.funnel) : "";
        showError("");
      } catch (error) {
        showError(error.message);
      }
    };
    const button = el.querySelector("[data-testid=whatif-apply]");
    const limit = Number(limits.find((q) => q.name === el.dataset.queue).limit);
    const moved = () => { button.disabled = Number(field.value) === limit; };
    range.addEventListener("input", () => {
      field.value = range.value; moved(); move(range.value);
    });
    field.addEventListener("change", () => {
      range.value = field.value; moved(); move(field.value);
    });
    button.addEventListener("click", () => applyLimit(el.dataset.queue, Number(field.value)));
    // the projected funnel reads more (the rows' reasons): asked for while it is open
    el.querySelector("details").addEventListener("toggle", (event) => {
      if (event.target.open && Number(field.value) !== limit) move(field.value);
    });
  });
}

// Apply: the moved limit becomes a new config version that the server runs (POST
// /applies); the stats page follows the run and shows the new table when it ends.
async function applyLimit(name, value) {
  const reviewer = $("#apply-who").value.trim();
  localStorage.setItem("curate-reviewer", reviewer);
  try {
    const started = await post("applies", { queue: name, value, reviewer });
    await showApplies();
    let status = started.status;
    while (status === "running") {
      await new Promise((done) => setTimeout(done, 1000));
      if (location.hash !== "#/stats") return;  // left the page: it shows it on return
      status = (await api(`applies/${encodeURIComponent(started.apply_id)}`)).status;
    }
    await showStats();
  } catch (error) {
    showError(error.message);
  }
}

async function showApplies() {
  const box = $("#applies");
  const { applies } = await api("applies");
  if (!box) return;
  box.innerHTML = applies.length ? `<table class="columns" data-testid="applies">
    <tr><td>when</td><td>who</td><td>change</td><td>status</td><td>selected</td><td>config</td></tr>
    ${applies.map((a) => `<tr data-apply="${esc(a.apply_id)}">
      <td>${esc(a.started_at.slice(0, 19).replace("T", " "))}</td><td>${esc(a.by)}</td>
      <td>${esc(a.change.stage)}.${esc(a.change.param)} ${fmt(a.change.before)} → ${fmt(a.change.after)}</td>
      <td data-testid="apply-status" title="${esc(a.error || "")}">${esc(a.status)}</td>
      <td>${a.selected ?? ""}</td>
      <td><a href="applies/${encodeURIComponent(a.apply_id)}/config.yaml">${esc(a.config_hash)}</a></td>
    </tr>`).join("")}</table>` : "<p>No limit applied from here yet.</p>";
}

// --- routing --------------------------------------------------------------------------------
function route() {
  const hash = location.hash || "#/";
  state.reviewing = null;
  state.afterReview = null;
  if (hash.startsWith("#/sample/")) return showSample(hash.slice(9));
  if (hash === "#/stats") return showStats();
  if (hash === "#/review") return showQueues();
  if (hash.startsWith("#/queue/")) {
    const [name, params] = hash.slice(8).split("?");
    const seed = Number(new URLSearchParams(params || "").get("seed")) || 0;
    return showQueue(decodeURIComponent(name), seed);
  }
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
