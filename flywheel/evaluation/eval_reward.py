"""``flywheel eval-reward``: pairwise accuracy of any reward model on any preference file."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from flywheel.contract import ContractError
from flywheel.data.events import IngestError, parse_line, read_lines


class EvalRewardError(RuntimeError):
    pass


def load_pairs(path: Path, fmt: str, max_text_chars: int, max_turns: int) -> tuple[list[dict], int]:
    """(pairs, skipped lines) from a preference file: native preference events or hh-rlhf rows."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    pairs, skipped = [], 0
    try:
        for _, raw in read_lines(path):
            try:
                e = parse_line(raw, fmt, now, max_text_chars, max_turns)
            except ContractError:
                skipped += 1
                continue
            if e.feedback.type != "preference":
                skipped += 1
                continue
            pairs.append(
                {"prompt": [m.model_dump() for m in e.prompt], "chosen": e.response, "rejected": e.feedback.rejected}
            )
    except IngestError as exc:
        raise EvalRewardError(str(exc)) from None
    return pairs, skipped


def resolve_model(settings, uri: str, kind: str = "reward") -> Path:
    """A local folder for a folder path or a ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` URI."""
    if uri.startswith("models:/"):
        import tempfile

        from flywheel import tracking
        from flywheel.models.logged import materialize

        tracking.configure_from(settings)
        try:
            return materialize(uri, Path(tempfile.mkdtemp(prefix=f"flywheel-eval-{kind}-")) / kind)
        except Exception as exc:  # MLflow raises several types for a missing model or alias
            raise EvalRewardError(f"cannot resolve {uri}: {exc}") from None
    folder = Path(uri)
    if not folder.is_dir():
        raise EvalRewardError(f"{uri}: no such model folder")
    return folder


def run(settings, uri: str, path: Path, fmt: str, contract) -> dict:
    from flywheel.evaluation.stats import mean_ci
    from flywheel.models.reward import RewardModel, pairwise_correct

    if fmt not in ("native", "hh-rlhf"):
        raise EvalRewardError(f"unknown format {fmt!r}; expected native or hh-rlhf")
    pairs, skipped = load_pairs(path, fmt, contract.max_text_chars, contract.max_turns)
    if not pairs:
        raise EvalRewardError(f"{path}: no preference pairs ({skipped} lines skipped)")
    folder = resolve_model(settings, uri)
    try:
        model = RewardModel.load(folder)
    except (OSError, KeyError, ValueError) as exc:
        raise EvalRewardError(f"{uri} is not a Flywheel reward model: {exc}") from None
    m = mean_ci(pairwise_correct(model, pairs))
    return {"pairwise_accuracy": m["value"], "ci95": m["ci"], "n": m["n"], "skipped": skipped}
