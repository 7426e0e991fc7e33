// The widget inside another site's page (framed by /asirra.js): the grid, the answer, and messages to the page.
//
// Every message goes to ORIGIN only, the embedding page's origin as the service verified it (the frame is
// allowed in no other: CSP frame-ancestors), and only messages from that parent are heard.
"use strict";

const params = new URLSearchParams(window.location.search);
const SITEKEY = params.get("sitekey") || "";
const ORIGIN = params.get("origin") || "";
const WIDGET = params.get("id") || "";
const TILES = 12, COLUMNS = 4;

const main = document.getElementById("captcha");
const startView = document.getElementById("start-view");
const chooseView = document.getElementById("choose-view");
const startButton = document.getElementById("start");
const grid = document.getElementById("grid");
const verifyButton = document.getElementById("verify");
const newButton = document.getElementById("new");
const statusLine = document.getElementById("status");

const REFUSALS = {
  "bad-request": "This check was embedded incorrectly.",
  "unknown-sitekey": "This site is not registered with the check.",
  "hostname-not-allowed": "This page is not allowed to show the check.",
  "not-framed": "This check works only inside a site's page.",
  "cross-site": "This check was asked for from another site.",
};

let expiryTimer = null;
let waitTimer = null;

function tell(type, extra) {
  if (window.parent !== window && ORIGIN) {
    window.parent.postMessage(Object.assign({ asirra: 1, widget: WIDGET, type: type }, extra || {}), ORIGIN);
  }
}

function show(state, message, kind) {
  main.dataset.state = state;
  startView.hidden = !(state === "idle" || state === "error");
  chooseView.hidden = !(state === "choosing" || state === "checking" || state === "loading");
  statusLine.className = "status " + (kind || "");
  statusLine.textContent = message || "";
}

function busy(on) {
  [verifyButton, newButton, startButton].forEach((b) => { b.disabled = on; });
  grid.querySelectorAll(".tile").forEach((t) => { t.disabled = on; });
}

function seconds(response) {
  const n = Number(response.headers.get("Retry-After"));
  return Number.isFinite(n) && n > 0 ? Math.ceil(n) : 5;
}

// A refusal the visitor can wait out (rate limit, outage): say so, tell the page, offer a retry when it is over.
function waitOut(code, message, after) {
  show("error", message + " Try again in " + after + " s.");
  tell("error", { code: code });
  startButton.textContent = "Try again";
  startButton.disabled = true;
  clearTimeout(waitTimer);
  waitTimer = setTimeout(() => { startButton.disabled = false; }, after * 1000);
}

function refused(code) {
  show("error", REFUSALS[code] || "This check cannot be shown here.");
  startButton.hidden = true;
  tell("error", { code: code });
}

async function failure(response) {
  let kind = "";
  try { kind = ((await response.json()) || {}).kind || ""; } catch (_) { /* not JSON */ }
  const code = kind.replace(/_/g, "-");
  if (response.status === 429) return waitOut("rate-limited", "Too many attempts from your network.", seconds(response));
  if (response.status === 503) return waitOut("unavailable", "The check is unavailable right now.", seconds(response));
  if (REFUSALS[code]) return refused(code);
  return waitOut("unavailable", "The check went wrong.", 5);
}

// ---- the grid: one Tab stop, arrows move, Space or Enter selects ---------------------------------

function tile(url, index) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "tile";
  button.dataset.index = String(index);
  button.tabIndex = index === 0 ? 0 : -1;
  button.setAttribute("aria-pressed", "false");
  // Position only: nothing a screen reader or a script on this page reads says cat or dog.
  button.setAttribute("aria-label", "Photo " + (index + 1) + " of " + TILES);
  const img = document.createElement("img");
  img.src = url;
  img.alt = "";
  img.draggable = false;
  button.append(img);
  button.addEventListener("click", () => {
    button.setAttribute("aria-pressed", String(button.getAttribute("aria-pressed") !== "true"));
    moveTo(index);
  });
  return button;
}

function moveTo(index) {
  const tiles = [...grid.querySelectorAll(".tile")];
  const target = tiles[Math.max(0, Math.min(tiles.length - 1, index))];
  tiles.forEach((t) => { t.tabIndex = t === target ? 0 : -1; });
  if (document.activeElement && document.activeElement.classList.contains("tile")) target.focus();
  return target;
}

