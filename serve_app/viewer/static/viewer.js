// The medserve viewer: talks to the API beside it (../v1/...) with the tenant's key, shows a result with niivue.
// The key is kept in sessionStorage only: it goes when the tab closes.
import { Niivue, SHOW_RENDER } from "./niivue/niivue.js";

const KEY_STORAGE = "medserve-api-key";
const API = new URL("../v1/", window.location.href);
// Label k's colour (RGB); background (0) is transparent. Reds and warm hues first: they stand out on grey CT.
const PALETTE = [
  [255, 40, 0], [0, 200, 255], [255, 220, 0], [200, 0, 255], [0, 230, 80],
  [255, 120, 180], [255, 150, 0], [80, 120, 255], [170, 255, 0], [0, 255, 200],
];

const $ = (id) => document.getElementById(id);
const nv = new Niivue({
  backColor: [0, 0, 0, 1],
  show3Dcrosshair: false,
  isOrientCube: false,
  crosshairColor: [0.3, 0.85, 1, 0.7], // cyan: never taken for a label's colour
  multiplanarShowRender: SHOW_RENDER.NEVER, // axial, coronal and sagittal only: no 3D render
});
let shown = null; // the result on screen: its summary
let models = []; // GET /v1/models' segmentation models: the worklist's filters
// The worklist as last loaded: its rows (each a result with its shadow candidates beside it) and where it goes on.
const worklist = { rows: [], cursor: null, loads: 0 };
let fromWorklist = false; // whether the result on screen was opened from the worklist: a verdict then opens the next
const WORKLIST_PAGE = 25;
window.medserveViewer = { niivue: nv }; // for scripts and tests: niivue's own screen <-> world mapping

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  return apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {};
}

function say(text, kind = "error") {
  const message = $("message");
  message.textContent = text;
  message.className = kind;
  message.hidden = !text;
}

function progress(text, fraction = null) {
  $("progress-box").hidden = !text;
  $("status").textContent = text || "";
  if (fraction === null) $("progress").removeAttribute("value"); // indeterminate
  else $("progress").value = fraction;
}

// What an error answer says, in words: medserve answers {"error": {"status", "reason"}}.
function explain(status, body) {
  let reason;
  try {
    reason = JSON.parse(body).error.reason;
  } catch {
    reason = body || "no answer";
  }
  if (status === 401) {
    return apiKey()
      ? `The API key was refused (${reason}). Enter a valid key above.`
      : `This server needs an API key (${reason}). Enter it above.`;
  }
  return `${reason} (HTTP ${status})`;
}

class ApiError extends Error {}

async function call(path, options = {}) {
  const response = await fetch(new URL(path, API), {
    ...options,
    headers: { ...authHeaders(), ...(options.headers || {}) },
  });
  if (!response.ok) throw new ApiError(explain(response.status, await response.text()));
  return response;
}

async function loadModels() {
  models = (await (await call("models")).json()).models.filter((m) => m.task === "segmentation");
  const select = $("model");
  select.replaceChildren(...models.map((m) => new Option(`${m.name} ${m.version} (${m.modality})`, m.name)));
  const filter = $("worklist-model");
  const chosen = filter.value;
  const names = [...new Set(models.map((m) => m.name))];
  filter.replaceChildren(new Option("any", ""), ...names.map((name) => new Option(name, name)));
  filter.value = names.includes(chosen) ? chosen : "";
  showVersions();
  say("");
}

// The version filter offers the chosen model's versions.
function showVersions() {
  const model = $("worklist-model").value;
  const served = models.filter((m) => m.name === model).flatMap((m) => m.versions.map((v) => v.version));
  const versions = [...new Set(served)];
  $("worklist-version").replaceChildren(new Option("any", ""), ...versions.map((v) => new Option(v, v)));
}

// The tenant's results to review, newest first, as the filters say; ``more`` adds the next page.
async function loadWorklist(more = false) {
  const params = new URLSearchParams({ state: $("worklist-state").value, limit: String(WORKLIST_PAGE) });
  if ($("worklist-model").value) params.set("model", $("worklist-model").value);
  if ($("worklist-version").value) params.set("version", $("worklist-version").value);
  if (more && worklist.cursor) params.set("cursor", worklist.cursor);
  const page = await (await call(`reviews/worklist?${params}`)).json();
  worklist.rows = more ? worklist.rows.concat(page.rows) : page.rows;
  worklist.cursor = page.next_cursor;
  showWorklist();
  document.body.dataset.worklist = String(++worklist.loads); // for tests and scripts: a load finished
}

