// Asirra's widget loader, for a site's own pages:
//
//   <script src="https://CAPTCHA.SERVICE/asirra.js" async defer></script>
//   <form ...> ... <div class="asirra-captcha" data-sitekey="YOUR_SITE_KEY"></div> ... </form>
//
// Each .asirra-captcha element gets a frame from the service showing the challenge; on a pass the token
// lands in a hidden <input name="asirra-response"> inside it, for the site's server to check with
// POST /api/verify. Optional attributes name global functions: data-callback (token),
// data-expired-callback, data-error-callback (code). window.asirra has render, reset, getResponse, remove.
// asirra.js?render=explicit turns automatic rendering off; asirra.js?onload=fn calls window.fn() when ready.
(function () {
  "use strict";
  if (window.asirra && window.asirra.render) return;  // loaded twice: the first copy serves both
  const script = document.currentScript;
  const BASE = new URL(".", script.src);  // works behind a path prefix
  const SERVICE_ORIGIN = BASE.origin;
  const options = new URL(script.src).searchParams;
  const READY_SECONDS = 10;
  const CALLBACKS = { callback: "data-callback", "expired-callback": "data-expired-callback",
                      "error-callback": "data-error-callback" };
  const widgets = [];
  let counter = 0;

  function element(container) {
    return typeof container === "string" ? document.querySelector(container) : container;
  }

  function find(id) {
    if (id === undefined || id === null) return widgets[0];
    return widgets.find((w) => w.id === String(id));
  }

  function call(widget, name, args) {
    let fn = widget.params[name];
    if (typeof fn === "string") fn = window[fn];
    if (typeof fn !== "function") return false;
    try { fn.apply(null, args); } catch (error) { console.error(error); }
    return true;
  }

  function error(widget, code) {
    if (!call(widget, "error-callback", [code])) console.error("asirra: " + code);
  }

  function render(container, params) {
    const el = element(container);
    if (!el) throw new Error("asirra.render: no such element");
    if (el.dataset.asirraId) return el.dataset.asirraId;
    params = Object.assign({}, params || {});
    if (!params.sitekey) params.sitekey = el.dataset.sitekey;
    Object.keys(CALLBACKS).forEach((name) => {
      if (!(name in params) && el.hasAttribute(CALLBACKS[name])) params[name] = el.getAttribute(CALLBACKS[name]);
    });
    const widget = { id: String(++counter), container: el, params: params, ready: false };
    el.dataset.asirraId = widget.id;

    widget.input = document.createElement("input");
    widget.input.type = "hidden";
    widget.input.name = "asirra-response";
    widget.input.value = "";

    const src = new URL("widget", BASE);
    src.searchParams.set("sitekey", params.sitekey || "");
    src.searchParams.set("origin", window.location.origin);
    src.searchParams.set("id", widget.id);
    widget.iframe = document.createElement("iframe");
    widget.iframe.src = src.href;
    widget.iframe.title = "Asirra check: select every cat";
    widget.iframe.setAttribute("sandbox", "allow-scripts allow-same-origin");
    widget.iframe.setAttribute("referrerpolicy", "strict-origin");
    // Styles through the CSSOM, never a style attribute or element: a host page with a strict style-src still works.
    widget.iframe.style.width = "400px";
    widget.iframe.style.maxWidth = "100%";
    widget.iframe.style.height = "80px";
    widget.iframe.style.border = "0";
    widget.iframe.style.display = "block";
    el.append(widget.iframe, widget.input);

    widget.timer = setTimeout(() => {
      if (widget.ready) return;
      const note = document.createElement("p");
      note.textContent = "The check could not be loaded.";
      el.append(note);
      error(widget, "unreachable");
    }, READY_SECONDS * 1000);
    widgets.push(widget);
    return widget.id;
  }

  window.addEventListener("message", (event) => {
    if (event.origin !== SERVICE_ORIGIN) return;
    const data = event.data;
    if (!data || data.asirra !== 1) return;
    const widget = widgets.find((w) => w.iframe.contentWindow === event.source && w.id === data.widget);
    if (!widget) return;
    if (data.type === "ready") {
      widget.ready = true;
      clearTimeout(widget.timer);
    } else if (data.type === "resize" && typeof data.height === "number") {
      widget.iframe.style.height = Math.max(60, Math.min(1000, data.height)) + "px";
    } else if (data.type === "pass" && typeof data.token === "string") {
      widget.input.value = data.token;
      call(widget, "callback", [data.token]);
    } else if (data.type === "expired") {
      widget.input.value = "";
      call(widget, "expired-callback", []);
    } else if (data.type === "error" && typeof data.code === "string") {
      widget.input.value = "";
      error(widget, data.code);
    }
  });

  function reset(id) {
    const widget = find(id);
    if (!widget) return;
    widget.input.value = "";
    widget.iframe.contentWindow.postMessage({ asirra: 1, type: "reset" }, SERVICE_ORIGIN);
  }

  function getResponse(id) {
    const widget = find(id);
    return widget ? widget.input.value : "";
  }

  function remove(id) {
    const widget = find(id);
    if (!widget) return;
    clearTimeout(widget.timer);
    widget.iframe.remove();
    widget.input.remove();
    delete widget.container.dataset.asirraId;
    widgets.splice(widgets.indexOf(widget), 1);
  }

  function renderAll() {
    document.querySelectorAll(".asirra-captcha").forEach((el) => { if (!el.dataset.asirraId) render(el); });
  }

  window.asirra = { render: render, reset: reset, getResponse: getResponse, remove: remove };
  if (options.get("render") !== "explicit") {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", renderAll);
    else renderAll();
  }
  const onload = options.get("onload");
  if (onload && typeof window[onload] === "function") window[onload]();
})();
