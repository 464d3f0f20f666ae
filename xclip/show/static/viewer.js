// xclip view: the pair table and one pair's map. Data come from the xclip server (api/...) or, in an
// exported site, from window.XCLIP_STATIC (data.js). Maps are computed here from the pair's interaction
// matrix: a span's map is the sum of its tokens' rows; a box's word values are sums over its patches' columns.
"use strict";

const STATIC = window.XCLIP_STATIC || null;
const DISPLAY = 320; // the image's width on the page, as the server draws its contours
const state = {
  query: { sort: "index", order: "asc", status: "all", text: "", min_score: "", max_score: "", max_error: "", offset: 0, limit: 100 },
  summary: null, pair: null, span: null, selection: [], selectionLabel: "", hover: null, box: null, runScale: null,
  drag: null, boxDrag: null, link: "",
};
const $ = (id) => document.getElementById(id);

// --- readiness -------------------------------------------------------------------------------------------
// body[data-busy] counts the work in flight (requests, and drawing their answers): "0" once the page shows the
// answer to everything asked of it, so that tests and scripts wait for that rather than for a guessed time
let busy = 0;

function setBusy(change) {
  busy += change;
  document.body.dataset.busy = String(busy);
}

function tracked(work) {
  return async (...args) => {
    setBusy(1); // at once, before the first await: a caller that just clicked sees the page busy
    try {
      return await work(...args);
    } finally {
      setBusy(-1);
    }
  };
}

// --- data ------------------------------------------------------------------------------------------------
async function api(path, params = {}) {
  if (STATIC) return staticAnswer(path, params);
  const url = new URL(path, window.location.href);
  for (const [key, value] of Object.entries(params)) if (value !== "" && value !== null) url.searchParams.set(key, value);
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function staticAnswer(path, params) {
  if (path === "api/run") return STATIC.summary;
  if (path === "api/failures") return STATIC.failures;
  if (path === "api/scale") return STATIC.scale;
  if (path === "api/pairs") return queryRows(STATIC.rows, params);
  const match = path.match(/^api\/pair\/(\d+)$/);
  if (match && STATIC.pairs[match[1]]) return STATIC.pairs[match[1]];
  throw new Error(`this exported site holds no ${path.replace(/^api\//, "")}`);
}

// the server's PairQuery, for the few rows of an exported site
function queryRows(rows, q) {
  const number = (text, otherwise) => (text === "" || text === undefined ? otherwise : Number(text));
  const minScore = number(q.min_score, -Infinity), maxScore = number(q.max_score, Infinity), maxError = number(q.max_error, Infinity);
  let kept = rows.filter((row) =>
    (q.status === "all" || row.status === q.status) &&
    (!q.text || row.caption.toLowerCase().includes(q.text.toLowerCase())) &&
    (!(isFinite(minScore) || isFinite(maxScore)) || (row.score !== null && row.score >= minScore && row.score <= maxScore)) &&
    (!isFinite(maxError) || (row.relative_completeness_error !== null && row.relative_completeness_error <= maxError)));
  const descending = q.order === "desc";
  const key = (row) => {
    if (q.sort === "caption" || q.sort === "image") return row[q.sort].toLowerCase();
    const value = row[q.sort];
    return value === null ? (descending ? -Infinity : Infinity) : value;
  };
  kept = kept.map((row, position) => [key(row), position, row])
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] - b[1])).map((entry) => entry[2]);
  if (descending) kept.reverse();
  return { total: kept.length, offset: q.offset, rows: kept.slice(q.offset, q.offset + q.limit) };
}

function imageUrl(index, kind) {
  return STATIC ? STATIC[kind === "image" ? "images" : "contours"][index] : `api/pair/${index}/${kind}.png`;
}

// --- colours ---------------------------------------------------------------------------------------------
function lutIndex(value, halfrange) {
  const normalised = Math.min(Math.max((value / halfrange + 1) / 2, 0), 1);
  return Math.min(Math.floor(normalised * 256), 255);
}

function colour(value, halfrange) {
  return state.summary.lut[lutIndex(value, halfrange)];
}

function rgb(hex) {
  return [1, 3, 5].map((k) => parseInt(hex.slice(k, k + 2), 16));
}

function format(value, digits = 4) {
  return value === null || value === undefined ? "–" : Number(value).toPrecision(digits);
}

