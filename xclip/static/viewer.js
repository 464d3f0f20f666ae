// xclip view: the pair table and one pair's map. Data come from the xclip server (api/...) or, in an
// exported site, from window.XCLIP_STATIC (data.js). Maps are computed here from the pair's interaction
// matrix: a span's map is the sum of its tokens' rows; a box's word values are sums over its patches' columns.
"use strict";

const STATIC = window.XCLIP_STATIC || null;
const DISPLAY = 320; // the image's width on the page, as the server draws its contours
const state = {
  query: { sort: "index", order: "asc", status: "all", text: "", min_score: "", max_score: "", max_error: "", offset: 0, limit: 100 },
  summary: null, pair: null, selection: [], selectionLabel: "", hover: null, box: null, runScale: null,
  drag: null, boxDrag: null,
};
const $ = (id) => document.getElementById(id);

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
  throw new Error(`this exported site holds no ${path}`);
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
    if (q.sort === "caption") return row.caption.toLowerCase();
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

function setNumber(id, value, digits) {
  const element = $(id);
  element.textContent = format(value, digits);
  element.dataset.value = value === null ? "" : String(value);
}

// --- the table -------------------------------------------------------------------------------------------
async function loadSummary() {
  state.summary = await api("api/run");
  const c = state.summary.counts.pairs;
  $("run-info").textContent = `${state.summary.run} · ${state.summary.model} · ${c.total} pairs: ${c.done} done, ` +
    `${c.failed} failed, ${c.pending} pending` + (STATIC ? " · exported pairs only" : "");
  return state.summary;
}

let tableRequests = 0;

async function loadTable() {
  // typing sends a request per key: only the newest answer may fill the table, whatever order they arrive in
  const request = ++tableRequests;
  const answer = await api("api/pairs", state.query);
  if (request !== tableRequests) return;
  const body = $("pairs").querySelector("tbody");
  body.replaceChildren(...answer.rows.map((row) => {
    const tr = document.createElement("tr");
    tr.dataset.index = row.index;
    tr.className = row.status + (state.pair && state.pair.index === row.index ? " current" : "");
    const cells = [row.index, row.caption, format(row.score), format(row.relative_completeness_error, 2),
      row.status === "failed" ? `failed: ${row.error}` : row.status];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    tr.addEventListener("click", () => { if (row.status === "done") showPair(row.index); });
    return tr;
  }));
  const last = Math.min(answer.offset + state.query.limit, answer.total);
  $("page-info").textContent = answer.total ? `${answer.offset + 1}–${last} of ${answer.total}` : "no pairs";
  $("previous").disabled = answer.offset === 0;
  $("next").disabled = last >= answer.total;
  for (const th of $("pairs").querySelectorAll("th")) {
    th.classList.toggle("sorted-asc", th.dataset.sort === state.query.sort && state.query.order === "asc");
    th.classList.toggle("sorted-desc", th.dataset.sort === state.query.sort && state.query.order === "desc");
  }
}

async function loadFailures() {
  const failures = await api("api/failures");
  $("failure-count").textContent = failures.length;
  $("failures").querySelector("ul").replaceChildren(...failures.map((f) => {
    const li = document.createElement("li");
    li.textContent = `${f.group.replace(/s$/, "")} ${f.index} (${f.item}): ${f.reason}`;
    return li;
  }));
}

function bindTable() {
  for (const th of $("pairs").querySelectorAll("th")) {
    th.addEventListener("click", () => {
      const same = state.query.sort === th.dataset.sort;
      state.query.order = same && state.query.order === "asc" ? "desc" : same ? "asc" : th.dataset.sort === "score" ? "desc" : "asc";
      state.query.sort = th.dataset.sort;
      state.query.offset = 0;
      loadTable();
    });
  }
  const filters = { "filter-text": "text", "filter-status": "status", "min-score": "min_score", "max-score": "max_score", "max-error": "max_error" };
  for (const [id, key] of Object.entries(filters)) {
    $(id).addEventListener("input", () => {
      state.query[key] = $(id).value;
      state.query.offset = 0;
      loadTable().catch(showError);
    });
  }
  $("previous").addEventListener("click", () => { state.query.offset = Math.max(0, state.query.offset - state.query.limit); loadTable(); });
  $("next").addEventListener("click", () => { state.query.offset += state.query.limit; loadTable(); });
}

