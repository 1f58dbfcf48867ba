"""``flywheel eval-policy``: how well any policy model prefers the chosen answers of any preference file, the
sibling of ``eval-reward``.

The score is the gate's primary policy metric, measured on a file instead of the test split: the held-out accuracy
of the implicit reward (log p(chosen) − log p_base(chosen) above the same for rejected), against a base model (the
workspace's ``models/base/policy`` unless ``--base`` names another), with its bootstrap interval over prompts. The
length heuristic ("pick the shorter answer") is scored on the same pairs. With a judge (a reward model), the greedy
answers of the model and of the base to the first human turns of the file are judged pairwise: the win rate.
"""

from __future__ import annotations

from pathlib import Path

from flywheel.evaluation.eval_reward import EvalRewardError, load_pairs, resolve_model


class EvalPolicyError(EvalRewardError):
    pass


def _load(folder: Path, base: Path, device: str, what: str):
    from flywheel.models.policy import UnsupportedModel, load_policy

    try:
        return load_policy(folder, device=device, base=base)
    except (UnsupportedModel, FileNotFoundError) as exc:
        raise EvalPolicyError(f"{what}: {exc}") from None
    except (OSError, KeyError, ValueError) as exc:
        raise EvalPolicyError(f"{what} {folder} is not a causal language model folder: {exc}") from None


def run(
    settings,
    uri: str,
    path: Path,
    fmt: str,
    base_uri: str | None = None,
    judge_uri: str | None = None,
    prompts: int = 0,
    log=lambda *_: None,
) -> dict:
    from flywheel.evaluation import stats
    from flywheel.evaluation.answers import redteam_prompts, timed_generate
    from flywheel.evaluation.policy_eval import implicit_margins
    from flywheel.evaluation.slices import cluster_keys, length_baseline
    from flywheel.models.policy import best_device

    params, contract = settings.params.evaluate, settings.params.contract
    if fmt not in ("native", "hh-rlhf"):
        raise EvalPolicyError(f"unknown format {fmt!r}; expected native or hh-rlhf")
    if prompts < 0:
        raise EvalPolicyError(f"--prompts must be 0 or more, not {prompts}")
    if prompts and not judge_uri:
        raise EvalPolicyError("--prompts needs --judge (the reward model that judges the answers)")
    pairs, skipped = load_pairs(path, fmt, contract.max_text_chars, contract.max_turns)
    if not pairs:
        raise EvalPolicyError(f"{path}: no preference pairs ({skipped} lines skipped)")
    base = resolve_model(settings, base_uri, "policy") if base_uri else Path(settings.models) / "base" / "policy"
    if not base.is_dir():
        raise EvalPolicyError(f"no base model at {base}: run `dvc repro base_models`, or pass --base")
    folder = resolve_model(settings, uri, "policy")
    judge = None
    if judge_uri:
        from flywheel.models.reward import RewardModel

        jfolder = resolve_model(settings, judge_uri, "reward")
        try:
            judge = RewardModel.load(jfolder)
        except (OSError, KeyError, ValueError) as exc:
            raise EvalPolicyError(f"--judge {judge_uri} is not a Flywheel reward model: {exc}") from None
    device = best_device()
    log(f"eval-policy: loading {uri} and the base {base}")
    reference, tok = _load(base, base, device, "the base")
    model, mtok = (reference, tok) if folder.resolve() == base.resolve() else _load(folder, base, device, uri)
    if mtok.get_vocab() != tok.get_vocab():
        raise EvalPolicyError(
            f"{uri} and the base {base} have different tokenizers: the implicit reward compares the two models' "
            "log-probabilities of the same tokens; pass the model's own base with --base"
        )
    log(f"eval-policy: implicit-reward accuracy on {len(pairs)} pairs")
    try:
        margins = implicit_margins(reference, {"model": model}, tok, pairs, params)["model"]
    except ValueError as exc:  # an architecture the trunk split refuses (policy.check_split)
        raise EvalPolicyError(f"{uri}: {exc}") from None
    keys = cluster_keys(pairs)
    acc = stats.mean_ci(stats.correct_from_margin(margins), params.confidence, params.bootstrap, params.seed, keys)
    shorter = length_baseline(pairs)
    out = {
        "pref_accuracy": acc["value"],
        "ci95": acc["ci"],
        "n": acc["n"],
        "prompts": acc.get("clusters"),
        "length_baseline": sum(shorter) / len(shorter),
        "vs_length_baseline": stats.paired_diff(
            stats.correct_from_margin(margins), shorter, params.confidence, params.bootstrap, params.seed, keys
        ),
        "base": str(base_uri or base),
        "skipped": skipped,
    }
    if judge is not None and prompts:
        asked = redteam_prompts(pairs, prompts)
        log(f"eval-policy: answering {len(asked)} prompts with the model and the base; {judge_uri} judges")
        mine, _ = timed_generate(model, tok, asked, params.max_new_tokens, params.gen_batch_size)
        theirs, _ = timed_generate(reference, tok, asked, params.max_new_tokens, params.gen_batch_size)
        a, b = judge.score(asked, mine), judge.score(asked, theirs)
        wins = [1.0 if x > y else (0.5 if x == y else 0.0) for x, y in zip(a, b)]
        w = stats.mean_ci(wins, params.confidence, params.bootstrap, params.seed)
        out["judged_win_rate"] = {"value": w["value"], "ci95": w["ci"], "n": w["n"], "judge": judge_uri}
    return out