// a table cell's number: blank for a pair without one (pending or failed), not a dash that reads as a value
function cellNumber(value, digits) {
  return value === null ? "" : format(value, digits);
}

function setNumber(id, value, digits) {
  const element = $(id);
  element.textContent = format(value, digits);
  element.dataset.value = value === null ? "" : String(value);
}

// a horizontal colour bar from -h (left) to +h (right), with its values
function drawScale(canvas, h, lowId, highId) {
  const context = canvas.getContext("2d");
  const lut = state.summary.lut;
  for (let x = 0; x < canvas.width; x++) {
    context.fillStyle = lut[lutIndex(-h + (2 * h * (x + 0.5)) / canvas.width, h)];
    context.fillRect(x, 0, 1, canvas.height);
  }
  canvas.dataset.halfrange = String(h);
  $(lowId).textContent = `−${format(h, 2)}`;
  $(highId).textContent = `+${format(h, 2)}`;
}

// --- the table -------------------------------------------------------------------------------------------
const loadSummary = tracked(async () => {
  state.summary = await api("api/run");
  const c = state.summary.counts.pairs;
  $("run-info").textContent = `${state.summary.run} · ${state.summary.model} · ${c.total} pairs: ${c.done} done, ` +
    `${c.failed} failed, ${c.pending} pending` + (STATIC ? " · exported pairs only" : "");
  return state.summary;
});

let tableRequests = 0;

const loadTable = tracked(async () => {
  // typing sends a request per key, and the replies may arrive in any order: only the newest request's reply
  // (or error) is applied, the others are dropped
  const request = ++tableRequests;
  let answer;
  try {
    answer = await api("api/pairs", state.query);
  } catch (error) {
    if (request === tableRequests) throw error;
    return;
  }
  if (request === tableRequests) fillTable(answer);
});

function refreshTable() {
  loadTable().catch(showError);
}

function fillTable(answer) {
  $("pairs").querySelector("tbody").replaceChildren(...answer.rows.map(tableRow));
  const last = Math.min(answer.offset + state.query.limit, answer.total);
  $("page-info").textContent = answer.total ? `${answer.offset + 1}–${last} of ${answer.total}` : "no pairs";
  $("previous").disabled = answer.offset === 0;
  $("next").disabled = last >= answer.total;
  for (const th of $("pairs").querySelectorAll("th")) {
    th.classList.toggle("sorted-asc", th.dataset.sort === state.query.sort && state.query.order === "asc");
    th.classList.toggle("sorted-desc", th.dataset.sort === state.query.sort && state.query.order === "desc");
  }
}

function tableRow(row) {
  const tr = document.createElement("tr");
  tr.dataset.index = row.index;
  tr.className = row.status + (state.pair && state.pair.index === row.index ? " current" : "");
  const caption = textCell(row.caption);
  caption.className = "caption";
  caption.title = row.caption; // the cell shows one line, cut with an ellipsis; the whole caption on hover
  tr.append(textCell(row.index), caption, imageCell(row), textCell(cellNumber(row.score)),
    textCell(cellNumber(row.relative_completeness_error, 2)), textCell(row.status === "failed" ? `failed: ${row.error}` : row.status));
  tr.addEventListener("click", () => { if (row.status === "done") openPair(row.index); });
  return tr;
}

function textCell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function imageCell(row) {
  const td = document.createElement("td");
  td.className = "image";
  if (row.thumbnail) { // none for an image the run has not read yet
    const thumbnail = document.createElement("img");
    thumbnail.alt = "";
    thumbnail.loading = "lazy"; // a page of 100 rows fetches only the thumbnails scrolled into view
    thumbnail.src = row.thumbnail;
    td.append(thumbnail);
  }
  const name = document.createElement("span");
  name.textContent = row.image;
  td.append(name);
  return td;
}

const loadFailures = tracked(async () => {
  const failures = await api("api/failures");
  $("failure-count").textContent = failures.length;
  $("failures").querySelector("ul").replaceChildren(...failures.map((f) => {
    const li = document.createElement("li");
    li.textContent = `${f.group.replace(/s$/, "")} ${f.index} (${f.item}): ${f.reason}`;
    return li;
  }));
});