// --- one pair --------------------------------------------------------------------------------------------
async function showPair(index) {
  const pair = await api(`api/pair/${index}`);
  state.pair = pair;
  state.box = null;
  state.hover = null;
  $("placeholder").hidden = true;
  $("pair").hidden = false;
  $("pair-title").textContent = `pair ${index}: “${pair.caption}”`;
  setNumber("score", pair.score);
  setNumber("four-term-value", pair.four_term_value);
  setNumber("completeness-error", pair.completeness_error, 3);
  setNumber("relative-error", pair.relative_completeness_error, 3);
  $("terms").textContent = pair.terms.map((t) => format(t)).join(", ");
  $("terms").dataset.value = JSON.stringify(pair.terms);
  for (const tr of $("pairs").querySelectorAll("tbody tr")) tr.classList.toggle("current", Number(tr.dataset.index) === index);
  const image = $("image");
  await new Promise((resolve) => { image.onload = resolve; image.onerror = resolve; image.src = imageUrl(index, "image"); });
  $("contours").src = imageUrl(index, "contours");
  for (const canvas of [$("map"), $("box-layer")]) {
    canvas.width = image.naturalWidth || DISPLAY;
    canvas.height = image.naturalHeight || DISPLAY;
  }
  buildCaption();
  const words = pair.chips.filter((chip) => !chip.special);
  select(words.length ? words : pair.chips, "all words");
  drawBox();
  showBoxValues();
  $("pair").dataset.index = index; // drawn: what tests and scripts wait for
}

function buildCaption() {
  const caption = $("caption");
  caption.replaceChildren(...state.pair.chips.map((chip, position) => {
    const span = document.createElement("span");
    span.className = "chip" + (chip.special ? " special" : "");
    span.textContent = chip.text;
    span.dataset.position = position;
    span.dataset.rows = chip.rows.join(",");
    span.addEventListener("mousedown", (event) => {
      event.preventDefault();
      state.drag = position;
      select([chip]);
    });
    span.addEventListener("mouseenter", () => {
      if (state.drag !== null) {
        const [a, b] = [Math.min(state.drag, position), Math.max(state.drag, position)];
        select(state.pair.chips.slice(a, b + 1));
      } else {
        state.hover = chip.rows;
        drawMap();
      }
    });
    return span;
  }));
  caption.onmouseleave = () => { state.hover = null; drawMap(); };
}

function select(chips, label) {
  state.selection = chips.flatMap((chip) => chip.rows);
  state.selectionLabel = label || chips.map((chip) => chip.text).join(" ");
  for (const element of $("caption").children) {
    const rows = element.dataset.rows.split(",").map(Number);
    element.classList.toggle("selected", label === undefined && rows.every((r) => state.selection.includes(r)));
  }
  const total = patchValues(state.selection).reduce((sum, v) => sum + v, 0);
  $("selection-text").textContent = state.selectionLabel;
  $("selection-text").dataset.rows = state.selection.join(",");
  setNumber("selection-total", total);
  drawMap();
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
  return values.reduce((peak, v) => Math.max(peak, Math.abs(v)), 0) || 1;
}

// bilinear interpolation of the values (never of colours: every pixel gets a colour of the bar)
async function drawMap() {
  if (!state.pair) return;
  const rows = state.hover || state.selection;
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
  $("map-title").textContent = state.hover ? "map of the word under the pointer" : `map of: ${state.selectionLabel}`;
  drawBar(h, lut);
}

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
    state.drag = null;
    if (!state.boxDrag) return;
    state.box = boxFrom(state.boxDrag, canvasPoint(layer, event));
    state.boxDrag = null;
    drawBox();
    showBoxValues();
  });
  $("clear-box").addEventListener("click", () => { state.box = null; drawBox(); showBoxValues(); });
}

function boxFrom([ax, ay], [bx, by]) {
  const layer = $("box-layer");
  const clamp = (v, most) => Math.min(Math.max(v, 0), most);
  return {
    x0: clamp(Math.min(ax, bx), layer.width), y0: clamp(Math.min(ay, by), layer.height),
    x1: clamp(Math.max(ax, bx), layer.width), y1: clamp(Math.max(ay, by), layer.height),
  };
}

// patches whose centres lie in the box; a box too small to hold a centre takes the patch under its centre
// the share of each patch's area inside the box, as xclip.geometry computes it (the server sends each patch's
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
    element.title = `interaction with the box: ${format(values[k])}`;
  });
  $("box-patches").textContent = patches.length;
  $("box-patches").dataset.patches = JSON.stringify(patches);
  $("box-patches").dataset.weights = JSON.stringify(weights);
  setNumber("box-total", interactions.reduce((sum, _, r) => sum + rowValue(r), 0));
}

function showError(error) {
  $("run-info").textContent = `error: ${error.message}`;
}

async function main() {
  bindTable();
  bindBox();
  for (const radio of document.querySelectorAll("input[name=scale]")) radio.addEventListener("change", drawMap);
  $("fixed-scale").addEventListener("input", drawMap);
  const summary = await loadSummary();
  await Promise.all([loadTable(), loadFailures()]);
  document.body.dataset.ready = "true";
  // a run still being written: show what finishes as it finishes
  if (!STATIC && summary.counts.pairs.pending > 0) {
    const timer = setInterval(async () => {
      const now = await loadSummary();
      await loadTable();
      if (now.counts.pairs.pending === 0) { clearInterval(timer); loadFailures(); }
    }, 5000);
  }
}

main().catch(showError);
