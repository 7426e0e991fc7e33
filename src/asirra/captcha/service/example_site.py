"""A tiny web site protected by the CAPTCHA: it lets a sign-up through only with a verified pass token.

The whole loop, as with reCAPTCHA or Turnstile: the visitor solves a challenge requested with this
site's public key (`/?sitekey=KEY` on the service shows the pass token after a pass), the form
carries the token to this site, and this site's server asks the service, with its secret,
whether the token is genuine: `POST /api/verify`. The browser's word alone never counts.

    ASIRRA_SITE_SECRET=... python -m asirra.captcha.service.example_site --captcha http://127.0.0.1:8000 --sitekey KEY
"""

from __future__ import annotations

import argparse
import html
import os
from urllib.parse import parse_qs

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

FORM = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign up</title></head><body>
<h1>Sign up</h1><p>First <a href="{captcha}/?sitekey={sitekey}" target="_blank">prove you are human</a>,
then paste the pass token here.</p>
<form method="post" action="/signup" data-sitekey="{sitekey}">
<label>Name <input name="name" maxlength="40" required></label>
<label>Pass token <input name="asirra-response" maxlength="200" required></label>
<button>Sign up</button></form></body></html>"""


def create_site(captcha_url: str, sitekey: str, secret: str, transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    site = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    captcha_url = captcha_url.rstrip("/")

    @site.get("/")
    def form() -> HTMLResponse:
        return HTMLResponse(FORM.format(captcha=html.escape(captcha_url), sitekey=html.escape(sitekey)))

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
        return JSONResponse({"welcome": name})

    return site


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captcha", required=True, help="the CAPTCHA service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--sitekey", required=True)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    secret = os.environ.get("ASIRRA_SITE_SECRET") or parser.error("set ASIRRA_SITE_SECRET to the site's secret")
    import uvicorn

    uvicorn.run(create_site(args.captcha, args.sitekey, secret), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