function bindTable() {
  for (const th of $("pairs").querySelectorAll("th")) {
    th.addEventListener("click", () => {
      const same = state.query.sort === th.dataset.sort;
      state.query.order = same && state.query.order === "asc" ? "desc" : same ? "asc" : th.dataset.sort === "score" ? "desc" : "asc";
      state.query.sort = th.dataset.sort;
      state.query.offset = 0;
      refreshTable();
    });
  }
  const filters = { "filter-text": "text", "filter-status": "status", "min-score": "min_score", "max-score": "max_score", "max-error": "max_error" };
  for (const [id, key] of Object.entries(filters)) {
    $(id).addEventListener("input", () => {
      state.query[key] = $(id).value;
      state.query.offset = 0;
      refreshTable();
    });
  }
  $("previous").addEventListener("click", () => { state.query.offset = Math.max(0, state.query.offset - state.query.limit); refreshTable(); });
  $("next").addEventListener("click", () => { state.query.offset += state.query.limit; refreshTable(); });
}

// --- one pair --------------------------------------------------------------------------------------------
let pairRequests = 0;

// a pair, and in it the span and box of `view` (from a link; none: the whole caption, no box)
const showPair = tracked(async (index, view = {}) => {
  // clicks and links may come faster than the answers, as filters do: only the newest is shown
  const request = ++pairRequests;
  const pair = await api(`api/pair/${index}`);
  if (request !== pairRequests) return;
  const image = $("image");
  await loadPicture(image, imageUrl(index, "image"));
  if (request !== pairRequests) return; // a newer pair's picture replaced this one's
  state.pair = pair;
  state.hover = null;
  $("placeholder").hidden = true;
  $("pair").hidden = false;
  // a truncated caption: the words the model read, the cut marked (the rest is shown struck through under the words)
  const read = pair.unread ? `“${pair.caption.slice(0, pair.read_end)}” ✂ cut at the model's context` : `“${pair.caption}”`;
  $("pair-title").textContent = `pair ${index}: ${read} · ${pair.image}`;
  setNumber("score", pair.score);
  setNumber("four-term-value", pair.four_term_value);
  setNumber("completeness-error", pair.completeness_error, 3);
  setNumber("relative-error", pair.relative_completeness_error, 3);
  setNumber("map-error-bound", pair.map_error_bound, 3);
  $("inexact-note").textContent = pair.inexact_note || "";
  $("inexact-note").hidden = !pair.inexact_note;
  // what the model read: a truncated caption, unknown words, a crop (worded as the figures word them)
  $("input-notes").replaceChildren(...pair.input_notes.map((note) => {
    const li = document.createElement("li");
    li.textContent = note;
    return li;
  }));
  $("input-notes").hidden = !pair.input_notes.length;
  $("terms").textContent = pair.terms.map((t) => format(t)).join(", ");
  $("terms").dataset.value = JSON.stringify(pair.terms);
  for (const tr of $("pairs").querySelectorAll("tbody tr")) tr.classList.toggle("current", Number(tr.dataset.index) === index);
  // a summary run (output.contributions: none) keeps no map: its tokens' summary, and how to get the map
  const hasMap = pair.interactions !== null;
  for (const id of ["views", "scale", "map-hint", "caption", "selection"]) $(id).hidden = !hasMap;
  $("summary-only").hidden = hasMap;
  if (!hasMap) {
    $("box-info").hidden = true;
    $("unread").hidden = true;
    showTokenTable(pair);
    $("pair").dataset.index = index;
    return;
  }
  $("contours").src = imageUrl(index, "contours");
  for (const canvas of [$("map"), $("box-layer")]) {
    canvas.width = image.naturalWidth || DISPLAY;
    canvas.height = image.naturalHeight || DISPLAY;
  }
  buildCaption();
  state.box = view.box ? boxFrom(view.box.slice(0, 2), view.box.slice(2)) : null;
  drawBox();
  showBoxValues();
  await selectSpan(findSpan(view));
  $("pair").dataset.index = index; // drawn: what tests and scripts wait for
});

// a summary run's pair: one row per caption position, the facts its summary keeps
function showTokenTable(pair) {
  $("summary-note").textContent = pair.summary_note;
  const pairText = (values) => `${format(values[0], 3)}, ${format(values[1], 3)}`;
  $("token-table").querySelector("tbody").replaceChildren(...pair.token_table.map((row) => {
    const tr = document.createElement("tr");
    const cells = [row.token, format(row.value), format(row.score_share, 3), (row.peak_patch ? `${row.peak_patch[0]}, ${row.peak_patch[1]}` : "–"),
      format(row.peak_value), format(row.top_share, 3), format(row.entropy, 3), pairText(row.centroid), format(row.spread, 3)];
    tr.replaceChildren(...cells.map((text) => {
      const td = document.createElement("td");
      td.textContent = text;
      return td;
    }));
    return tr;
  }));
}

