#!/usr/bin/env bash
# The MLflow tracking server and registry behind MLflow's basic-auth app (README "Security model").
# Every request needs a user: the pipeline (workers, init) and the online service have accounts of their own
# (infra/mlflow_users.py makes them), and only the pipeline account may register versions or move aliases.
# The auth app's configuration holds a database URL with a password, so it is written at start-up from the
# environment into a private file, never into the image or the repository.
#   MLFLOW_AUTH_ADMIN_PASSWORD       the admin account's password (required; MLflow ships none)
#   MLFLOW_FLASK_SERVER_SECRET_KEY   CSRF secret of the auth app (required; the same on every replica)
#   MLFLOW_AUTH_DATABASE_URI         where users and permissions live (required)
#   MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION: read by `mlflow server` itself
# Extra arguments go to `mlflow server` (e.g. --workers 2).
set -euo pipefail
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_AUTH_ADMIN_PASSWORD must be set}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?MLFLOW_FLASK_SERVER_SECRET_KEY must be set}"
: "${MLFLOW_AUTH_DATABASE_URI:?MLFLOW_AUTH_DATABASE_URI must be set}"
umask 077
conf_dir=$(mktemp -d)
# No one is granted anything by default: every permission is given explicitly (infra/mlflow_users.py), and
# whoever creates an experiment or a registered model manages it.
cat > "$conf_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$conf_dir/basic_auth.ini"
# a route the auth app has no rule for is refused, not let through (MLflow's default is to let it through)
export MLFLOW_BASIC_AUTH_FAIL_CLOSED=true
exec mlflow server --app-name basic-auth --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" "$@"
