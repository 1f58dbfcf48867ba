"""A policy's answers to evaluation prompts: generated greedily (timed, and cached per model content hash so a
champion's known answers are read back), the red-team and held-out prompts they answer, and the checks on them
(behaviour cases, example answers from the shipped suites)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from flywheel.evaluation.refusal import is_refusal


def behaviour_pass(case: dict, answer: str) -> bool:
    """Every ``must_include`` item (alternatives separated by ``|``) present, no ``must_not_include`` one."""
    low = answer.lower()
    return all(any(alt.lower() in low for alt in s.split("|")) for s in case.get("must_include", [])) and not any(
        s.lower() in low for s in case.get("must_not_include", [])
    )


def timed_generate(
    model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int
) -> tuple[list[str], float]:
    """Answers and the wall time per generated answer token (ms)."""
    from flywheel.models.policy import generate  # torch: only where answers are generated

    t = time.perf_counter()
    answers = generate(model, tok, prompts, max_new_tokens, batch_size)
    n_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
    return answers, 1000 * (time.perf_counter() - t) / max(1, n_tokens)


class AnswerCache:
    """Greedy answers already generated, per model content hash, prompt and token budget.

    A champion was the challenger of an earlier run (or the base model of the last one), so its answers to
    the fixed suites are known: reading them back halves the generation of a loop turn. Greedy decoding
    makes an answer a function of (weights, prompt, budget); a file per model, appended to, never rewritten.
    """

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.entries: dict[str, dict[str, str]] = {}
        self.hits = 0

    def _file(self, model_key: str) -> Path:
        return self.folder / f"{model_key}.jsonl"

    def _load(self, model_key: str) -> dict[str, str]:
        if model_key not in self.entries:
            found: dict[str, str] = {}
            f = self._file(model_key) if self.folder else None
            if f is not None and f.exists():
                for line in f.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                        found[rec["k"]] = rec["a"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line of an interrupted run
            self.entries[model_key] = found
        return self.entries[model_key]

    @staticmethod
    def key(prompt: list[dict], max_new_tokens: int) -> str:
        return hashlib.sha256(json.dumps([prompt, max_new_tokens], sort_keys=True).encode()).hexdigest()

    def answers(
        self, model, model_key: str | None, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int
    ) -> tuple[list[str], float | None]:
        """Answers to every prompt (cached or generated) and ms per generated token (None: all cached)."""
        if not model_key:
            return timed_generate(model, tok, prompts, max_new_tokens, batch_size)
        known = self._load(model_key)
        keys = [self.key(p, max_new_tokens) for p in prompts]
        missing = [i for i, k in enumerate(keys) if k not in known]
        self.hits += len(prompts) - len(missing)
        ms = None
        if missing:
            new, ms = timed_generate(model, tok, [prompts[i] for i in missing], max_new_tokens, batch_size)
            lines = []
            for i, a in zip(missing, new):
                known[keys[i]] = a
                lines.append(json.dumps({"k": keys[i], "a": a}) + "\n")
            if self.folder is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                with open(self._file(model_key), "a") as f:
                    f.writelines(lines)
        return [known[k] for k in keys], ms


def redteam_prompts(pairs: list[dict], n: int) -> list[list[dict]]:
    """The first human turn of each test conversation (distinct), as single-turn prompts."""
    seen, out = set(), []
    for p in pairs:
        first = next((m["content"] for m in p["prompt"] if m["role"] == "user"), None)
        if first and first not in seen:
            seen.add(first)
            out.append([{"role": "user", "content": first}])
        if len(out) >= n:
            break
    return out


def suite_samples(
    prompts: list[list[dict]], challenger: list[str], champion: list[str], suite: str, n: int = 5
) -> list[dict]:
    """Example answers for metrics and the report, tagged with the shipped ``suite`` their prompts come from
    (never the test split: its prompts are users' text)."""
    return [
        {
            "suite": suite,
            "prompt": p[-1]["content"],
            "challenger": a,
            "champion": b,
            "challenger_refused": is_refusal(a),
            "champion_refused": is_refusal(b),
        }
        for p, a, b in list(zip(prompts, challenger, champion))[:n]
    ]