// resolves once `image` shows `url`, or failed to (it shows nothing then); a picture the browser holds already
// may be complete at once
function loadPicture(image, url) {
  return new Promise((resolve) => {
    for (const event of ["load", "error", "abort"]) image.addEventListener(event, resolve, { once: true });
    image.src = url;
    if (image.complete) resolve();
  });
}

// a pair chosen in the table: a new entry in the browser's history, so that Back returns to the previous one
function openPair(index) {
  notify("");
  showPair(index).then(() => writeLink(true)).catch(showError);
}

// what hovering a chip explains beyond its map: an unknown word's map is its unknown token's ("" for other chips)
function chipTitle(chip) {
  return chip.unknown ? `the tokenizer did not know “${chip.text}”: the model read its unknown token, and this map is that token's, not the word's` : "";
}

function buildCaption() {
  const caption = $("caption");
  caption.replaceChildren(...state.pair.chips.map((chip, position) => {
    const span = document.createElement("span");
    span.className = "chip" + (chip.special ? " special" : "") + (chip.unknown ? " unknown" : "");
    span.textContent = chip.text;
    span.title = chipTitle(chip);
    span.dataset.position = position;
    span.dataset.rows = chip.rows.join(",");
    span.addEventListener("mousedown", (event) => {
      event.preventDefault();
      state.drag = position;
      selectSpan([position, position]);
    });
    span.addEventListener("mouseenter", () => {
      if (state.drag !== null) {
        selectSpan([Math.min(state.drag, position), Math.max(state.drag, position)]);
      } else {
        state.hover = chip;
        drawMap();
      }
    });
    return span;
  }));
  // the tail the model's context cut off: shown struck through after the words it read; it is in no map
  $("unread-text").textContent = state.pair.unread;
  $("unread").hidden = !state.pair.unread;
  caption.onmouseleave = () => { state.hover = null; drawMap(); };
}

// the words of chips start..end, as a link names a span
function spanText([start, end]) {
  return state.pair.chips.slice(start, end + 1).map((chip) => chip.text).join(" ");
}

// every run of chips whose words are `text`, as [start, end]
function spanRanges(text) {
  const ranges = [];
  for (let start = 0; start < state.pair.chips.length; start++) {
    for (let end = start; end < state.pair.chips.length; end++) {
      const words = spanText([start, end]);
      if (words === text) ranges.push([start, end]);
      if (words.length >= text.length) break; // longer runs only add words
    }
  }
  return ranges;
}

// a link's span as chip positions [start, end]: its words, starting at chip `at` where given; null for none (the
// whole caption), with a notice when the caption holds no such words
function findSpan({ span, at }) {
  if (!span) return null;
  const ranges = spanRanges(span);
  const range = at === undefined ? ranges[0] : ranges.find(([start]) => start === at);
  if (range === undefined) {
    notify(`this link's span “${span}” is not in pair ${state.pair.index}'s caption: the whole caption is shown`);
    return null;
  }
  return range;
}

// span: chip positions [start, end], or null for all the caption's words; resolves once its map is drawn
function selectSpan(span) {
  const { chips } = state.pair;
  const words = chips.filter((chip) => !chip.special);
  const chosen = span ? chips.slice(span[0], span[1] + 1) : words.length ? words : chips;
  state.span = span;
  state.selection = chosen.flatMap((chip) => chip.rows);
  state.selectionLabel = span ? spanText(span) : "all words";
  for (const element of $("caption").children) {
    const position = Number(element.dataset.position);
    element.classList.toggle("selected", span !== null && position >= span[0] && position <= span[1]);
  }
  const total = patchValues(state.selection).reduce((sum, v) => sum + v, 0);
  $("selection-text").textContent = state.selectionLabel;
  $("selection-text").dataset.rows = state.selection.join(",");
  setNumber("selection-total", total);
  return drawMap();
}

function patchValues(rows) {
  const { interactions, n_prefix: prefix, grid } = state.pair;
  const values = new Float64Array(grid[0] * grid[1]);
  for (const r of rows) for (let p = 0; p < values.length; p++) values[p] += interactions[r][prefix + p];
  return values;
}