function worklistCells(item, first) {
  const volumes = item.labels.map((l) => l.volume_ml.toFixed(1)).join(", ") || "none";
  const model = item.model ? `${item.model.name} ${item.model.version}` : "";
  const role = item.role && item.role !== "live" ? `${item.role} ` : "";
  const review = item.verdict ? `${item.verdict}${item.reviews > 1 ? ` (${item.reviews})` : ""}` : "awaiting";
  const when = { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" };
  const made = first ? new Date(item.created_at).toLocaleString([], when) : "beside it";
  return [made, role + model, volumes, review];
}

function showWorklist() {
  const rows = [];
  for (const row of worklist.rows) {
    for (const [index, item] of [row, ...row.candidates].entries()) {
      const tr = document.createElement("tr");
      tr.dataset.resultId = item.result_id;
      tr.className = [index ? "candidate" : "", item.result_id === shown?.result_id ? "current" : ""].join(" ");
      tr.title = item.result_id;
      const cells = worklistCells(item, index === 0);
      for (const [column, text] of cells.entries()) {
        const td = document.createElement("td");
        td.textContent = text;
        if (column === 3 && item.verdict) td.className = item.verdict;
        tr.append(td);
      }
      tr.addEventListener(
        "click",
        guarded(async () => {
          window.scrollTo({ top: 0 }); // the views, the legend and the review form are above the list
          fromWorklist = true;
          await open(item.result_id);
        }),
      );
      rows.push(tr);
    }
  }
  $("worklist").tBodies[0].replaceChildren(...rows);
  $("worklist-empty").hidden = rows.length > 0;
  $("worklist-more").hidden = !worklist.cursor;
}

// The next result of the worklist that has no review yet (a live result, then the candidates beside it), loading
// further pages while there are some; ``before`` is said first when there is none.
async function openNext(before = "") {
  for (;;) {
    const items = worklist.rows.flatMap((row) => [row, ...row.candidates]);
    const next = items.find((item) => item.reviews === 0 && item.result_id !== shown?.result_id);
    if (next) {
      fromWorklist = true;
      return open(next.result_id);
    }
    if (!worklist.cursor) {
      say(`${before}No other result in the worklist awaits review.`, "info");
      return;
    }
    await loadWorklist(true);
  }
}

// The upload, through XMLHttpRequest: fetch reports no upload progress.
function upload(model, files) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    for (const file of files) form.append("files", file, file.name);
    const request = new XMLHttpRequest();
    request.open("POST", new URL(`models/${encodeURIComponent(model)}/segment?keep_image=true`, API));
    for (const [name, value] of Object.entries(authHeaders())) request.setRequestHeader(name, value);
    const started = performance.now();
    let ticking = null;
    request.upload.onprogress = (e) => {
      if (e.lengthComputable) progress(`Uploading: ${Math.round((100 * e.loaded) / e.total)} %`, e.loaded / e.total);
    };
    request.upload.onload = () => {
      ticking = setInterval(() => {
        const s = Math.round((performance.now() - started) / 1000);
        progress(`Segmenting on the server: ${s} s`);
      }, 500);
    };
    request.onloadend = () => {
      clearInterval(ticking);
      if (request.status === 200) resolve(JSON.parse(request.responseText));
      else if (request.status === 0) reject(new ApiError("The server could not be reached."));
      else reject(new ApiError(explain(request.status, request.responseText)));
    };
    request.send(form);
  });
}

function colormapOf(labels) {
  const top = Math.max(0, ...labels.map((l) => l.label));
  const cmap = { R: [], G: [], B: [], A: [], I: [], labels: [] };
  for (let k = 0; k <= top; k++) {
    const [r, g, b] = k === 0 ? [0, 0, 0] : PALETTE[(k - 1) % PALETTE.length];
    cmap.R.push(r);
    cmap.G.push(g);
    cmap.B.push(b);
    cmap.A.push(k === 0 ? 0 : 255);
    cmap.I.push(k);
    cmap.labels.push(labels.find((l) => l.label === k)?.name || "");
  }
  return cmap;
}

function showLegend(labels) {
  $("legend").tBodies[0].replaceChildren(
    ...labels.map((l) => {
      const row = document.createElement("tr");
      const [r, g, b] = PALETTE[(l.label - 1) % PALETTE.length];
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = `rgb(${r}, ${g}, ${b})`;
      for (const cell of [swatch, String(l.label), l.name, l.volume_ml.toFixed(1)]) {
        const td = document.createElement("td");
        td.append(cell);
        row.append(td);
      }
      return row;
    }),
  );
}

function showReviews(reviews) {
  $("reviews").replaceChildren(
    ...reviews.map((r) => {
      const item = document.createElement("li");
      const when = new Date(r.created_at).toLocaleString();
      item.textContent = `${r.verdict} by ${r.reviewer} (${r.tenant}), ${when}${r.comment ? ": " + r.comment : ""}`;
      item.className = `review ${r.verdict}`;
      return item;
    }),
  );
}

