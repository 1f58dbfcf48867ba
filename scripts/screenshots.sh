#!/usr/bin/env bash
# Screenshots of every page the README sends people to, after `make demo`, with headless Chromium (Debian's
# `chromium` package: apt-get install chromium). Starts the MLflow UI, `flywheel serve` and `airflow standalone`
# (every user an admin, so no login page) on free local ports, triggers one continuous_improvement run over the
# REST API (every stage is up to date after the demo: the run shows the verdicts and "NOTHING RETRAINED"), takes
# the screenshots into OUT (default screenshots/), then stops what it started. Nothing leaves this machine. The
# trigger forms are dialogs: scripts/screenshot_dialog.py clicks "Trigger" over the DevTools protocol first.
#   scripts/screenshots.sh [OUT]        (SCREENSHOTS_AIRFLOW=0: the MLflow, report, Data Docs and /docs pages only)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-screenshots}")
mkdir -p "$out"
export PATH=$PWD/.venv/bin:$PATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[[ -n $browser ]] || { echo "error: no Chromium (apt-get install chromium)" >&2; exit 2; }
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_for() { for _ in $(seq 1 "${3:-120}"); do curl -fs -o /dev/null "$1" && return 0; sleep 2; done
             echo "error: $2 did not answer at $1" >&2; exit 1; }
