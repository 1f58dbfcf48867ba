"""The ``evaluate`` stage: the challenger against the champion, on the same frozen test split.

- reward model: pairwise accuracy (paired with the champion's, bootstrap interval);
- policy, primary: held-out preference accuracy of the implicit reward (log-probability margin of
  chosen over rejected relative to the base reference), paired with the champion's;
- policy, judged: greedy answers to held-out prompts scored pairwise by the judge (the champion
  reward model at the start of the run), win rate with an interval;
- safety: judged harmlessness on red-team prompts (first human turns of the test split) and the
  refusal rate on shipped benign instructions;
- a behaviour suite of {prompt, must_include, must_not_include, max_tokens} cases;
- slices (feedback type, single/multi-turn, chosen-is-shorter) beside the length-only baseline;
  latency and size;
- the golden set (params.yaml ``golden``, never trained on): both models' accuracies on the same fixed pairs
  every turn, so turns compare; the gate refuses a regression beyond noise there.

This file loads the models and sets and writes the results; the measuring is the core's (flywheel/evaluation:
policy_eval, reward_eval, judge, answers, slices, refusal, stats, report).
"""

from __future__ import annotations

import json
from pathlib import Path

from flywheel.data.golden import GoldenError, load_golden
from flywheel.evaluation.answers import AnswerCache
from flywheel.evaluation.judge import judge_status, mark_unjudged
from flywheel.evaluation.policy_eval import evaluate_policy
from flywheel.evaluation.report import headline_metrics
from flywheel.evaluation.reward_eval import evaluate_reward
from flywheel.models.scores import SCORE_CACHE, CachedRewards, ScoreCache, answers_hash, weights_hash
from flywheel.params import EvaluateParams, GoldenParams, ScoreCacheParams
from flywheel.settings import Settings
from flywheel.stages import StageFailed
from pipelines.resolve_champion import load

# What this step's functions import, imported ahead by a DAG task's warm runner while DVC starts
# (flywheel/orchestration.py stage_runner): a module missing here is imported by the stage itself.
PRELOAD = (
    "mlflow",
    "models",
    "transformers.models.llama.modeling_llama",
    "transformers.models.bert.modeling_bert",
    "matplotlib.pyplot",
)


def folder_mb(path: Path) -> float:
    """The size of a model folder in MiB."""
    return round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20, 1)