async function halfrange(values) {
  const mode = document.querySelector("input[name=scale]:checked").value;
  if (mode === "run") {
    if (!state.runScale) {
      state.runScale = await api("api/scale");
      $("run-scale-info").textContent = `± ${format(state.runScale.value, 3)} (largest of ${state.runScale.pairs} pairs' token maps)`;
    }
    return state.runScale.value;
  }
  if (mode === "fixed") return Number($("fixed-scale").value) || 1;
  const note = await tinyMapNote();
  $("scale-note").textContent = note || "";
  $("scale-note").hidden = !note;
  if (note) return state.runScale.value;
  return values.reduce((peak, v) => Math.max(peak, Math.abs(v)), 0) || 1;
}

// a map this much smaller than the run's largest is drawn on the run's scale: stretched to the full colour range, its
// noise would read as strong interactions
const TINY_MAP_SHARE = 0.01;

// why "this map" uses the run's scale for the pair shown, or null where it stretches the map to its own peak
async function tinyMapNote() {
  const words = state.pair.chips.filter((chip) => !chip.special);
  const allUnknown = words.length > 0 && words.every((chip) => chip.unknown);
  if (!state.runScale) state.runScale = await api("api/scale");
  const peak = state.pair.map_peak, run = state.runScale.value;
  const scales = `(±${format(peak, 2)} at most, the run's token maps ±${format(run, 2)})`;
  if (allUnknown) return `every word of this caption is unknown to the tokenizer: its map ${scales} is drawn on the run's scale, not stretched to the full colour range`;
  if (peak < TINY_MAP_SHARE * run) return `this map is tiny next to the run's ${scales}: it is drawn on the run's scale, not stretched to the full colour range`;
  return null;
}

// bilinear interpolation of the values (never of colours: every pixel gets a colour of the bar)
const drawMap = tracked(async () => {
  if (!state.pair) return;
  const hover = state.hover;
  const rows = hover ? hover.rows : state.selection;
  const values = patchValues(rows);
  const h = await halfrange(values);
  const [gridRows, gridCols] = state.pair.grid;
  const canvas = $("map");
  const context = canvas.getContext("2d");
  const picture = context.createImageData(canvas.width, canvas.height);
  const lut = state.summary.lut.map(rgb);
  for (let y = 0; y < canvas.height; y++) {
    const gy = Math.min(Math.max((y + 0.5) * gridRows / canvas.height - 0.5, 0), gridRows - 1);
    const y0 = Math.floor(gy), y1 = Math.min(y0 + 1, gridRows - 1), fy = gy - y0;
    for (let x = 0; x < canvas.width; x++) {
      const gx = Math.min(Math.max((x + 0.5) * gridCols / canvas.width - 0.5, 0), gridCols - 1);
      const x0 = Math.floor(gx), x1 = Math.min(x0 + 1, gridCols - 1), fx = gx - x0;
      const top = values[y0 * gridCols + x0] * (1 - fx) + values[y0 * gridCols + x1] * fx;
      const bottom = values[y1 * gridCols + x0] * (1 - fx) + values[y1 * gridCols + x1] * fx;
      const [r, g, b] = lut[lutIndex(top * (1 - fy) + bottom * fy, h)];
      const k = 4 * (y * canvas.width + x);
      picture.data[k] = r; picture.data[k + 1] = g; picture.data[k + 2] = b; picture.data[k + 3] = 255;
    }
  }
  context.putImageData(picture, 0, 0);
  canvas.dataset.halfrange = String(h);
  canvas.dataset.rows = rows.join(",");
  $("map-title").textContent = hover ? `map of “${hover.text}” (under the pointer)` : `map of: ${state.selectionLabel}`;
  drawBar(h, lut);
});

function drawBar(h, lut) {
  const bar = $("bar");
  const context = bar.getContext("2d");
  for (let y = 0; y < bar.height; y++) {
    const value = h - (2 * h * (y + 0.5)) / bar.height;
    const [r, g, b] = lut[lutIndex(value, h)];
    context.fillStyle = `rgb(${r},${g},${b})`;
    context.fillRect(0, y, bar.width, 1);
  }
  $("bar-top").textContent = `+${format(h, 2)}`;
  $("bar-bottom").textContent = `−${format(h, 2)}`;
}

