"""The policy's evaluation, challenger against champion on the same items: held-out preference accuracy of the
implicit reward (the primary metric), judged answers to held-out and red-team prompts, benign refusals, the
behaviour suite, slices beside the length baseline, latency."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from flywheel.evaluation import stats
from flywheel.evaluation.answers import AnswerCache, behaviour_pass, redteam_prompts, suite_samples
from flywheel.evaluation.refusal import is_refusal
from flywheel.evaluation.slices import (
    cluster_keys,
    golden_metric,
    heldout_metric,
    mark_not_measured,
    mean_length_baseline,
    slice_metrics,
)
from flywheel.models import device
from flywheel.models.packing import assemble, make_batch
from flywheel.models.policy import (
    cast_frozen,
    check_split,
    decoder_layers,
    device_of,
    encode,
    top_logps,
    trunk_fingerprint,
)
from flywheel.models.scores import ScoreCache, seq_key, trunk_key, trunk_rows

if TYPE_CHECKING:
    from flywheel.params import EvaluateParams


@torch.no_grad()
def log_ratios(
    reference,
    models: dict,
    tok,
    records: list[dict],
    params: EvaluateParams,
    fields=("chosen", "rejected"),
    progress: Callable[[int, int], None] | None = None,
    cache: ScoreCache | None = None,
    keys: dict[str, str | None] | None = None,
) -> dict[str, list[list[float]]]:
    """Per model, per record, per answer field: log p(answer) − log p_ref(answer), the implicit reward;
    ``progress(done, total)`` after each batch (minutes for a few hundred records on a CPU).

    Models whose frozen trunk equals the reference's reuse its trunk output: one trunk pass per sequence.
    ``cache`` (flywheel/models/scores.py) + ``keys`` (content hashes by model name, ``reference`` included):
    log-probabilities and trunk outputs computed by earlier evaluations are read back, new ones stored; a sequence
    met twice (a pair's half is an unpaired example too) is scored once. Without keys, scores live in memory only.
    """
    # the ratios do not depend on the split (only the time does): one below the model's depth at most
    k = min(params.frozen_layers, len(decoder_layers(reference)[1]) - 1)
    check_split(reference, tok, k)  # an architecture the split does not reproduce is refused, never scored wrongly
    enc = encode(tok, records, params.max_prompt_tokens, params.max_answer_tokens, fields=fields)
    bf16 = params.bf16 and device.bf16_fast(device_of(reference))  # emulated bf16 (no AVX512-BF16/AMX) is slow
    if bf16:  # a bf16-trunk copy; the caller's models are left as they are
        import copy

        original, reference = reference, copy.deepcopy(reference)
        cast_frozen(reference, k)  # the weights are bf16-exact: the fingerprints below do not change
        models = {name: (reference if m is original else m) for name, m in models.items()}
    cache = cache or ScoreCache(None)
    roles = {"reference": reference, **models}
    trunks = _trunk_sources(reference, roles, k)
    # bf16: the models' own top layers run under a bf16 autocast too (the output head stays fp32): their scores are
    # other numbers than fp32 ones (~0.1 nats per answer), so they are kept under keys of their own
    top = "-top-bf16" if bf16 else ""
    score_key = {name: _score_key(name, m, keys or {}, trunks[name][1] + top) for name, m in roles.items()}
    scorers = {score_key[name]: name for name in reversed(roles)}  # one per score key (a champion = the base)
    seqs = [(e.prompt, e.answers[w]) for e in enc for w in range(len(fields))]
    skeys = [seq_key(p, a) for p, a in seqs]
    by_key = dict(zip(skeys, seqs))
    known = {key: cache.scores(key, skeys) for key in scorers}
    cache.hits["scores"] += sum(len(v) for v in known.values())
    todo = [s for s in by_key if any(s not in v for v in known.values())]
    row_len: dict[tuple, int] = {}  # a prompt's packed row: the prompt once, then its answers
    for s in todo:
        p, a = by_key[s]
        row_len[tuple(p)] = row_len.get(tuple(p), len(p)) + len(a)
    todo.sort(key=lambda s: (row_len[tuple(by_key[s][0])], by_key[s][0]))  # a prompt's answers together, short first
    step = params.batch_size * len(fields)
    for i in range(0, len(todo), step):
        chunk, hidden = todo[i : i + step], {}
        for key, name in scorers.items():
            need = [s for s in chunk if s not in known[key]]
            if need:
                src, tkey = trunks[name]
                memo = hidden.setdefault(tkey, {})
                rows = trunk_rows(cache, memo, src, tkey, k, [(s, by_key[s]) for s in need], tok.pad_token_id)
                batch = make_batch(roles[name], k, [by_key[s] for s in need], tok.pad_token_id)
                h = assemble(rows, batch)
                with device.bf16_autocast(h.device.type, bf16):
                    scored = dict(zip(need, top_logps(roles[name], h, batch, k).float().tolist()))
                known[key].update(scored)
                cache.put_scores(key, scored)
        if progress is not None:
            progress(min(len(enc), (i + len(chunk)) * len(enc) // max(1, len(todo))), len(enc))
    width, ref = len(fields), known[score_key["reference"]]
    out: dict[str, list[list[float]]] = {}
    for name in models:
        mine = known[score_key[name]]
        out[name] = [
            [mine[skeys[j * width + w]] - ref[skeys[j * width + w]] for w in range(width)] for j in range(len(enc))
        ]
    return out


def _trunk_sources(reference, roles: dict, k: int) -> dict[str, tuple]:
    """Per model: (the model whose trunk pass serves it, that trunk's key). A model whose frozen trunk equals the
    reference's is served by the reference's pass (in bf16 when the reference's trunk was cast)."""
    ref_fp = trunk_fingerprint(reference, k)
    ref_key = trunk_key(reference, k)
    out = {}
    for name, m in roles.items():
        shared = m is reference or trunk_fingerprint(m, k) == ref_fp
        out[name] = (reference, ref_key) if shared else (m, trunk_key(m, k))
    return out


def _score_key(name: str, model, keys: dict, trunk_key: str) -> str:
    """Scores of one model on one trunk: persistent when the model's and the reference's content hashes are known
    (an adapter's scores depend on its base), else for this process only."""
    if keys.get(name) and keys.get("reference"):
        return f"{keys[name][:24]}-{keys['reference'][:24]}-{trunk_key}"
    return f"mem:{id(model)}-{trunk_key}"


def implicit_margins(
    reference, models: dict, tok, pairs: list[dict], params: EvaluateParams, progress=None, cache=None, keys=None
) -> dict[str, list[float]]:
    """Per model, per pair: (log p(chosen) − log p_ref(chosen)) − (log p(rejected) − log p_ref(rejected))."""
    ratios = log_ratios(reference, models, tok, pairs, params, progress=progress, cache=cache, keys=keys)
    return {name: [c - r for c, r in rows] for name, rows in ratios.items()}


def golden_correct(
    reference,
    champion,
    challenger,
    tok,
    pairs: list[dict],
    params: EvaluateParams,
    progress=None,
    cache=None,
    keys=None,
) -> dict:
    """Per model, per golden pair: 1 when the implicit reward prefers the chosen answer (0.5 on a tie)."""
    models = {"champion": champion, "challenger": challenger}
    margins = implicit_margins(reference, models, tok, pairs, params, progress, cache, keys)
    return {k: stats.correct_from_margin(v) for k, v in margins.items()}


def unpaired_scores(ratios: list[float], desirable: list[bool]) -> list[float]:
    """Per desirable example: the share of undesirable examples whose implicit reward it beats (a tie counts a half).
    Their mean is the probability that a desirable answer scores above an undesirable one (the AUC)."""
    bad = sorted(r for r, good in zip(ratios, desirable) if not good)
    if not bad:
        return []
    import bisect

    out = []
    for r, good in zip(ratios, desirable):
        if good:
            below, upto = bisect.bisect_left(bad, r), bisect.bisect_right(bad, r)
            out.append((below + 0.5 * (upto - below)) / len(bad))
    return out


def unpaired_accuracy(
    reference,
    champion,
    challenger,
    tok,
    examples: list[dict],
    params: EvaluateParams,
    progress=None,
    cache=None,
    keys=None,
) -> dict:
    """Held-out accuracy of the implicit reward on unpaired (KTO) examples: how often a desirable answer scores above
    an undesirable one, challenger against champion on the same examples (paired bootstrap over the desirable
    ones)."""
    flags = [bool(e["desirable"]) for e in examples]
    models = {"champion": champion, "challenger": challenger}
    ratios = log_ratios(reference, models, tok, examples, params, ("answer",), progress, cache, keys)
    scores = {name: unpaired_scores([r[0] for r in rows], flags) for name, rows in ratios.items()}
    keys = [e["conversation_id"] for e, good in zip(examples, flags) if good] if scores["challenger"] else None
    out = stats.paired_diff(
        scores["challenger"], scores["champion"], params.confidence, params.bootstrap, params.seed, keys
    )
    out["desirable"], out["undesirable"] = sum(flags), len(flags) - sum(flags)
    return out


def evaluate_policy(
    reference,
    champion,
    challenger,
    tok,
    judge,
    pairs: list[dict],
    benign: list[str],
    behaviour: list[dict],
    params: EvaluateParams,
    log=lambda *_: None,
    cache: AnswerCache | None = None,
    keys: dict[str, str] | None = None,
    unpaired: list[dict] | None = None,
    golden: list[dict] | None = None,
    scores: ScoreCache | None = None,
    score_keys: dict[str, str] | None = None,
) -> dict:
    """Every policy metric for challenger and champion on the same items (``unpaired``: the held-out KTO examples;
    ``golden``: the golden set's pairs, scored beside the test split).

    ``cache`` + ``keys`` (model content hashes by role, ``reference`` included): greedy answers known from earlier
    runs are reused; ``scores`` + ``score_keys`` (weights hashes by role, ``reference`` included): so are
    log-probabilities and trunk outputs (flywheel/models/scores.py).
    """
    cache = cache or AnswerCache(None)
    keys = keys or {}
    scores = scores or ScoreCache(None)  # in memory at least: a pair's halves are unpaired examples too
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[name] = round(seconds.get(name, 0.0) + now - t, 2)
        t = now

    def progress(what: str):
        began, shown = time.perf_counter(), [0]

        def report(done: int, total: int) -> None:  # about every quarter: the margins are most of the stage
            if done * 4 // max(1, total) > shown[0] and done < total:
                shown[0] = done * 4 // max(1, total)
                log(f"evaluate:   {done}/{total} {what} ({time.perf_counter() - began:.0f} s)")

        return report

    log(f"evaluate: implicit-reward accuracy on {len(pairs)} test pairs")
    both_models = {"champion": champion, "challenger": challenger}
    margins = implicit_margins(reference, both_models, tok, pairs, params, progress("test pairs"), scores, score_keys)
    correct = {k: stats.correct_from_margin(v) for k, v in margins.items()}
    out: dict = {
        "pref_accuracy": stats.paired_diff(
            correct["challenger"],
            correct["champion"],
            params.confidence,
            params.bootstrap,
            params.seed,
            cluster_keys(pairs),
        )
    }
    if unpaired:
        log(f"evaluate: implicit-reward accuracy on {len(unpaired)} unpaired test examples")
        out["unpaired_accuracy"] = unpaired_accuracy(
            reference, champion, challenger, tok, unpaired, params, progress("unpaired examples"), scores, score_keys
        )
    if golden is not None:
        log(f"evaluate: implicit-reward accuracy on the golden set ({len(golden)} pairs)")
        g = golden_correct(
            reference, champion, challenger, tok, golden, params, progress("golden pairs"), scores, score_keys
        )
        out["golden_pref_accuracy"] = golden_metric(g["challenger"], g["champion"], golden, params)
        out["heldout_pref_accuracy"] = heldout_metric(correct, g, pairs, golden, params)
    out["length_baseline"] = mean_length_baseline(pairs)
    out["slices"] = slice_metrics(correct, pairs, params)
    yes, no = out["slices"].get("chosen_shorter=yes"), out["slices"].get("chosen_shorter=no")
    out["gain_only_where_shorter_wins"] = bool(
        yes and no and yes["ci"][0] is not None and yes["ci"][0] > 0 and (no["diff"] or 0) <= 0
    )
    lap("implicit_margins")
    log(
        f"evaluate: {scores.computed['scores']} answer log-probabilities computed, {scores.hits['scores']} reused; "
        f"{scores.computed['trunks']} trunk passes, {scores.hits['trunks']} read back"
    )
    if params.bf16 and device.bf16_fast(device_of(champion)):  # generation: whole-model bf16 copies (answers are
        # cached per dtype); not where bf16 is emulated (many times slower than fp32)
        import copy

        challenger, champion = (
            copy.deepcopy(challenger).to(torch.bfloat16),
            copy.deepcopy(champion).to(torch.bfloat16),
        )
        keys = {role: f"{key}-bf16" for role, key in keys.items() if key}

    def both(prompts, max_new):
        a_ch, ms_ch = cache.answers(challenger, keys.get("challenger"), tok, prompts, max_new, params.gen_batch_size)
        a_cp, ms_cp = cache.answers(champion, keys.get("champion"), tok, prompts, max_new, params.gen_batch_size)
        lap("generation")
        return a_ch, a_cp, ms_ch, ms_cp

    judged = redteam_prompts(list(reversed(pairs)), params.judged_prompts)
    red = redteam_prompts(pairs, params.redteam_prompts)
    prompts = judged + red
    log(f"evaluate: answering {len(judged)} held-out and {len(red)} red-team prompts with both policies")
    a_ch, a_cp, ms_ch, ms_cp = both(prompts, params.max_new_tokens)
    s_ch = judge.score(prompts, a_ch)
    s_cp = judge.score(prompts, a_cp)
    lap("judge")
    wins = [1.0 if a > b else (0.5 if a == b else 0.0) for a, b in zip(s_ch, s_cp)]
    nj = len(judged)
    out["judged_win_rate"] = stats.mean_ci(wins[:nj], params.confidence, params.bootstrap, params.seed)
    out["harmless_win_rate"] = stats.mean_ci(wins[nj:], params.confidence, params.bootstrap, params.seed)
    out["harmlessness_score"] = stats.paired_diff(
        s_ch[nj:], s_cp[nj:], params.confidence, params.bootstrap, params.seed
    )
    benign_prompts = [[{"role": "user", "content": b}] for b in benign[: params.benign_prompts]]
    log(f"evaluate: {len(benign_prompts)} benign instructions (refusals)")
    b_ch, b_cp, _, _ = both(benign_prompts, min(24, params.max_new_tokens))
    out["benign_refusal_rate"] = stats.paired_diff(
        [float(is_refusal(a)) for a in b_ch],
        [float(is_refusal(a)) for a in b_cp],
        params.confidence,
        params.bootstrap,
        params.seed,
    )
    # one batched generation per model, at the longest case's budget; each answer is then cut to its own
    limit = min(params.max_new_tokens, max((c.get("max_tokens", params.max_new_tokens) for c in behaviour), default=1))
    cases = [[{"role": "user", "content": c["prompt"]}] for c in behaviour]
    log(f"evaluate: behaviour suite, {len(cases)} cases")
    x_all, y_all, _, _ = both(cases, limit)
    passes = {"challenger": [], "champion": []}
    examples = []
    for case, x, y in zip(behaviour, x_all, y_all):
        n = case.get("max_tokens", params.max_new_tokens)
        x = tok.decode(tok(x, add_special_tokens=False)["input_ids"][:n])
        y = tok.decode(tok(y, add_special_tokens=False)["input_ids"][:n])
        passes["challenger"].append(float(behaviour_pass(case, x)))
        passes["champion"].append(float(behaviour_pass(case, y)))
        examples.append({"prompt": case["prompt"], "challenger": x, "champion": y})
    out["behaviour_pass_rate"] = stats.paired_diff(
        passes["challenger"], passes["champion"], params.confidence, params.bootstrap, params.seed
    )
    lap("behaviour")
    mark_not_measured(out, "no items to score (an empty test split or suite)")
    out["latency_ms_per_token"] = {"challenger": ms_ch, "champion": ms_cp}  # None: every answer was cached
    out["cached_answers"] = cache.hits
    out["seconds"] = seconds
    # example answers only from a shipped suite: a held-out prompt is some user's text, and metrics and
    # reports (copied to MLflow, cached by DVC) are no place for it; held-out items appear by index and score
    out["samples"] = suite_samples(benign_prompts, b_ch, b_cp, "eval/benign.yaml")
    out["judged_items"] = [
        {
            "set": "held-out" if i < nj else "red-team",
            "item": i if i < nj else i - nj,
            "judge_challenger": x,
            "judge_champion": y,
        }
        for i, (x, y) in enumerate(zip(s_ch, s_cp))
    ][:8]
    out["behaviour_examples"] = examples[:5]
    return out
