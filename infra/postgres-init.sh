#!/usr/bin/env bash
# Run once by the postgres image on an empty data volume (mounted into /docker-entrypoint-initdb.d by
# infra/docker-compose.yml): one database per consumer, owned by $POSTGRES_USER.
#   airflow   Airflow's metadata DB (settings.airflow_db) and the Celery result backend
#   mlflow    the MLflow tracking server's backend store
#   feedback  the service's feedback store (settings.feedback_store)
set -euo pipefail
for db in ${INIT_DATABASES:-airflow mlflow feedback}; do
  echo "creating database $db"
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\""
done