// --- boxes -----------------------------------------------------------------------------------------------
function canvasPoint(canvas, event) {
  const rect = canvas.getBoundingClientRect();
  return [(event.clientX - rect.left) * canvas.width / rect.width, (event.clientY - rect.top) * canvas.height / rect.height];
}

function bindBox() {
  const layer = $("box-layer");
  layer.addEventListener("mousedown", (event) => {
    event.preventDefault();
    state.boxDrag = canvasPoint(layer, event);
  });
  layer.addEventListener("mousemove", (event) => {
    if (!state.boxDrag) return;
    const [x, y] = canvasPoint(layer, event);
    state.box = boxFrom(state.boxDrag, [x, y]);
    drawBox();
  });
  document.addEventListener("mouseup", (event) => {
    if (state.drag !== null) { // a span was chosen: its link
      state.drag = null;
      writeLink();
    }
    if (!state.boxDrag) return;
    state.box = boxFrom(state.boxDrag, canvasPoint(layer, event));
    state.boxDrag = null;
    drawBox();
    showBoxValues();
    writeLink();
  });
  $("clear-box").addEventListener("click", () => { state.box = null; drawBox(); showBoxValues(); writeLink(); });
}

// whole pixels of the image as the page shows it: the box a link names is the box whose values were shown
function boxFrom([ax, ay], [bx, by]) {
  const layer = $("box-layer");
  const clamp = (v, most) => Math.round(Math.min(Math.max(v, 0), most));
  return {
    x0: clamp(Math.min(ax, bx), layer.width), y0: clamp(Math.min(ay, by), layer.height),
    x1: clamp(Math.max(ax, bx), layer.width), y1: clamp(Math.max(ay, by), layer.height),
  };
}

// the share of each patch's area inside the box, as xclip.core.geometry computes it (the server sends each patch's
// rectangle as fractions of the view); a box smaller than a patch covers it by its share, not 0 or 1
function boxCoverage(box, patches, width, height) {
  return patches.map(([px0, py0, px1, py1]) => {
    const x0 = px0 * width, y0 = py0 * height, x1 = px1 * width, y1 = py1 * height;
    const w = Math.max(0, Math.min(x1, box.x1) - Math.max(x0, box.x0));
    const h = Math.max(0, Math.min(y1, box.y1) - Math.max(y0, box.y0));
    return (w * h) / ((x1 - x0) * (y1 - y0));
  });
}

function drawBox() {
  const layer = $("box-layer");
  const context = layer.getContext("2d");
  context.clearRect(0, 0, layer.width, layer.height);
  if (!state.box) return;
  const { x0, y0, x1, y1 } = state.box;
  context.lineWidth = 3;
  context.strokeStyle = "#000";
  context.strokeRect(x0, y0, x1 - x0, y1 - y0);
  context.lineWidth = 1;
  context.strokeStyle = "#fff";
  context.strokeRect(x0 + 1.5, y0 + 1.5, x1 - x0 - 3, y1 - y0 - 3);
}

function showBoxValues() {
  const chips = [...$("caption").children];
  $("box-info").hidden = !state.box;
  if (!state.box) {
    for (const element of chips) {
      element.style.background = "";
      element.style.color = "";
      element.title = chipTitle(state.pair.chips[Number(element.dataset.position)]);
      delete element.dataset.value;
    }
    return;
  }
  const layer = $("box-layer");
  const weights = boxCoverage(state.box, state.pair.patches, layer.width, layer.height);
  const patches = weights.flatMap((w, p) => (w > 0 ? [p] : []));
  const { interactions, n_prefix: prefix } = state.pair;
  const rowValue = (r) => patches.reduce((sum, p) => sum + weights[p] * interactions[r][prefix + p], 0);
  const values = state.pair.chips.map((chip) => chip.rows.reduce((sum, r) => sum + rowValue(r), 0));
  const h = values.reduce((peak, v) => Math.max(peak, Math.abs(v)), 0) || 1;
  chips.forEach((element, k) => {
    const fill = colour(values[k], h);
    const [r, g, b] = rgb(fill);
    element.style.background = fill;
    element.style.color = (r + g + b) / 3 > 110 ? "#000" : "#fff";
    element.dataset.value = String(values[k]);
    element.title = [`interaction with the box: ${format(values[k])}`, chipTitle(state.pair.chips[k])].filter(Boolean).join("\n");
  });
  drawScale($("box-legend-bar"), h, "box-legend-low", "box-legend-high");
  $("box-patches").textContent = patches.length;
  $("box-patches").dataset.patches = JSON.stringify(patches);
  $("box-patches").dataset.weights = JSON.stringify(weights);
  setNumber("box-total", interactions.reduce((sum, _, r) => sum + rowValue(r), 0));
}

