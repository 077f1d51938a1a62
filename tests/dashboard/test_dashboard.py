"""The dashboard in a real browser (Debian's Chromium through Playwright) against a real ``arborist serve``: sign
in, upload a model and a dataset, check the memory plan, see a field error at its field, submit a job from the
form and follow it to ``succeeded`` with its curve and report drawn, download an artifact, compare two jobs, cancel
and retry another; another tenant's job and model appear nowhere; a model named ``<script>alert(1)</script>`` is
shown as text and runs nothing. The security headers of the dashboard's responses are checked on the wire.

With ``ARBORIST_DASHBOARD_SCREENSHOTS=DIR`` the tests save screenshots of the main pages there (the README's come
from ``docs/dashboard``)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from _e2e_kit import MLP_KWARGS, DigitsFiles, sse_events, wait_for

SCREENSHOTS = os.environ.get("ARBORIST_DASHBOARD_SCREENSHOTS")
JOB_TIMEOUT_MS = 180_000
XSS = "<script>alert(1)</script>"


def shot(page: Any, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def key(serve) -> str:
    return serve.key("dash-a")


@pytest.fixture(scope="module")
def client(serve, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serve.base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        yield c


@pytest.fixture
def page(browser, serve) -> Iterator[Any]:
    """A fresh browser context (its own sessionStorage) with every dialog recorded and dismissed."""
    context = browser.new_context(base_url=serve.base, accept_downloads=True, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(90_000)  # a bound for every wait on the page: 2 shared cores can be slow
    page = context.new_page()
    page.dialogs = []  # type: ignore[attr-defined]

    def on_dialog(dialog: Any) -> None:
        page.dialogs.append((dialog.type, dialog.message))
        if dialog.type == "confirm":
            dialog.accept()
        else:
            dialog.dismiss()

    page.on("dialog", on_dialog)
    page.console_errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda exc: page.console_errors.append(str(exc)))
    page.csp_violations = []  # type: ignore[attr-defined]
    page.on(
        "console",
        lambda msg: "Content Security Policy" in msg.text and page.csp_violations.append(msg.text),
    )
    try:
        yield page
    finally:
        context.close()


def sign_in(page: Any, key: str, hash_: str = "") -> None:
    page.goto(f"/ui/{hash_}")
    page.fill("#api-key", key)
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#nav:not([hidden])")


def upload_inputs(client: httpx.Client, files: DigitsFiles, name: str = "digits-mlp") -> tuple[str, str]:
    with open(files.model, "rb") as fh:
        r = client.post(
            "/v1/models",
            files={"file": (files.model.name, fh)},
            data={"name": name, "arch": "mlp", "arch_kwargs": json.dumps(MLP_KWARGS)},
        )
    assert r.status_code == 201, r.text
    model_id = r.json()["id"]
    with open(files.dataset, "rb") as fh:
        r = client.post("/v1/datasets", files={"file": (files.dataset.name, fh)}, data={"name": "digits"})
    assert r.status_code == 201, r.text
    return model_id, r.json()["id"]


def submit(client: httpx.Client, model_id: str, dataset_id: str, spec: dict) -> str:
    r = client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": spec})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_state(client: httpx.Client, job_id: str, states: set[str], timeout: float = 180) -> dict:
    return wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] in states and j,
        timeout=timeout,
        what=f"job {job_id} to reach {sorted(states)}",
        interval=0.3,
    )


def test_headers_on_the_wire(serve) -> None:
    r = httpx.get(f"{serve.base}/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    page = httpx.get(f"{serve.base}/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script" in page.text and "<script>" not in page.text  # only <script type=module src=...>, no inline
    js = httpx.get(f"{serve.base}/ui/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert js.headers["content-security-policy"] == csp
    schema = httpx.get(f"{serve.base}/ui/spec-schema.json").json()
    assert "sparsity" in schema["properties"] and "lambda" in schema["$defs"]["FisherSpec"]["properties"]
    api = httpx.get(f"{serve.base}/v1/models")
    assert api.status_code == 401 and "content-security-policy" not in api.headers  # the API is left as it was


def test_journey(page: Any, serve, key: str, client: httpx.Client, digits_files: DigitsFiles, tmp_path: Path) -> None:
    # a wrong key is refused where it was typed
    page.goto("/ui/")
    page.fill("#api-key", "arb_wrong_key_0123456789")
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#sign-in .problem")
    assert page.locator("#nav").is_hidden()
    sign_in(page, key)
    assert key not in page.url
    assert page.evaluate("sessionStorage.getItem('arborist.api-key')") == key
    assert page.evaluate("localStorage.length") == 0

    # a file that is no model is refused with the API's problem, shown on the page
    page.goto("/ui/#/models")
    page.set_input_files("#models-file", str(digits_files.dataset))
    page.click("#models-upload button[type=submit]")
    page.wait_for_selector("#models-upload .problem")
    assert "422" in page.inner_text("#models-upload .problem")

    # upload a model (with its architecture) and a dataset, with a progress bar
    page.set_input_files("#models-file", str(digits_files.model))
    page.fill("#models-name", "digits-mlp")
    page.fill("#models-arch", "mlp")
    page.fill("#models-arch_kwargs", json.dumps(MLP_KWARGS))
    page.click("#models-upload button[type=submit]")
    page.wait_for_selector("#models-upload .uploaded")
    assert page.eval_on_selector("#upload-progress", "e => e.value") == 1
    row = page.locator("#models-table tbody tr", has_text="digits-mlp")
    assert row.count() == 1 and "safetensors" in row.inner_text() and "mlp" in row.inner_text()
    shot(page, "models")
    page.goto("/ui/#/datasets")
    page.set_input_files("#datasets-file", str(digits_files.dataset))
    page.click("#datasets-upload button[type=submit]")
    page.wait_for_selector("#datasets-upload .uploaded")
    row = page.locator("#datasets-table tbody tr").first
    assert str(len(digits_files.y)) in row.inner_text().replace(",", "") and "[64]" in row.inner_text()

    # the form: defaults filled in, help text, the plan before submitting, a field error at its field
    page.goto("/ui/#/new")
    page.wait_for_selector("#job-form")
    assert page.input_value("[name='fisher.recompute']") == ""  # null: the method's own default, set by the server
    assert page.input_value("[name='method']") == "woodfisher"
    assert "sub-steps" in page.locator("[data-path='fisher.recompute'] .help").inner_text()
    page.fill("[name='sparsity']", "0.8")
    page.fill("[name='fisher.samples']", "64")
    page.select_option("[name='device']", "cpu")
    page.click("#check-plan")
    page.wait_for_selector("#plan .plan-ok")
    assert "pruning step peak" in page.inner_text("#plan")
    page.fill("[name='fisher.recompute']", "1000")
    page.click("#submit-job")
    page.wait_for_selector("[data-error-for='fisher.recompute']:not(:empty)")
    assert page.get_attribute("[name='fisher.recompute']", "aria-invalid") == "true"
    assert page.locator(".field-error:not(:empty)").count() == 1
    shot(page, "new-job")
    page.fill("[name='fisher.recompute']", "4")
    page.fill("[name='fisher.lambda']", "auto")  # a number or 'auto'; the grid is a comma-separated list
    page.fill("[name='fisher.lambda_grid']", "1e-5, 1e-3, 0.1")
    page.click("#submit-job")
    page.wait_for_url("**/ui/#/jobs/job*")
    job_id = page.url.rsplit("/", 1)[-1]
    submitted = client.get(f"/v1/jobs/{job_id}").json()
    assert submitted["spec"]["sparsity"] == 0.8 and submitted["spec"]["fisher"]["samples"] == 64
    assert submitted["spec"]["fisher"]["recompute"] == 4
    assert submitted["spec"]["fisher"]["lambda"] == "auto" and submitted["spec"]["fisher"]["lambda_grid"][:3] == [
        1e-5,
        1e-3,
        0.1,
    ]

    # the job page follows the stream to the end, with the curve and the report drawn
    page.wait_for_selector("#job-head [data-state='succeeded']", timeout=JOB_TIMEOUT_MS)
    page.wait_for_selector("#report #layers-plot")
    assert page.locator("#curve-plot circle").count() >= 2  # dense, then pruned
    assert page.locator("#layers-plot rect.bar").count() == 2  # the MLP's two weight matrices
    assert page.locator("#quadratic-plot circle").count() == 1  # one one-shot pruning step
    speed = page.locator("#speed-table tbody tr")  # measured latency: 2 runtimes × batch 1 and the larger batch
    assert speed.count() == 4 and page.locator("#speed-table td", has_text="size only").count() == 4
    sweep = client.get(f"/v1/jobs/{job_id}/artifacts/report.json").json()["lambda_sweep"]
    swept = len([e for e in sweep if e["score"] is not None])
    assert len(sweep) >= 3 and page.locator("#lambda-plot g.series").first.locator("circle").count() == swept
    # every event once, in order, across the reconnections (the server cuts each stream after 3 s)
    shown = page.eval_on_selector_all("#events li[data-seq]", "els => els.map(e => Number(e.dataset.seq))")
    assert shown == [e["seq"] for kind, e in sse_events(client, job_id, timeout=60) if kind != "end"]
    assert page.locator("#events li[data-kind='end']").count() == 1
    shot(page, "job")

    # download an artifact: the bytes the API serves
    with page.expect_download() as info:
        page.click("[data-download='pruned.safetensors']")
    saved = tmp_path / "pruned.safetensors"
    info.value.save_as(saved)
    served = client.get(f"/v1/jobs/{job_id}/artifacts/pruned.safetensors")
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == served.headers["x-checksum-sha256"]

    # compare with a magnitude job on the same model
    other = submit(
        client,
        submitted["model_id"],
        submitted["dataset_id"],
        {"method": "global_magnitude", "sparsity": 0.8, "device": "cpu"},
    )
    wait_state(client, other, {"succeeded"})
    page.goto(f"/ui/#/compare?ids={job_id},{other}")
    page.wait_for_selector("#compare-plot g.series >> nth=1")
    assert page.locator("#compare-plot g.series").count() == 2
    shot(page, "compare")
    page.goto("/ui/#/jobs")
    page.wait_for_selector(f"#jobs-table [data-job='{job_id}']")
    assert page.locator(f"#jobs-table [data-job='{other}']").count() == 1
    shot(page, "jobs")
    assert page.dialogs == [] and page.console_errors == [] and page.csp_violations == []


def test_cancel_and_retry(page: Any, key: str, client: httpx.Client, digits_files: DigitsFiles) -> None:
    model_id, dataset_id = upload_inputs(client, digits_files, name="long-runner")
    spec = {"method": "woodfisher", "sparsity": 0.5, "device": "cpu", "finetune": {"epochs": 2000, "batch_size": 8}}
    job_id = submit(client, model_id, dataset_id, spec)
    sign_in(page, key, f"#/jobs/{job_id}")
    page.wait_for_selector("#cancel-job:not([hidden])")
    page.click("#cancel-job")
    page.wait_for_selector("#job-head [data-state='canceled']", timeout=JOB_TIMEOUT_MS)
    assert wait_state(client, job_id, {"canceled"})["state"] == "canceled"
    page.wait_for_selector("#retry-job:not([hidden])")
    page.click("#retry-job")
    page.wait_for_selector("#job-head [data-state='queued'], #job-head [data-state='running']")
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] in {"queued", "running"}
    page.click("#cancel-job")
    page.wait_for_selector("#job-head [data-state='canceled']", timeout=JOB_TIMEOUT_MS)


def test_other_tenants_nowhere(page: Any, serve, key: str, digits_files: DigitsFiles) -> None:
    with httpx.Client(base_url=serve.base, headers={"Authorization": f"Bearer {serve.key('dash-b')}"}) as other:
        model_id, dataset_id = upload_inputs(other, digits_files, name="tenant-b-secret-model")
        job_id = submit(other, model_id, dataset_id, {"method": "magnitude", "sparsity": 0.5, "device": "cpu"})
    sign_in(page, key)
    page.wait_for_selector("#jobs-table, #jobs-list p")
    assert page.locator(f"[data-job='{job_id}']").count() == 0
    assert job_id not in page.content()
    page.goto("/ui/#/models")
    page.wait_for_selector("#models-table, #models-list p")
    assert "tenant-b-secret-model" not in page.content()
    page.goto(f"/ui/#/jobs/{job_id}")
    page.wait_for_selector("#job-head .problem")
    assert "404" in page.inner_text("#job-head .problem")
    page.goto("/ui/#/new")
    page.wait_for_selector("#job-form")
    assert page.locator(f"#model_id option[value='{model_id}']").count() == 0


def test_names_are_text(page: Any, key: str, client: httpx.Client, digits_files: DigitsFiles) -> None:
    model_id, _ = upload_inputs(client, digits_files, name=XSS)
    sign_in(page, key, "#/models")
    page.wait_for_selector("#models-table")
    cell = page.locator("#models-table .name", has_text=XSS)
    assert cell.count() == 1 and cell.inner_text() == XSS
    assert page.locator("#view script").count() == 0
    page.goto("/ui/#/new")
    page.wait_for_selector("#job-form")
    assert XSS in page.locator(f"#model_id option[value='{model_id}']").inner_text()
    assert page.dialogs == [] and page.console_errors == [] and page.csp_violations == []
    # delete it from its list: the only dialog is the confirmation (accepted), naming it as text
    page.goto("/ui/#/models")
    page.click(f"[data-delete='{model_id}']")
    page.wait_for_selector(f"[data-delete='{model_id}']", state="detached")
    assert page.dialogs == [("confirm", f"Delete {XSS}?")]
    assert client.get(f"/v1/models/{model_id}").status_code == 404


def test_a_slow_view_never_covers_the_next_one(page: Any, key: str) -> None:
    """The jobs view waits for /v1/models; the user moves on to #/models before it answers. The late answer must
    not render the jobs page over the models page (it did: the sign-in → #/jobs → #/models race of the journey)."""
    sign_in(page, key, "#/models")
    page.wait_for_selector("#models-upload")
    held = []

    def hold_first(route):
        if not held:  # the jobs view's call: answered once the models view is on the page
            held.append(route)
            return
        route.continue_()

    page.route("**/v1/models?*", hold_first)
    page.goto("/ui/#/jobs")
    page.wait_for_function("() => !document.querySelector('#models-upload')")  # the jobs view started
    page.goto("/ui/#/models")
    page.wait_for_selector("#models-upload")
    assert held, "the jobs view never asked for the models"
    held[0].continue_()
    page.wait_for_timeout(500)  # let the held answer arrive and the stale view run to its end
    assert page.locator("#models-upload").count() == 1 and page.locator("#jobs-list").count() == 0
    assert page.console_errors == [] and page.csp_violations == []
