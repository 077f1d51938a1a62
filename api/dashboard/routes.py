"""The dashboard's routes: ``/`` redirects to ``/ui/``, the page (one server-rendered shell; the views are drawn in
the browser by ``static/app.js`` from the JSON API), its static files, and the spec's JSON Schema the new-job form
is generated from. None of these needs a key: the page holds no data until the user signs in, and then asks the
API for it with the key (kept in the browser's sessionStorage, sent as the Authorization header)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from api.dashboard.headers import DashboardHeadersMiddleware
from core.runs.spec import PruneSpec

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)


def spec_schema() -> dict[str, Any]:
    """The JSON Schema of a job's ``spec`` (field names as the API takes them: ``lambda``, not ``damping``)."""
    return PruneSpec.model_json_schema(by_alias=True)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
def ui_slash() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/", response_class=HTMLResponse)
def page(request: Request) -> HTMLResponse:
    response = templates.TemplateResponse(
        request, "index.html", {"version": request.app.version, "title": request.app.title}
    )
    response.headers["Cache-Control"] = "no-cache"
    return response


@router.get("/ui/spec-schema.json")
def schema() -> JSONResponse:
    return JSONResponse(spec_schema(), headers={"Cache-Control": "no-cache"})


def install_dashboard(app: FastAPI) -> None:
    """Adds the dashboard to ``app``: its routes, its static files and the security headers of its responses."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")
    app.add_middleware(DashboardHeadersMiddleware)
