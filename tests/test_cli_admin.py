"""``arborist keys``/``db`` with ``--data-dir``: the database ``arborist serve --data-dir`` uses, from any directory."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.admin import db, keys
from cli.serve import embedded_settings


def test_keys_create_takes_the_data_dir_of_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "srv" / "data"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the shell is not where the data lives: no ./data here
    runner = CliRunner()

    missing = runner.invoke(keys, ["create", "--tenant", "alice", "--data-dir", str(data_dir)])
    assert missing.exit_code == 1 and "no database at" in missing.output and "arborist serve" in missing.output

    up = runner.invoke(db, ["upgrade", "--data-dir", str(data_dir)])
    assert up.exit_code == 0, up.output
    created = runner.invoke(keys, ["create", "--tenant", "alice", "--name", "ci", "--data-dir", str(data_dir)])
    assert created.exit_code == 0, created.output
    assert created.stdout.strip().splitlines()[0].startswith("arb_")
    assert not (elsewhere / "data").exists()

    # the same database serve opens for that directory (cli/datadir.py maps both)
    url = embedded_settings(data_dir, None).database_url
    listed = runner.invoke(keys, ["list", "--url", url])
    assert listed.exit_code == 0 and "\talice\tci\tactive" in listed.output, listed.output
    relative = runner.invoke(keys, ["list", "--data-dir", "../srv/data"])
    assert relative.exit_code == 0 and "\talice\tci\tactive" in relative.output, relative.output

    both = runner.invoke(keys, ["list", "--url", url, "--data-dir", str(data_dir)])
    assert both.exit_code == 2 and "not both" in both.output


def test_serve_banner_names_the_data_dir(tmp_path: Path) -> None:
    from cli.serve import _banner

    data_dir = tmp_path / "my data"
    banner = _banner("http://127.0.0.1:8000", embedded_settings(data_dir, None), data_dir)
    assert f"arborist keys create --tenant <your-name> --data-dir '{data_dir.resolve()}'" in banner
    other = embedded_settings(data_dir, "sqlite:////elsewhere/x.db")
    assert "--url sqlite:////elsewhere/x.db" in _banner("http://h", other, data_dir)


def test_serve_keeps_an_explicit_artifact_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``arborist serve`` put artifacts under ``<data-dir>/artifacts`` even when ARBORIST_ARTIFACT_ROOT named a
    bucket (issue #19): an explicit setting wins, from the environment or from ``.env``; otherwise the data dir's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ARBORIST_ARTIFACT_ROOT", raising=False)
    data_dir = tmp_path / "data"
    assert embedded_settings(data_dir, None).artifact_root == str(data_dir.resolve() / "artifacts")

    monkeypatch.setenv("ARBORIST_ARTIFACT_ROOT", "s3://bucket/arborist")
    assert embedded_settings(data_dir, None).artifact_root == "s3://bucket/arborist"

    monkeypatch.delenv("ARBORIST_ARTIFACT_ROOT")
    (tmp_path / ".env").write_text("ARBORIST_ARTIFACT_ROOT=s3://from-dotenv/x\n")
    assert embedded_settings(data_dir, None).artifact_root == "s3://from-dotenv/x"
    assert embedded_settings(data_dir, None, {"artifact_root": "/o"}).artifact_root == "/o"  # overrides: the caller's


def test_usage_lists_every_tenant_beside_its_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from cli.usage import usage
    from core.service.db import inputs, tenants
    from core.service.db.base import make_engine, make_sessionmaker
    from core.service.settings import get_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ARBORIST_TENANT_QUEUED_JOBS", "3")
    monkeypatch.setenv("ARBORIST_TENANT_LIMITS", '{"bob": {"stored_bytes": 1000}}')
    get_settings.cache_clear()
    data_dir = tmp_path / "data"
    runner = CliRunner()
    assert runner.invoke(db, ["upgrade", "--data-dir", str(data_dir)]).exit_code == 0
    engine = make_engine(embedded_settings(data_dir, None).database_url)
    try:
        with make_sessionmaker(engine)() as s:
            alice = tenants.get_or_create_tenant(session=s, name="alice")
            tenants.get_or_create_tenant(session=s, name="bob")
            inputs.create_model(
                session=s, tenant=alice, name="m", format="safetensors", size=123, sha256="0" * 64, path="models/m"
            )
    finally:
        engine.dispose()
    try:
        table = runner.invoke(usage, ["--data-dir", str(data_dir)])
        assert table.exit_code == 0, table.output
        assert table.output.splitlines() == [
            "tenant\trunning\tqueued\tstored_bytes\trequests_per_s",
            "alice\t0/-\t0/3\t123/-\t-",
            "bob\t0/-\t0/3\t0/1000\t-",
        ]
        rows = [
            json.loads(line)
            for line in runner.invoke(usage, ["--json", "--data-dir", str(data_dir)]).output.splitlines()
        ]
        assert rows[0]["tenant"] == "alice" and rows[0]["stored_bytes"] == {"limit": None, "used": 123}
    finally:
        get_settings.cache_clear()
