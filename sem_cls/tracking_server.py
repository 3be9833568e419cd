"""`make server`: MLflow's tracking server on this project's store. Beyond 127.0.0.1 it runs
MLflow's login (the basic-auth app), with the user and password set in the environment.

python -m sem_cls.tracking_server --host 0.0.0.0 --port 5000 --mlruns mlruns
"""

import argparse
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from sem_cls.errors import UserError, exits_on_user_error

# The names MLflow's clients read too, so one pair serves the server, training nodes and the UI.
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# MLflow's basic_auth.ini with the users kept beside the runs; users other than the admin
# (added through MLflow's API) may read every experiment.
AUTH_CONFIG = """[mlflow]
default_permission = READ
database_uri = sqlite:///{mlruns}/basic_auth.db
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only; a name other than localhost may
    resolve to any interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_environment(mlruns: Path) -> dict[str, str]:
    """What MLflow's basic-auth app needs: its config (users in mlruns/basic_auth.db), the admin
    it creates on its first start (the user of MLFLOW_TRACKING_USERNAME/_PASSWORD) and the key
    that signs its CSRF tokens."""
    missing = [name for name in CREDENTIALS if not os.environ.get(name)]
    if missing:
        raise UserError(
            f"A tracking server beyond 127.0.0.1 needs a login, and {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set. Set the user and password it is "
            "to accept, e.g. "
            "`export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=<a long secret>`, "
            "then start it again; training nodes and clients set the same two variables. "
            "Or serve this machine only: make server HOST=127.0.0.1."
        )
    config = mlruns / "basic_auth.ini"
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        # Used when basic_auth.db has no admin yet; later the stored password stands.
        "MLFLOW_AUTH_ADMIN_USERNAME": os.environ["MLFLOW_TRACKING_USERNAME"],
        "MLFLOW_AUTH_ADMIN_PASSWORD": os.environ["MLFLOW_TRACKING_PASSWORD"],
        # Several servers behind one address share theirs; one server can make its own.
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
        or secrets.token_hex(32),
    }


def server_command(
    host: str, port: int, mlruns: Path, auth: bool = False, workers: int = 2
) -> tuple[list[str], dict[str, str]]:
    """The `mlflow server` command line and its extra environment: runs in mlruns/mlflow.db,
    artifacts served from mlruns/artifacts, with the login where `auth` or `host` asks."""
    mlruns = mlruns.resolve()
    login = auth or not is_loopback(host)
    env = auth_environment(mlruns) if login else {}  # refused before anything is written
    (mlruns / "artifacts").mkdir(parents=True, exist_ok=True)
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--host", host, "--port", str(port), "--workers", str(workers),
        "--backend-store-uri", f"sqlite:///{mlruns / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", str(mlruns / "artifacts"),
    ]  # fmt: skip
    if login:
        command += ["--app-name", "basic-auth"]
        (mlruns / "basic_auth.ini").write_text(AUTH_CONFIG.format(mlruns=mlruns))
    return command, env


@exits_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--mlruns", type=Path, default=Path("mlruns"))
    parser.add_argument("--auth", action="store_true", help="the login on 127.0.0.1 too")
    # MLflow's default of 4 workers, each importing MLflow, is more than a lab's few clients need.
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    command, env = server_command(args.host, args.port, args.mlruns, args.auth, args.workers)
    if env:
        print(f"Tracking server with login on http://{args.host}:{args.port}", file=sys.stderr)
    os.execve(command[0], command, {**os.environ, **env})  # the server in this process's place


if __name__ == "__main__":
    main()