grid.addEventListener("keydown", (event) => {
  const current = Number(document.activeElement && document.activeElement.dataset.index);
  if (!Number.isInteger(current)) return;
  const steps = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -COLUMNS, ArrowDown: COLUMNS };
  let next = null;
  if (event.key in steps) next = current + steps[event.key];
  else if (event.key === "Home") next = 0;
  else if (event.key === "End") next = TILES - 1;
  if (next === null) return;
  event.preventDefault();
  moveTo(next).focus();
});

// ---- the conversation with the service -----------------------------------------------------------

async function newChallenge(focusGrid) {
  clearTimeout(expiryTimer);
  busy(true);
  show("loading", "Loading photos\u2026");
  let response;
  try {
    const query = "sitekey=" + encodeURIComponent(SITEKEY) + "&origin=" + encodeURIComponent(ORIGIN);
    response = await fetch("api/challenge?" + query, { method: "POST", credentials: "same-origin" });
  } catch (_) {
    busy(false);
    return waitOut("unreachable", "Cannot reach the check.", 5);
  }
  busy(false);
  if (!response.ok) return failure(response);
  const challenge = await response.json();
  main.dataset.challenge = challenge.id;
  grid.replaceChildren(...challenge.images.map((url, i) => tile(url.replace(/^\//, ""), i)));
  show("choosing", "");
  if (focusGrid) grid.querySelector(".tile").focus();
  return true;
}

async function verify() {
  const selected = [...grid.querySelectorAll('.tile[aria-pressed="true"]')].map((t) => Number(t.dataset.index));
  busy(true);
  show("checking", "Checking\u2026");
  let response;
  try {
    response = await fetch("api/challenge/" + encodeURIComponent(main.dataset.challenge) + "/answer", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ selected: selected }),
    });
  } catch (_) {
    busy(false);
    return waitOut("unreachable", "Cannot reach the check.", 5);
  }
  busy(false);
  if ([404, 409, 410].includes(response.status)) {
    if (await newChallenge(true)) show("choosing", "These photos expired. Here is a new set.");
    return;
  }
  if (!response.ok) return failure(response);
  const verdict = await response.json();
  if (verdict.result === "pass" && verdict.token) return passed(verdict.token, verdict.token_expires_in);
  if (await newChallenge(true)) show("choosing", verdict.message, "fail");
}

function passed(token, expiresIn) {
  show("passed", "\u2713 Passed. You can send the form.");
  statusLine.focus();  // the next Tab leaves the frame for the page's next control
  tell("pass", { token: token, expiresIn: expiresIn });
  expiryTimer = setTimeout(() => {
    reset();
    show("idle", "Your check expired. Please do it again.");
    tell("expired");
  }, expiresIn * 1000);
}

function reset() {
  clearTimeout(expiryTimer);
  clearTimeout(waitTimer);
  grid.replaceChildren();
  main.dataset.challenge = "";
  startButton.textContent = "Show the photos";
  startButton.disabled = false;
  show("idle", "");
}

// ---- start -----------------------------------------------------------------------------------------

function start() {
  if (window.parent === window) return refused("not-framed");
  let ancestor = "";
  try { ancestor = (window.location.ancestorOrigins || [])[0] || ""; } catch (_) { /* not supported */ }
  if (ancestor && ancestor !== ORIGIN) return refused("hostname-not-allowed");  // defence in depth: CSP said so first
  window.addEventListener("message", (event) => {
    if (event.origin !== ORIGIN || event.source !== window.parent) return;
    const data = event.data || {};
    if (data.asirra === 1 && data.type === "reset") reset();
  });
  new ResizeObserver(() => tell("resize", { height: Math.ceil(main.getBoundingClientRect().height) + 2 })).observe(main);
  tell("ready");
  if (main.dataset.error) return refused(main.dataset.error.replace(/_/g, "-"));
  // No challenge until the person asks for one: it keeps the per-address budget for people, and a form
  // filled slowly never meets an expired grid.
  startButton.addEventListener("click", () => newChallenge(true));
  verifyButton.addEventListener("click", verify);
  newButton.addEventListener("click", () => newChallenge(true));
  show("idle", "");
}

start();
