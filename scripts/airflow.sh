#!/usr/bin/env bash
# `make airflow`: Airflow standalone (api-server, scheduler, dag-processor, triggerer) on this workspace's
# dags/, its SQLite database under settings.airflow_home (.airflow, or FLYWHEEL_AIRFLOW_HOME / AIRFLOW_HOME).
# Listens on 127.0.0.1 by default (AIRFLOW__API__HOST=0.0.0.0 opens it to the network: put an authenticating
# proxy in front). Every port is settable: AIRFLOW__API__PORT (8080), AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT
# (8793), AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT (8794). Creates the single-slot DVC pool first.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r home pool < <(python -c "
from flywheel.settings import load_settings
s = load_settings(); print(s.airflow_home, s.params.orchestration.pool)")
port=${AIRFLOW__API__PORT:-8080}
export AIRFLOW_HOME=$home FLYWHEEL_ROOT=$PWD
host=${AIRFLOW__API__HOST:-127.0.0.1}
export AIRFLOW__CORE__DAGS_FOLDER=$PWD/dags AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__API__PORT=$port
export AIRFLOW__API__HOST=$host
export AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=${AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT:-8793}
export AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=${AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT:-8794}
export AIRFLOW__API__BASE_URL=${AIRFLOW__API__BASE_URL:-http://127.0.0.1:$port}  # tasks reach the execution API here
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}                 # LocalExecutor workers (2-core machine)
# LocalExecutor whose workers import the stages' libraries once, before they fork tasks (flywheel/airflow_worker.py)
export AIRFLOW__CORE__EXECUTOR=${AIRFLOW__CORE__EXECUTOR:-flywheel.airflow_worker.PreloadingLocalExecutor}
mkdir -p "$AIRFLOW_HOME"
airflow db migrate > "$AIRFLOW_HOME/db-migrate.log"
airflow pools set "$pool" 1 "one DVC command per workspace at a time"
echo "==> Airflow on http://$host:$port  user: admin  password: $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
exec airflow standalone