def main(
    settings,
    params: EvaluateParams,
    champion_info: dict,
    base: Path,
    challenger: Path,
    prepared: Path,
    suites: Path,
    out_dir: Path,
    metrics_file: Path,
    golden_params: GoldenParams | None = None,
    cache_params: ScoreCacheParams | None = None,
) -> dict:
    """Stage edge: load the models and test sets, evaluate, write metrics and the report, log to MLflow.
    ``golden_params``: the golden set (default: the workspace's params.yaml ``golden``)."""

    import mlflow
    import torch
    import yaml

    from flywheel import tracking
    from flywheel.evaluation import report
    from flywheel.models.policy import best_device, load_policy
    from flywheel.models.reward import RewardModel
    from flywheel.registry import content_hash
    from pipelines.prepare import read_set

    torch.manual_seed(params.seed)
    c, golden_params = settings.params.contract, golden_params or settings.params.golden
    try:
        golden = load_golden(settings.root / golden_params.path, golden_params.format, c.max_text_chars, c.max_turns)
        golden_pairs = golden.pairs[: params.golden_pairs or None]
    except GoldenError as exc:
        raise StageFailed(str(exc)) from exc
    pairs = read_set(prepared, "pairs", "test")
    unpaired = read_set(prepared, "kto", "test") if (prepared / "kto-test.jsonl").is_file() else []
    reward_pairs = read_set(prepared, "reward_pairs", "test")
    benign = yaml.safe_load((suites / "benign.yaml").read_text())["instructions"]
    behaviour = yaml.safe_load((suites / "behaviour.yaml").read_text())["cases"]
    device = best_device()
    champ_path = Path(champion_info["policy"]["path"])
    # the caches' keys: not the content hash (the registry's copy of a version re-saves its tokenizer config)
    folders = {"challenger": challenger / "policy", "champion": champ_path, "reference": base / "policy"}
    weights = {role: weights_hash(folder) for role, folder in folders.items()}
    keys = {role: answers_hash(folders[role], weights[role]) for role in ("challenger", "champion")}
    reference, tok = load_policy(base / "policy", device=device)
    champion = (
        reference
        if weights["champion"] == weights["reference"]  # the base (or its registered copy) is the champion
        else load_policy(champ_path, device=device, base=base / "policy")[0]
    )
    challenger_policy, _ = load_policy(challenger / "policy", device=device, base=base / "policy")
    cache = AnswerCache(settings.models / "answer-cache")
    max_gb = (cache_params or settings.params.score_cache).max_gb
    scores = ScoreCache(settings.models / SCORE_CACHE, int(max_gb * 2**30))
    judge_path = Path(champion_info["reward"]["path"])
    judge = CachedRewards(RewardModel.load(judge_path), answers_hash(judge_path), scores)
    challenger_reward = CachedRewards(
        RewardModel.load(challenger / "reward"), answers_hash(challenger / "reward"), scores
    )
    with tracking.stage_run(settings, "evaluate", tags={"flywheel.samples": "suites"}) as run:
        policy = evaluate_policy(
            reference,
            champion,
            challenger_policy,
            tok,
            judge,
            pairs,
            benign,
            behaviour,
            params,
            log=lambda m: print(m, flush=True),
            cache=cache,
            keys=keys,
            unpaired=unpaired,
            golden=golden_pairs,
            scores=scores,
            score_keys=weights,
        )
        print(f"evaluate: {cache.hits} answers read from the answer cache; seconds: {policy['seconds']}", flush=True)
        print(f"evaluate: reward models on {len(reward_pairs)} test pairs and {len(golden_pairs)} golden", flush=True)
        reward = evaluate_reward(judge, challenger_reward, reward_pairs, params, golden_pairs)
        scores.close()
        judged_by = judge_status(reward["champion_accuracy"])
        mark_unjudged(policy, judged_by)
        print(f"evaluate: judge {judged_by['status']}: {judged_by['reason']}", flush=True)
        metrics = {
            "policy": policy,
            "reward": reward,
            "judge": {
                "name": champion_info["reward"]["name"],
                "version": champion_info["reward"]["version"],
                "content_hash": content_hash(Path(champion_info["reward"]["path"])),
                **judged_by,
            },
            "profile": settings.profile,
            "champion": {k: v["version"] for k, v in champion_info.items()},
            "candidates": {
                "policy": content_hash(challenger / "policy"),
                "reward": content_hash(challenger / "reward"),
            },
            "size_mb": {"policy": folder_mb(challenger / "policy"), "reward": folder_mb(challenger / "reward")},
            "mlflow_run_id": run.info.run_id,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        files = report.write(metrics, out_dir)
        for f in files:
            mlflow.log_artifact(str(f))
        mlflow.log_metrics(headline_metrics(metrics))
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2))
    return metrics


def stage(
    settings: Settings,
    params: EvaluateParams,
    golden: GoldenParams,
    score_cache: ScoreCacheParams,
    *,
    champion: Path,
    base: Path,
    challenger: Path,
    prepared: Path,
    suites: Path,
    out: Path,
    metrics: Path,
    summary: Path,
) -> str:
    """Evaluate the challengers in ``challenger`` against the champions named in ``champion`` (champion.json):
    everything to ``metrics`` (JSON), the headline figures to ``summary`` (what `dvc metrics show` prints)."""
    m = main(
        settings,
        params,
        load(champion, settings),
        base,
        challenger,
        prepared,
        suites,
        out,
        metrics,
        golden,
        score_cache,
    )
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps({k: round(v, 4) for k, v in headline_metrics(m).items()}, indent=2))
    pa, ra = m["policy"]["pref_accuracy"], m["reward"]["pairwise_accuracy"]
    return (
        f"evaluate: policy accuracy {_num(pa['champion'])} -> {_num(pa['challenger'])}, "
        f"reward accuracy {_num(ra['champion'])} -> {_num(ra['challenger'])}"
    )


def _num(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.3f}"
