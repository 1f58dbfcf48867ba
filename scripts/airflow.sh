#!/usr/bin/env bash
# `make airflow`: Airflow standalone (api-server, scheduler, dag-processor, triggerer) on this workspace's
# dags/, its SQLite database under settings.airflow_home (.airflow, or FLYWHEEL_AIRFLOW_HOME / AIRFLOW_HOME).
# AIRFLOW__API__PORT picks the port (default 8080). Creates the single-slot DVC pool first.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r home pool < <(python -c "
from flywheel.settings import load_settings
s = load_settings(); print(s.airflow_home, s.params.orchestration.pool)")
port=${AIRFLOW__API__PORT:-8080}
export AIRFLOW_HOME=$home FLYWHEEL_ROOT=$PWD
export AIRFLOW__CORE__DAGS_FOLDER=$PWD/dags AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__API__PORT=$port
export AIRFLOW__API__BASE_URL=${AIRFLOW__API__BASE_URL:-http://localhost:$port}   # tasks reach the execution API here
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}                 # LocalExecutor workers (2-core machine)
mkdir -p "$AIRFLOW_HOME"
airflow db migrate > "$AIRFLOW_HOME/db-migrate.log"
airflow pools set "$pool" 1 "one DVC command per workspace at a time"
echo "==> Airflow on http://localhost:$port  user: admin  password: $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
exec airflow standalone
