#!/usr/bin/env bash
# Entry point of the Flywheel image (infra/Dockerfile): make sure the workspace exists, then run the command.
# The workspace ($FLYWHEEL_ROOT, a volume shared by the workers and the service) is where `dvc repro` runs and the
# data, models and reports live. An empty one is seeded from the image's copy of the project; afterwards the code
# that dvc.yaml hashes (flywheel/, pipelines/, service/, dags/, eval/, dvc.yaml) is refreshed from the image when
# REFRESH_WORKSPACE_CODE=1 (the compose file's `init` service sets it), so an upgraded image and the DVC lock agree.
# Nothing else is touched: params.yaml, data/, models/, .git and .dvc stay as the workspace has them.
set -euo pipefail
APP=/opt/flywheel/app
ROOT=${FLYWHEEL_ROOT:-/workspace}

if [ -d "$ROOT" ] && [ -w "$ROOT" ]; then
  if [ ! -f "$ROOT/params.yaml" ]; then
    echo "==> seeding the workspace $ROOT from $APP" >&2
    cp -a "$APP/." "$ROOT/"
  elif [ "${REFRESH_WORKSPACE_CODE:-0}" = 1 ]; then
    for part in flywheel pipelines service dags eval dvc.yaml; do
      rm -rf "${ROOT:?}/$part"
      cp -a "$APP/$part" "$ROOT/$part"
    done
  fi
fi
exec "$@"