// --- links -----------------------------------------------------------------------------------------------
// a view's address: #pair=3, then &span=red%20dog (the span's words, and &at=N, the position of its first chip,
// where those words occur more than once) and &box=x0,y0,x1,y1 (pixels of the image as the page shows it,
// 320 wide, from its top left)
function viewLink() {
  if (!state.pair) return "";
  const parts = [`pair=${state.pair.index}`];
  if (state.span) {
    const text = spanText(state.span);
    parts.push(`span=${encodeURIComponent(text)}`);
    if (spanRanges(text).length > 1) parts.push(`at=${state.span[0]}`);
  }
  if (state.box) parts.push(`box=${[state.box.x0, state.box.y0, state.box.x1, state.box.y1].join(",")}`);
  return `#${parts.join("&")}`;
}

// the browser's address follows the view: a pair opened from the table is a new history entry (push), a span
// or box chosen in it replaces the entry, so that Back does not step through every drag
function writeLink(push = false) {
  const link = viewLink();
  if (link === state.link) return;
  state.link = link;
  history[push ? "pushState" : "replaceState"](null, "", link || window.location.pathname);
}

// the view a link names: {pair, span, at, box}; null with a notice for a link the page cannot read
function readLink(hash) {
  const params = new URLSearchParams(hash.replace(/^#/, ""));
  const whole = (text) => (/^[0-9]+$/.test(text) ? Number(text) : NaN);
  const pair = whole(params.get("pair") || "");
  const at = params.has("at") ? whole(params.get("at")) : undefined;
  const box = params.has("box") ? params.get("box").split(",").map(Number) : null;
  if (Number.isNaN(pair) || Number.isNaN(at) || (box && (box.length !== 4 || !box.every(Number.isFinite)))) {
    notify(`this link names no view the page can show: ${hash} (expected #pair=N, then &span=WORDS, &at=N, &box=X0,Y0,X1,Y1)`);
    return null;
  }
  return { pair, span: params.get("span") || null, at, box };
}

// opens the view the address names, when it is not the one shown (a loaded, pasted or Back-visited link)
function followLink() {
  const hash = window.location.hash;
  if (!hash || hash === state.link) return;
  state.link = hash;
  notify("");
  const view = readLink(hash);
  if (!view) {
    clearPair();
    return;
  }
  const request = pairRequests + 1; // showPair's own number: a failure clears the page only if no newer pair was asked for
  showPair(view.pair, view).then(() => writeLink()).catch((error) => {
    if (request === pairRequests) clearPair();
    showError(error);
  });
}

// no pair drawn: what a link that names none shows, rather than the previous pair under a new address
function clearPair() {
  ++pairRequests;
  state.pair = null;
  state.hover = null;
  $("pair").hidden = true;
  delete $("pair").dataset.index;
  $("placeholder").hidden = false;
  for (const tr of $("pairs").querySelectorAll("tbody tr.current")) tr.classList.remove("current");
}

// --- messages --------------------------------------------------------------------------------------------
// a message above the page until the next view is chosen ("": none)
function notify(message) {
  $("notice").textContent = message;
  $("notice").hidden = !message;
}

function showError(error) {
  notify(`error: ${error.message}`);
}

async function main() {
  bindTable();
  bindBox();
  for (const radio of document.querySelectorAll("input[name=scale]")) radio.addEventListener("change", drawMap);
  $("fixed-scale").addEventListener("input", drawMap);
  window.addEventListener("hashchange", followLink);
  window.addEventListener("popstate", followLink);
  const summary = await loadSummary();
  await Promise.all([loadTable(), loadFailures()]);
  document.body.dataset.ready = "true";
  followLink();
  // a run still being written: show what finishes as it finishes
  if (!STATIC && summary.counts.pairs.pending > 0) {
    const timer = setInterval(() => pollRun(timer).catch(showError), 5000);
  }
}

const pollRun = tracked(async (timer) => {
  const now = await loadSummary();
  await loadTable();
  if (now.counts.pairs.pending === 0) {
    clearInterval(timer);
    await loadFailures();
  }
});

main().catch(showError);