// Show a result: its image (when kept) with the mask over it, in three views; its labels and reviews.
async function open(resultId) {
  progress("Loading the result");
  const summary = await (await call(`results/${encodeURIComponent(resultId)}`)).json();
  const headers = authHeaders();
  const mask = { url: summary.mask_url, name: "mask.nii.gz", headers, opacity: Number($("opacity").value) };
  const volumes = summary.image_url ? [{ url: summary.image_url, name: "image.nii.gz", headers }, mask] : [mask];
  progress("Loading the image and mask");
  await nv.loadVolumes(volumes);
  const maskVolume = nv.volumes[nv.volumes.length - 1];
  maskVolume.setColormapLabel(colormapOf(summary.labels));
  if (!summary.image_url) maskVolume.opacity = 1;
  nv.setSliceType(nv.sliceTypeMultiplanar);
  nv.updateGLVolume();
  centreOn(maskVolume);
  shown = summary;
  $("no-image").hidden = Boolean(summary.image_url);
  $("shown-result-id").textContent = summary.result_id;
  $("result-id").value = summary.result_id;
  $("model-name").textContent = summary.model ? `model ${summary.model.name} ${summary.model.version}` : "";
  showLegend(summary.labels);
  showReviews(summary.reviews);
  $("result").hidden = false;
  history.replaceState(null, "", `#result=${summary.result_id}`); // a link to this result, for a colleague
  showWorklist(); // the row on screen marked
  progress("");
  document.body.dataset.overlay = "shown"; // for tests and scripts: the mask is on screen
}

// The crosshair on the mask's centre, so that all three views cut through what was found. The mask's voxels are
// in its file's order (i fastest); its affine takes voxels to world mm, which niivue maps to its own coordinates.
function centreOn(mask) {
  const [, nx, ny] = mask.hdr.dims;
  const sum = [0, 0, 0];
  let count = 0;
  for (let index = 0; index < mask.img.length; index++) {
    if (mask.img[index] > 0) {
      sum[0] += index % nx;
      sum[1] += Math.floor(index / nx) % ny;
      sum[2] += Math.floor(index / (nx * ny));
      count++;
    }
  }
  if (count === 0) return;
  const a = mask.hdr.affine;
  const voxel = sum.map((s) => s / count);
  const mm = [0, 1, 2].map((r) => a[r][0] * voxel[0] + a[r][1] * voxel[1] + a[r][2] * voxel[2] + a[r][3]);
  nv.scene.crosshairPos = nv.mm2frac(mm);
  nv.drawScene();
}

async function review(verdict) {
  const body = { verdict, reviewer: $("reviewer").value, comment: $("comment").value };
  const response = await call(`results/${shown.result_id}/reviews`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const stored = await response.json();
  shown.reviews.push(stored);
  showReviews(shown.reviews);
  $("comment").value = "";
  say(`Review stored: ${stored.verdict}.`, "info");
  // The worklist shows the verdict (an awaiting list drops the result). Working through the worklist, an accept or a
  // reject opens the next result awaiting review.
  await loadWorklist();
  if (fromWorklist && verdict !== "comment") await openNext(`Review stored: ${stored.verdict}. `);
}

// Run an action from the page; what goes wrong is said in the page, never only in the console.
function guarded(action) {
  return async (event) => {
    event.preventDefault();
    try {
      await action(event);
    } catch (error) {
      progress("");
      say(error instanceof ApiError ? error.message : `Something went wrong: ${error.message}`);
      document.body.dataset.error = "shown";
    }
  };
}

$("key-form").addEventListener(
  "submit",
  guarded(async () => {
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
    await loadModels(); // the key's first use: it was accepted once this answers
    say(key ? "Key accepted." : "", "info");
    await loadWorklist();
  }),
);
$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  say("Key forgotten.", "info");
});
$("segment-form").addEventListener(
  "submit",
  guarded(async () => {
    say("");
    const answer = await upload($("model").value, $("study").files);
    fromWorklist = false;
    await open(answer.result_id);
  }),
);
$("open-form").addEventListener(
  "submit",
  guarded(async () => {
    say("");
    fromWorklist = false;
    await open($("result-id").value.trim());
  }),
);
$("review-form").addEventListener(
  "submit",
  guarded(async (event) => review(event.submitter.dataset.verdict)),
);
$("worklist-form").addEventListener(
  "submit",
  guarded(async () => loadWorklist()),
);
$("worklist-model").addEventListener("change", showVersions);
$("to-worklist").addEventListener("click", () => $("worklist-panel").scrollIntoView());
$("worklist-more").addEventListener(
  "click",
  guarded(async () => loadWorklist(true)),
);
// a: accept, r: reject, n: the next result awaiting review; not while typing.
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.target.closest("input, textarea, select")) return;
  const button = { a: "accept", r: "reject" }[event.key];
  if (button && shown) {
    event.preventDefault();
    $("review-form").requestSubmit($(button));
  } else if (event.key === "n") {
    guarded(async () => openNext())(event);
  }
});
$("opacity").addEventListener("input", () => {
  if (nv.volumes.length > 1) nv.setOpacity(nv.volumes.length - 1, Number($("opacity").value));
});

try {
  await nv.attachToCanvas($("gl"));
} catch (error) {
  say(`This browser cannot show the images (WebGL2: ${error.message}); results can still be reviewed.`);
}
// A result named in the address (viewer/#result=<id>, as the page sets it) opens with the page.
const named = /^#result=([0-9a-f]{32})$/.exec(window.location.hash);
guarded(async () => {
  await loadModels();
  await loadWorklist();
  if (named) await open(named[1]);
})(new Event("load"));