shot() {  # NAME URL [WAIT_MS]: one page, 1400x900, after its scripts ran for WAIT_MS of virtual time
  "$browser" --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,900 \
    --virtual-time-budget="${3:-8000}" --screenshot="$out/$1.png" "$2" >/dev/null 2>&1 || true
  [[ -s $out/$1.png ]] && echo "  $1.png  <- $2" || echo "  $1: no screenshot" >&2
}
read -r tracking models < <(python -c "
from flywheel.settings import load_settings
s = load_settings(); print(s.tracking_uri, s.models)")

mlflow_port=$(free_port) api_port=$(free_port) airflow_port=$(free_port)
setsid mlflow ui --backend-store-uri "$tracking" --host 127.0.0.1 --port "$mlflow_port" >"$out/mlflow.log" 2>&1 &
pids+=($!)
setsid flywheel serve --port "$api_port" >"$out/serve.log" 2>&1 &
pids+=($!)
with_airflow=${SCREENSHOTS_AIRFLOW:-1}
if [[ $with_airflow == 1 ]]; then
export AIRFLOW_HOME=${AIRFLOW_HOME:-$PWD/.airflow-screenshots} AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True
export AIRFLOW__API__PORT=$airflow_port AIRFLOW__API__BASE_URL=http://127.0.0.1:$airflow_port
export AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=$(free_port) AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=$(free_port)
setsid scripts/airflow.sh >"$out/airflow.log" 2>&1 &
pids+=($!)
fi
wait_for "http://127.0.0.1:$mlflow_port/health" "the MLflow UI"
wait_for "http://127.0.0.1:$api_port/healthz" "flywheel serve"
if [[ $with_airflow == 1 ]]; then
wait_for "http://127.0.0.1:$airflow_port/api/v2/version" "Airflow" 240

api=http://127.0.0.1:$airflow_port/api/v2
for _ in $(seq 1 120); do curl -fs "$api/dags/continuous_improvement" >/dev/null && break; sleep 2; done
curl -fs -X PATCH -H 'Content-Type: application/json' -d '{"is_paused": false}' "$api/dags/continuous_improvement" >/dev/null
run_id=$(curl -fs -X POST -H 'Content-Type: application/json' -d '{"logical_date": null, "conf": {"force": true}}' \
  "$api/dags/continuous_improvement/dagRuns" | python -c 'import json,sys; print(json.load(sys.stdin)["dag_run_id"])')
echo "==> Airflow run $run_id"
for _ in $(seq 1 300); do
  state=$(curl -fs "$api/dags/continuous_improvement/dagRuns/$run_id" | python -c 'import json,sys; print(json.load(sys.stdin)["state"])')
  [[ $state == success || $state == failed ]] && break; sleep 3
done
echo "    $state"
enc=$(python -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$run_id")
fi
read -r exp loop < <(python -c "
import mlflow
from flywheel.settings import load_settings
s = load_settings(); mlflow.set_tracking_uri(s.tracking_uri)
e = mlflow.get_experiment_by_name('flywheel')
r = mlflow.search_runs([e.experiment_id], filter_string=\"tags.\`flywheel.loop\` = 'true'\", order_by=['attributes.start_time DESC'], output_format='list')
r = [x for x in r if 'verdict_policy' in x.data.tags] or r  # the latest turn that released
print(e.experiment_id, r[0].info.run_id if r else '')")

# one conversation through the service, with feedback on its answer: its MLflow trace (serve.tracing) is a page too
python - "$api_port" <<'PY'
import json, subprocess, sys, urllib.request
port = sys.argv[1]
token = subprocess.run(["flywheel", "tokens", "create", "--scope", "admin", "--name", "screenshots"],
                       capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
def post(path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=300).read())
for _ in range(300):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5); break
    except Exception:
        __import__("time").sleep(1)
q = [{"role": "user", "content": "Give me one tip for sleeping well."}]
a = post("/v1/chat/completions", {"messages": q, "max_tokens": 48, "user": "screenshot-user"})
post("/v1/feedback", {"event_id": "screenshot-1", "timestamp": "2026-12-01T10:00:00Z", "conversation_id": "shot-1",
     "model_version": a["model_version"], "answer_id": a["id"], "prompt": q, "user_id": "screenshot-user",
     "response": a["choices"][0]["message"]["content"], "feedback": {"type": "rating", "value": 4}})
PY
sleep 15  # the service's trace writer (a separate process) writes the trace and its assessment
traces=$(python -c "
import mlflow
from flywheel.settings import load_settings
s = load_settings(); e = mlflow.MlflowClient(s.tracking_uri).get_experiment_by_name(s.params.serve.tracing.experiment)
print(e.experiment_id if e else '')")

echo "==> screenshots in $out"
a=http://127.0.0.1:$airflow_port m=http://127.0.0.1:$mlflow_port
if [[ $with_airflow == 1 ]]; then
shot airflow-dag "$a/dags/continuous_improvement" 12000
python scripts/screenshot_dialog.py "$a/dags/continuous_improvement" Trigger "$out/airflow-trigger-form.png" --browser "$browser"
python scripts/screenshot_dialog.py "$a/dags/rollback" Trigger "$out/airflow-trigger-rollback.png" --browser "$browser"
shot airflow-grid "$a/dags/continuous_improvement/runs/$enc" 12000
shot airflow-graph "$a/dags/continuous_improvement/runs/$enc?mode=graph" 12000
shot airflow-bless-log "$a/dags/continuous_improvement/runs/$enc/tasks/bless" 12000
shot airflow-release-log "$a/dags/continuous_improvement/runs/$enc/tasks/release" 12000
fi
ml="workflowType=machine_learning"  # the UI's mode switch (GenAI by default) as a URL parameter
shot mlflow-experiment "$m/#/experiments/$exp/runs?$ml" 12000
shot mlflow-loop-run "$m/#/experiments/$exp/runs/$loop?$ml" 12000
shot mlflow-registry "$m/#/models/flywheel-policy?$ml" 12000
shot mlflow-version "$m/#/models/flywheel-policy/versions/2?$ml" 12000
[[ -n $traces ]] && shot mlflow-traces "$m/#/experiments/$traces/traces" 12000
shot report "file://$PWD/reports/evaluate/report.html"
shot data-docs "file://$PWD/reports/validate/data_docs/index.html"
shot api-docs "http://127.0.0.1:$api_port/docs" 10000
