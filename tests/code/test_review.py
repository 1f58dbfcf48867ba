"""Human review (flywheel/data/review.py): a Label Studio export read back task by task (each refusal named),
reviews applied before prepare compiles anything, kept with the raw store and erased with a user's events."""

from __future__ import annotations

import json

import pytest

from flywheel.data import review
from flywheel.data.erase import erase_user, forms
from flywheel.data.ingest import ingest
from pipelines.prepare import compile_sets, prepare
from tests.shipped import shipped

KNOWN = {"e-corr": "correction", "e-rate": "rating", "e-thumb": "thumbs"}


def _task(event_id, verdict=None, revised=None, who="ann@example.com", cancelled=False, **data):
    result = []
    if verdict is not None:
        result.append(
            {"from_name": "verdict", "to_name": "feedback", "type": "choices", "value": {"choices": [verdict]}}
        )
    if revised is not None:
        result.append({"from_name": "revised", "to_name": "feedback", "type": "textarea", "value": {"text": [revised]}})
    annotation = {
        "completed_by": {"id": 3, "email": who} if who else None,
        "result": result,
        "was_cancelled": cancelled,
    }
    annotation["created_at"] = "2026-11-30T10:00:00Z"
    return {
        "id": 1,
        "data": {"event_id": event_id, **data},
        "annotations": [annotation] if verdict or cancelled else [],
    }


def _parse(tasks, max_chars=1000):
    return review.parse_export(json.dumps(tasks).encode(), KNOWN, max_chars)


def test_an_export_becomes_reviews_with_the_reviewer_pseudonymised():
    got = _parse(
        [
            _task("e-corr", "approve", revised="Water it weekly; mail me at bob@example.com"),
            _task("e-rate", "reject"),
            _task("e-thumb"),  # exported by hand, never annotated: not a review
        ]
    )
    assert got.refused == [] and got.unreviewed == 1
    by_id = {r["event_id"]: r for r in got.reviews}
    assert by_id["e-corr"]["verdict"] == "approve" and by_id["e-rate"]["verdict"] == "reject"
    assert by_id["e-corr"]["revised"] == "Water it weekly; mail me at [EMAIL]"  # redacted as ingest redacts
    assert by_id["e-corr"]["reviewer"] != "ann@example.com" and by_id["e-corr"]["reviewer"] in forms("ann@example.com")


@pytest.mark.parametrize(
    "task, why",
    [
        (_task("e-gone", "approve"), "no stored event with this event_id"),
        (_task("e-corr", "maybe"), "the verdict must be one of approve, reject"),
        (_task("e-corr", "approve", who=None), "no reviewer"),
        (_task("e-rate", "approve", revised="better"), "a revised text is only for corrections, this is a rating"),
        (_task("e-corr", "approve", revised="x" * 1001), "the revised text is 1001 characters, over 1000"),
        ({"data": "nope"}, "not a task object with 'data'"),
    ],
)
def test_a_task_that_cannot_be_taken_is_refused_with_why(task, why):
    got = _parse([task, _task("e-thumb", "approve")])
    (refused,) = got.refused
    assert refused.startswith("task 1") and why in refused, refused
    assert [r["event_id"] for r in got.reviews] == ["e-thumb"]  # the others are still taken


def test_a_cancelled_annotation_is_no_review_and_a_file_that_is_no_export_is_refused():
    assert _parse([_task("e-corr", cancelled=True)]).unreviewed == 1
    with pytest.raises(review.ReviewError, match="not a Label Studio JSON export"):
        review.parse_export(b"{not json", KNOWN, 100)
    with pytest.raises(review.ReviewError, match="expected a list of tasks"):
        review.parse_export(b'{"tasks": []}', KNOWN, 100)


def _events():
    prompt = [{"role": "user", "content": "How often should I water a fern?"}]
    base = {"prompt": prompt, "conversation_id": "c1", "user_id": "u1", "n_turns": 1, "ingested_at": "t"}
    return [
        {**base, "event_id": "e-corr", "feedback_type": "correction", "response": "Never.", "correction": "Weekly."},
        {**base, "event_id": "e-corr2", "feedback_type": "correction", "response": "Daily.", "correction": "Hourly!"},
        {**base, "event_id": "e-rate", "feedback_type": "rating", "response": "Weekly.", "rating": 5},
    ]


def test_reviews_decide_what_reaches_the_training_sets():
    params = shipped("prepare")
    reviews = {
        "e-corr": {"event_id": "e-corr", "verdict": "approve", "revised": "Once a week, when the soil is dry."},
        "e-rate": {"event_id": "e-rate", "verdict": "reject", "revised": None},
    }
    applied = review.apply(_events(), reviews, require_for_sft=False)
    sft = [r["completion"] for r in compile_sets(applied.events, params)["sft"]]
    assert sorted(sft) == ["Hourly!", "Once a week, when the soil is dry."]  # rejected rating gone, revision used
    assert (applied.rejected, applied.revised, applied.unreviewed_held_out) == (1, 1, 0)
    held = review.apply(_events(), reviews, require_for_sft=True)  # the unreviewed correction waits
    assert [r["completion"] for r in compile_sets(held.events, params)["sft"]] == ["Once a week, when the soil is dry."]
    strict = prepare(_events(), params.updated(sft_requires_review=True), reviews=reviews)
    assert strict.metrics["unreviewed_corrections_held_out"] == 1 and strict.metrics["review_rejected"] == 1


def test_reviews_live_in_the_raw_store_and_leave_with_the_user(tmp_path, make_event):
    raw, quarantine = tmp_path / "raw", tmp_path / "quarantine"
    corr = make_event(user_id="jane@example.com", feedback={"type": "correction", "text": "Weekly, in the morning."})
    other = make_event(user_id="bob", feedback={"type": "rating", "value": 1})
    batch = tmp_path / "b.jsonl"
    batch.write_text("".join(json.dumps(e) + "\n" for e in [corr, other]))
    ingest([batch], "native", raw, quarantine, shipped("ingest"), shipped("contract"))
    wanted = review.candidates(raw, max_rating=2, limit=10)
    assert {e["event_id"] for e in wanted} == {corr["event_id"], other["event_id"]}
    tasks = review.tasks(wanted)
    assert {t["data"]["feedback"] for t in tasks} == {"correction: Weekly, in the morning.", "rating: 1 of 5"}
    known = {e["event_id"]: e["feedback_type"] for e in wanted}
    export = [_task(corr["event_id"], "approve"), _task(other["event_id"], "reject", who="jane@example.com")]
    assert review.store(raw, review.parse_export(json.dumps(export).encode(), known, 1000).reviews) == 2
    assert set(review.load(raw)) == set(known) and review.candidates(raw, 2, 10) == []  # reviewed: not again
    done = erase_user("jane@example.com", raw, tmp_path / "prepared", quarantine)
    left = review.load(raw)
    assert done.raw_events == 1 and done.reviews == 2  # her event's review gone; her review of bob's anonymised
    assert list(left) == [other["event_id"]] and left[other["event_id"]]["reviewer"] == "[erased]"
    assert "jane" not in review.path(raw).read_text()
