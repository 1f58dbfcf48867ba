"""The MLflow server's accounts (infra/mlflow-server.sh runs it with the basic-auth app). Run with the admin's
credentials in MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD and the tracking server in
MLFLOW_TRACKING_URI (compose's `init` service does both steps):

  python infra/mlflow_users.py users   create (or re-key) the pipeline and service accounts
  python infra/mlflow_users.py grant   the service may READ the registered models (after `flywheel bootstrap`)

Accounts: MLFLOW_PIPELINE_USER (default flywheel-pipeline) / MLFLOW_PIPELINE_PASSWORD: the Airflow workers and
`init`; they create the experiments and registered models, so they manage them (register, move aliases).
MLFLOW_SERVICE_USER (default flywheel-service) / MLFLOW_SERVICE_PASSWORD: `flywheel serve`; it only reads which
version is champion and downloads it. The server's default permission is NO_PERMISSIONS: nobody else can read or
move anything until an admin grants it.
"""

from __future__ import annotations

import os
import sys

MODEL_NAMES = ("flywheel-policy", "flywheel-reward")


def _need(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        sys.exit(f"error: {name} must be set")
    return value


def _client():
    from mlflow.server import get_app_client

    # the auth client authenticates with MLFLOW_TRACKING_USERNAME / _PASSWORD: here, the admin's
    os.environ["MLFLOW_TRACKING_USERNAME"] = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    os.environ["MLFLOW_TRACKING_PASSWORD"] = _need("MLFLOW_AUTH_ADMIN_PASSWORD")
    return get_app_client("basic-auth", tracking_uri=_need("MLFLOW_TRACKING_URI"))


def _ensure_user(client, username: str, password: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.get_user(username)
    except MlflowException:
        try:
            client.create_user(username, password)
            return f"created {username}"
        except MlflowException as exc:  # a create the client retried after a slow first answer
            if "already exists" not in str(exc).lower():
                raise
    client.update_user_password(username, password)
    return f"{username} exists; password set"


def users() -> list[str]:
    client = _client()
    return [
        _ensure_user(
            client, os.environ.get("MLFLOW_PIPELINE_USER") or "flywheel-pipeline", _need("MLFLOW_PIPELINE_PASSWORD")
        ),
        _ensure_user(
            client, os.environ.get("MLFLOW_SERVICE_USER") or "flywheel-service", _need("MLFLOW_SERVICE_PASSWORD")
        ),
    ]


def grant() -> list[str]:
    client = _client()
    service = os.environ.get("MLFLOW_SERVICE_USER") or "flywheel-service"
    done = []
    from mlflow.exceptions import MlflowException

    for name in MODEL_NAMES:
        try:
            client.grant_user_permission(service, "registered_model", name, "READ")
        except MlflowException as exc:  # granted before (a rerun of init, or a retried call): already in force
            if "already exists" not in str(exc).lower():
                raise
        done.append(f"{service} may read {name}")
    return done


def main(argv: list[str]) -> int:
    steps = {"users": users, "grant": grant}
    if len(argv) != 1 or argv[0] not in steps:
        print(__doc__, file=sys.stderr)
        return 2
    for line in steps[argv[0]]():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
