"""The team stack's two forms agree: docker-compose.yml runs the MLflow server with the flags,
variables, defaults and server switches of scripts/team.py (which the `team` tests run for
real), and no password has a default anywhere."""

from __future__ import annotations

import re
import subprocess

import yaml
from conftest import REPO_ROOT

from scripts import team

COMPOSE = REPO_ROOT / "docker-compose.yml"
SECRET_VARIABLES = ("TEAM_DB_PASSWORD", "TEAM_S3_SECRET_KEY")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def substitutions() -> list[tuple[str, str, str]]:
    """Every ``${NAME<op><value>}`` of the compose file as (name, op, value)."""
    return re.findall(r"\$\{(\w+)(:?[-?]?)([^}]*)\}", COMPOSE.read_text())


def flags(args: list[str]) -> list[str]:
    return [arg for arg in args if arg.startswith("--")]


def test_the_compose_server_takes_the_flags_of_the_local_stack() -> None:
    command = compose()["services"]["mlflow"]["command"]
    assert command[:2] == ["mlflow", "server"]
    local = team.mlflow_server_args("127.0.0.1", 5000, "uri", "/artifacts", "2")
    assert flags(command) == flags(local)
    value = dict(zip(command[2::2], command[3::2], strict=True))
    assert value["--backend-store-uri"] == team.backend_store_uri(
        "${TEAM_DB_USER:-mlflow}", "postgres", 5432, "${TEAM_DB_NAME:-mlflow}"
    )
    assert value["--artifacts-destination"].startswith("s3://")
    assert value["--workers"] == "${TEAM_MLFLOW_WORKERS:-2}"


def test_the_same_variables_with_the_same_defaults() -> None:
    found = substitutions()
    for name, default in team.DEFAULTS.items():
        uses = [(op, value) for var, op, value in found if var == name]
        assert uses and all(use == (":-", default) for use in uses), (name, uses)
    server = compose()["services"]["mlflow"]["environment"]
    assert server["PGPASSWORD"] == "${TEAM_DB_PASSWORD:?set TEAM_DB_PASSWORD}"
    assert {k: server[k] for k in team.SERVER_ENV} == team.SERVER_ENV
    database = compose()["services"]["postgres"]["environment"]
    assert database["POSTGRES_USER"] == "${TEAM_DB_USER:-mlflow}"
    assert database["POSTGRES_DB"] == "${TEAM_DB_NAME:-mlflow}"


def test_no_password_has_a_default_or_sits_in_a_uri() -> None:
    for name, op, value in substitutions():
        if name in SECRET_VARIABLES:
            assert op == ":?", f"${{{name}}} must be required, not defaulted ({op}{value})"
    assert "TEAM_DB_PASSWORD" not in str(compose()["services"]["mlflow"]["command"])
    uri = team.backend_store_uri("user", "host", 1, "db")
    assert re.fullmatch(r"postgresql\+psycopg2://user@host:1/db", uri)


def test_the_stack_folder_is_ignored_by_git_and_dvc() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".team/pgdata/PG_VERSION"], cwd=REPO_ROOT, check=False
    )
    assert ignored.returncode == 0
    assert ".team/" in (REPO_ROOT / ".dvcignore").read_text().splitlines()


def test_the_env_file_round_trips_through_a_shell(tmp_path) -> None:
    stack = team.stack_from_env(str(tmp_path))
    team.write_env(stack, db_port=5433, mlflow_port=5001)
    assert team.read_env(stack) == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5001",
        "TEAM_MLFLOW_PORT": "5001",
        "TEAM_DB_PORT": "5433",
    }
    sourced = subprocess.run(
        ["bash", "-c", f"source {stack.env_file} && echo $MLFLOW_TRACKING_URI"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert sourced.stdout.strip() == "http://127.0.0.1:5001"


def test_without_postgresql_check_says_how_to_install_it(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(team, "DEBIAN_BINARIES", tmp_path / "none")
    monkeypatch.delenv("TEAM_PG_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert team.main(["check"]) == 1
    assert team.main(["up", "--dir", str(tmp_path / "team")]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert (
        lines
        == [
            "team: error: PostgreSQL not found (no initdb, pg_ctl and postgres); "
            "apt-get install -y postgresql"
        ]
        * 2
    )
    assert not (tmp_path / "team").exists()
