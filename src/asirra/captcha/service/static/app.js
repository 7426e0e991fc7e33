// The CAPTCHA page: fetch a challenge, let the person toggle the cats, send the indices, show the verdict.
"use strict";

const card = document.getElementById("captcha");
const grid = document.getElementById("grid");
const verifyButton = document.getElementById("verify");
const newButton = document.getElementById("new");
const result = document.getElementById("result");
const tokenBox = document.getElementById("token");
// A site sends its visitors here as /?sitekey=KEY: a pass then earns a token for that site.
const sitekey = new URLSearchParams(window.location.search).get("sitekey");

function showResult(kind, message) {
  card.dataset.result = kind;
  result.className = "result " + kind;
  result.textContent = message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON: fall through */ }
  return "The server answered " + response.status + ".";
}

function tile(url, index) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "tile";
  button.dataset.index = String(index);
  button.setAttribute("aria-pressed", "false");
  const img = document.createElement("img");
  img.src = url;
  img.alt = "Pet photo " + (index + 1);
  img.draggable = false;
  button.append(img);
  button.addEventListener("click", () => {
    const pressed = button.getAttribute("aria-pressed") !== "true";
    button.setAttribute("aria-pressed", String(pressed));
  });
  return button;
}

async function newChallenge() {
  newButton.disabled = true;
  verifyButton.disabled = true;
  showResult("", "");
  tokenBox.hidden = true;
  try {
    const url = sitekey ? "/api/challenge?sitekey=" + encodeURIComponent(sitekey) : "/api/challenge";
    const response = await fetch(url, { method: "POST" });
    if (!response.ok) {
      showResult("error", await errorMessage(response));
      return;
    }
    const challenge = await response.json();
    card.dataset.challenge = challenge.id;
    grid.replaceChildren(...challenge.images.map(tile));
    verifyButton.disabled = false;
  } catch (_) {
    showResult("error", "Cannot reach the server.");
  } finally {
    newButton.disabled = false;
  }
}

async function verify() {
  const selected = [...grid.querySelectorAll('.tile[aria-pressed="true"]')].map((t) => Number(t.dataset.index));
  verifyButton.disabled = true;
  grid.querySelectorAll(".tile").forEach((t) => { t.disabled = true; });
  try {
    const response = await fetch("/api/challenge/" + encodeURIComponent(card.dataset.challenge) + "/answer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ selected }),
    });
    if (!response.ok) {
      showResult("error", await errorMessage(response));
      return;
    }
    const verdict = await response.json();
    showResult(verdict.result, verdict.message);
    if (verdict.token) {
      tokenBox.querySelector("output").value = verdict.token;
      tokenBox.hidden = false;
    }
  } catch (_) {
    showResult("error", "Cannot reach the server.");
  }
}

verifyButton.addEventListener("click", verify);
newButton.addEventListener("click", newChallenge);
newChallenge();
