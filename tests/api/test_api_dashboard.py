"""The dashboard's routes on the API server (the browser tests are in tests/dashboard): the page, its static
files (shipped in the package: no CDN, nothing fetched from elsewhere), the spec's schema, and the security headers
that only the dashboard's responses carry."""

from __future__ import annotations

import re
from importlib.resources import files

from api.dashboard.headers import CSP
from core.runs.spec import PruneSpec

STATIC = files("api.dashboard") / "static"


def test_page_and_static_files_with_security_headers(server) -> None:
    c = server.client()
    assert c.get("/", follow_redirects=False).headers["location"] == "/ui/"
    page = c.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "frame-ancestors 'none'" in CSP and "unsafe" not in CSP
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    # every script and stylesheet the page names is one of ours, served from /ui/static, and no script is inline
    assets = re.findall(r'(?:src|href)="(/ui/static/[^"?]+)', page.text)
    assert sorted(assets) == ["/ui/static/app.js", "/ui/static/style.css"]
    assert re.search(r"<script(?![^>]*\bsrc=)", page.text) is None
    for name in [p.name for p in STATIC.iterdir()]:
        r = c.get(f"/ui/static/{name}")
        assert r.status_code == 200 and r.text == (STATIC / name).read_text(), name
        assert r.headers["content-security-policy"] == CSP
        urls = set(re.findall(r"https?://[^\s\"')]+", r.text)) - {"http://www.w3.org/2000/svg"}  # a namespace name
        assert not urls, f"{name} reaches outside the server: {urls}"
    assert c.get("/ui/static/../main.py").status_code == 404


def test_scripts_insert_no_html() -> None:
    """Data reaches the page as text: no script assigns innerHTML/outerHTML or calls insertAdjacentHTML or
    document.write."""
    for script in STATIC.iterdir():
        if script.name.endswith(".js"):
            text = script.read_text()
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
                assert sink not in text, f"{script.name} uses {sink}"


def test_spec_schema_is_the_api_bodys(server) -> None:
    schema = server.client().get("/ui/spec-schema.json").json()
    assert schema == PruneSpec.model_json_schema(by_alias=True)
    assert "lambda" in schema["$defs"]["FisherSpec"]["properties"]  # as the API takes it, not the python name


def test_api_responses_keep_their_headers(server, client) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200 and "content-security-policy" not in r.headers
    assert "content-security-policy" not in server.client().get("/healthz").headers
