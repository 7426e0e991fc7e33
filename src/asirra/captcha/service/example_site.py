"""A tiny web site protected by the CAPTCHA: it lets a sign-up through only with a verified pass token.

The whole loop, as with reCAPTCHA or Turnstile. The site's form page adds two lines, the service's script and
an element in the form; the script shows the challenge in place and, on a pass, puts the pass token in a
hidden `asirra-response` field. The site's server adds the third: it asks the service, with the site's secret,
whether the token is genuine (`POST /api/verify`). The browser's word alone never counts.

The page sends a strict Content-Security-Policy (scripts from itself and the service, frames from the
service, no inline script or style) to show that the widget needs nothing more.

    ASIRRA_SITE_SECRET=... python -m asirra.captcha.service.example_site --captcha http://127.0.0.1:8000 --sitekey KEY
"""

from __future__ import annotations

import argparse
import html
import os
from typing import Sequence
from urllib.parse import parse_qs

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

FORM = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign up</title>
<script src="{captcha}/asirra.js" async defer></script>
<script src="/site.js" defer></script></head><body>
<h1>Sign up</h1>
<form method="post" action="/signup">
<p><label>Name <input name="name" maxlength="40" required></label></p>
<div class="asirra-captcha" data-sitekey="{sitekey}" data-callback="asirraPassed"
     data-expired-callback="asirraExpired" data-error-callback="asirraError"></div>
<p><button>Sign up</button></p>
</form>
<p id="captcha-status" role="status"></p>
</body></html>"""

# The page's callbacks: a line for the visitor, and a record of what happened (never the token) for tests.
SITE_JS = """"use strict";
window.asirraEvents = [];
function asirraNote(event, text) {
  window.asirraEvents.push(event);
  document.getElementById("captcha-status").textContent = text;
}
function asirraPassed() { asirraNote(["pass"], "Check passed: you can sign up."); }
function asirraExpired() { asirraNote(["expired"], "The check expired: please do it again."); }
function asirraError(code) { asirraNote(["error", code], "The check failed (" + code + ")."); }
"""


def create_site(captcha_url: str, sitekey: str, secret: str, transport: httpx.AsyncBaseTransport | None = None,
                hostnames: Sequence[str] = ()) -> FastAPI:
    """The site, using the service at `captcha_url` as `sitekey`; with `hostnames`, a pass must also have been
    earned on one of them (the verify answer's `hostname`)."""
    site = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    captcha_url = captcha_url.rstrip("/")
    policy = (f"default-src 'self'; script-src 'self' {captcha_url}; frame-src {captcha_url}; "
              "style-src 'self'; img-src 'self'")

    @site.get("/")
    def form() -> HTMLResponse:
        page = FORM.format(captcha=html.escape(captcha_url), sitekey=html.escape(sitekey))
        return HTMLResponse(page, headers={"Content-Security-Policy": policy})

    @site.get("/site.js")
    def script() -> Response:
        return Response(SITE_JS, media_type="text/javascript")

    @site.post("/signup")
    async def signup(request: Request) -> JSONResponse:
        body = await request.body()
        fields = parse_qs(body[:4096].decode("utf-8", "replace"))
        name, token = fields.get("name", [""])[0][:40], fields.get("asirra-response", [""])[0]
        try:
            async with httpx.AsyncClient(transport=transport, timeout=10) as client:
                reply = await client.post(f"{captcha_url}/api/verify", data={"secret": secret, "response": token})
            verdict = reply.json()
        except (httpx.HTTPError, ValueError):
            verdict = {"error-codes": ["captcha-service-unreachable"]}
        if not verdict.get("success"):  # any refusal, even a 4xx or 503 from the service, keeps the door shut
            return JSONResponse({"error": "the CAPTCHA was not passed", "error-codes": verdict.get("error-codes", [])},
                                status_code=403)
        if hostnames and verdict.get("hostname") not in hostnames:
            return JSONResponse({"error": "the CAPTCHA was passed on another site",
                                 "error-codes": ["hostname-mismatch"]}, status_code=403)
        return JSONResponse({"welcome": name, "hostname": verdict.get("hostname"),
                             "challenge_ts": verdict.get("challenge_ts")})

    return site


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captcha", required=True, help="the CAPTCHA service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--sitekey", required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (one of the site's hostnames)")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    secret = os.environ.get("ASIRRA_SITE_SECRET") or parser.error("set ASIRRA_SITE_SECRET to the site's secret")
    import uvicorn

    uvicorn.run(create_site(args.captcha, args.sitekey, secret), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
