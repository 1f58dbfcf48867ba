"""pipelines.prepare: de-duplication, the three training sets and the stable split."""

from __future__ import annotations

import itertools
import json
import random
import string
from collections import defaultdict

import pytest
from shipped import shipped

from flywheel.data import rawstore
from pipelines.prepare import SETS, SPLITS, compile_sets, deduplicate, load_events, main, prepare, read_set, split_of

_n = itertools.count(1)

LONG_ANSWER = (
    "Water them deeply the day you leave, group them together away from direct sun, and use a "
    "self-watering spike or a wick from a jar of water. A clear plastic bag over small pots keeps "
    "humidity in, and moving them to a cooler room slows how fast the soil dries out."
)


def ev(
    prompt: str = "How do I keep my plants alive?",
    response: str = LONG_ANSWER,
    fb: str = "thumbs",
    value=None,
    conv: str | None = None,
    user: str | None = "u1",
    turns: list[dict] | None = None,
) -> dict:
    """An event as ``load_events`` returns it."""
    n = next(_n)
    e = {
        "event_id": f"e{n:05d}",
        "ingested_at": "2026-11-27T10:00:00Z",
        "conversation_id": conv or f"c{n:05d}",
        "user_id": user,
        "prompt": turns or [{"role": "user", "content": prompt}],
        "response": response,
        "feedback_type": fb,
        "thumbs": None,
        "rating": None,
        "rejected": None,
        "correction": None,
    }
    e["n_turns"] = len(e["prompt"])
    if fb == "thumbs":
        e["thumbs"] = value or "up"
    elif fb == "rating":
        e["rating"] = value if value is not None else 5
    elif fb == "preference":
        e["rejected"] = value or "Just leave them."
    elif fb == "correction":
        e["correction"] = value or "A better answer."
    return e


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) for _ in range(n))


P = shipped("prepare")


# --- de-duplication ------------------------------------------------------------------------------------------------


def test_exact_duplicates_are_removed_keeping_the_first():
    a = ev(user="first")
    same = ev(response="  " + LONG_ANSWER.upper() + " ", user="second")  # same after case/space normalisation
    other = ev(response="Ask a neighbour to water them.", value="down")
    kept, report = deduplicate([a, same, other], P)
    assert (report.exact, report.near) == (1, 0)
    assert [e["event_id"] for e in kept] == [a["event_id"], other["event_id"]]


def test_conflicting_label_on_the_same_answer_keeps_the_first():
    up, down = ev(), ev(value="down")
    kept, report = deduplicate([up, down], P)
    assert (report.exact, report.near, kept) == (0, 1, [up])


def test_near_duplicate_edited_copy_is_removed():
    a = ev(fb="rating", value=5)
    edited = ev(response=LONG_ANSWER.replace("cooler room", "cooler place"), fb="rating", value=5)
    kept, report = deduplicate([a, edited], P)
    assert (report.exact, report.near) == (0, 1)
    assert kept == [a]


def test_near_duplicate_edited_prompt_is_removed():
    a = ev(prompt="How do I keep my house plants alive while I travel for two weeks in the summer?")
    b = ev(prompt="How do I keep my house plants alive while I travel for two weeks in summer?")
    kept, report = deduplicate([a, b], P)
    assert (len(kept), report.near) == (1, 1)


def test_distinct_answers_are_kept():
    a = ev()
    b = ev(response="Ask a neighbour to water them twice a week and leave clear written instructions by the door.")
    kept, report = deduplicate([a, b], P)
    assert (len(kept), report.exact, report.near) == (2, 0, 0)


@pytest.mark.parametrize(
    "second",
    [
        {"fb": "rating", "value": 5},
        {"fb": "correction", "value": LONG_ANSWER},
        {"fb": "preference", "value": "Just leave them, plants are fine without water for a month."},
    ],
)
def test_different_feedback_types_on_the_same_answer_are_not_near_duplicates(second):
    a = ev()
    b = ev(**second)
    kept, report = deduplicate([a, b], P)
    assert (len(kept), report.near, report.exact) == (2, 0, 0)


@pytest.mark.parametrize("prompt_words", [20, 200])
def test_other_answers_to_the_same_long_prompt_are_not_near_duplicates(prompt_words):
    """A thumbs up and a thumbs down on two different answers make a pair, however long the question."""
    question = words(prompt_words, seed=prompt_words) + "?"
    up = ev(
        prompt=question, response="Mixing bleach with vinegar releases toxic chlorine gas; never do it.", conv="c-long"
    )
    down = ev(prompt=question, response="Yes, it makes a stronger cleaner.", value="down", conv="c-long")
    kept, report = deduplicate([up, down], P)
    assert report.near == 0 and len(kept) == 2
    assert len(compile_sets(kept, P)["pairs"]) == 1


def test_near_duplicate_threshold_is_used():
    a = ev(fb="rating", value=5)
    edited = ev(response=LONG_ANSWER.replace("cooler room", "cooler place"), fb="rating", value=5)
    kept, report = deduplicate([a, edited], shipped("prepare", near_dup_threshold=0.95))
    assert (len(kept), report.near) == (2, 0)


@pytest.mark.parametrize("threshold, perms", [(1.0, 64), (0.99, 256), (0.9, 2)])
def test_infeasible_minhash_params_fail_naming_them(threshold, perms):
    with pytest.raises(ValueError, match="prepare.near_dup_threshold.*prepare.minhash_perms"):
        deduplicate([ev()], shipped("prepare", near_dup_threshold=threshold, minhash_perms=perms))


# --- the sets ------------------------------------------------------------------------------------------------------


def by_source(records: list[dict], source: str) -> list[dict]:
    return [r for r in records if r["source"] == source]


def test_preference_event_makes_a_pair_and_a_reward_pair():
    e = ev(fb="preference", value="Just leave them.")
    sets = compile_sets([e], P)
    assert sets["pairs"] == sets["reward_pairs"]
    (rec,) = sets["pairs"]
    assert (rec["source"], rec["chosen"], rec["rejected"]) == ("preference", LONG_ANSWER, "Just leave them.")
    assert rec["prompt"] == e["prompt"] and rec["event_ids"] == [e["event_id"]] and rec["user_ids"] == ["u1"]
    assert rec["split"] == split_of(e["conversation_id"], P.split)
    assert sets["sft"] == []


def test_thumbs_up_and_down_on_the_same_prompt_make_pairs():
    up1 = ev(response="Good answer one.", conv="c-t", user="ua")
    up2 = ev(response="Good answer two, longer.", conv="c-t", user="ub")
    down = ev(response="Bad answer.", value="down", conv="c-t", user="uc")
    other_prompt_down = ev(prompt="Another question?", response="Bad.", value="down", conv="c-t")
    sets = compile_sets([up1, up2, down, other_prompt_down], P)
    pairs = by_source(sets["pairs"], "thumbs")
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [
        ("Good answer one.", "Bad answer."),
        ("Good answer two, longer.", "Bad answer."),
    ]
    assert sorted(p["event_ids"] for p in pairs) == sorted(
        [[up1["event_id"], down["event_id"]], [up2["event_id"], down["event_id"]]]
    )
    assert sorted(tuple(p["user_ids"]) for p in pairs) == [("ua", "uc"), ("ub", "uc")]
    assert by_source(sets["reward_pairs"], "thumbs") == pairs


def test_thumbs_on_the_same_answer_make_no_pair():
    up = ev(response="Same answer.", conv="c-s")
    down = ev(response="same   ANSWER.", value="down", conv="c-s")
    assert compile_sets([up, down], P)["pairs"] == []


def test_only_thumbs_up_makes_no_pair():
    assert compile_sets([ev(response="A.", conv="c"), ev(response="B.", conv="c")], P)["pairs"] == []


@pytest.mark.parametrize(
    "gap, expected",
    [
        (1, {(5, 4), (5, 2), (4, 2)}),
        (2, {(5, 2), (4, 2)}),
        (3, {(5, 2)}),
        (4, set()),
    ],
)
def test_ratings_of_the_same_prompt_make_reward_pairs_by_gap(gap, expected):
    rated = {r: ev(response=f"Answer rated {r}.", fb="rating", value=r, conv="c-r") for r in (5, 4, 2)}
    sets = compile_sets(list(rated.values()), shipped("prepare", pair_min_rating_gap=gap))
    pairs = by_source(sets["reward_pairs"], "rating")
    got = {(int(p["chosen"][-2]), int(p["rejected"][-2])) for p in pairs}
    assert got == expected
    assert len(pairs) == len(expected)
    for p in pairs:
        hi, lo = int(p["chosen"][-2]), int(p["rejected"][-2])
        assert p["event_ids"] == [rated[hi]["event_id"], rated[lo]["event_id"]]
    assert by_source(sets["pairs"], "rating") == []  # rating pairs train the reward model only


def test_sft_from_corrections_and_top_ratings():
    fix = ev(fb="correction", value="The corrected answer.")
    top = ev(response="A five-star answer.", fb="rating", value=5)
    good = ev(response="A four-star answer.", fb="rating", value=4)
    up = ev(response="A thumbs-up answer.")
    sft = compile_sets([fix, top, good, up], P)["sft"]
    assert sorted((r["source"], r["completion"]) for r in sft) == [
        ("correction", "The corrected answer."),
        ("rating", "A five-star answer."),
    ]
    assert {r["event_ids"][0] for r in sft} == {fix["event_id"], top["event_id"]}
    assert all(r["prompt"] == fix["prompt"] for r in sft)
    sft4 = compile_sets([fix, top, good, up], shipped("prepare", sft_min_rating=4))["sft"]
    assert len(sft4) == 3


def test_records_keep_event_ids_and_user_ids():
    events = [
        ev(fb="preference", user="alice"),
        ev(fb="correction", user=None),
        ev(response="Up.", conv="c-x", user="bob"),
        ev(response="Down.", value="down", conv="c-x", user="bob"),
    ]
    sets = compile_sets(events, P)
    ids = {e["event_id"] for e in events}
    records = [r for name in SETS for r in sets[name]]
    assert len(records) >= 4
    for r in records:
        assert r["event_ids"] and set(r["event_ids"]) <= ids
        assert r["user_ids"] == sorted(set(r["user_ids"]))
    assert sets["sft"][0]["user_ids"] == []
    assert by_source(sets["pairs"], "thumbs")[0]["user_ids"] == ["bob"]
    assert by_source(sets["pairs"], "preference")[0]["user_ids"] == ["alice"]


# --- the split -----------------------------------------------------------------------------------------------------


def test_split_of_is_a_fixed_function_of_the_id():
    # golden values: a change of hash would reshuffle every split and leak test examples into training
    golden = {
        "conv-0001": "train",
        "conv-0002": "val",
        "conv-0008": "test",
        "conv-t0-down": "test",
        "a": "test",
        "h": "val",
        "b": "train",
    }
    assert {c: split_of(c, shipped("prepare").split) for c in golden} == golden


def test_split_shares_follow_the_params():
    ids = [f"conv-{i}" for i in range(4000)]
    counts = defaultdict(int)
    for c in ids:
        counts[split_of(c, shipped("prepare").split.updated(test_pct=20, val_pct=10))] += 1
    assert 0.17 < counts["test"] / 4000 < 0.23
    assert 0.08 < counts["val"] / 4000 < 0.12
    assert {split_of(c, shipped("prepare").split.updated(test_pct=0, val_pct=0)) for c in ids[:200]} == {"train"}
    assert {split_of(c, shipped("prepare").split.updated(test_pct=100, val_pct=0)) for c in ids[:200]} == {"test"}
    assert {split_of(c, shipped("prepare").split.updated(test_pct=0, val_pct=100)) for c in ids[:200]} == {"val"}


def _conversation(i: int) -> list[dict]:
    conv = f"conv-{i}"
    q = f"Question {i}?"
    return [
        ev(prompt=q, response=f"Good {i}.", conv=conv),
        ev(prompt=q, response=f"Bad {i}.", value="down", conv=conv),
        ev(prompt=q, response=f"Rated {i}.", fb="rating", value=5, conv=conv),
        ev(prompt=q, response=f"Low {i}.", fb="rating", value=1, conv=conv),
        ev(prompt=q, response=f"Pref {i}.", fb="preference", value=f"Worse {i}.", conv=conv),
        ev(prompt=q, response=f"Wrong {i}.", fb="correction", value=f"Right {i}.", conv=conv),
    ]


def _splits(sets: dict) -> dict[str, set[str]]:
    out = defaultdict(set)
    for name in SETS:
        for r in sets[name]:
            out[r["conversation_id"]].add(r["split"])
    return out


def test_a_conversation_stays_in_one_split_as_data_grows():
    small = [e for i in range(30) for e in _conversation(i)]
    grown = [e for i in range(30, 300) for e in _conversation(i)]
    random.Random(1).shuffle(grown)
    before = _splits(compile_sets(deduplicate(small, P)[0], P))
    after = _splits(compile_sets(deduplicate(grown[:500] + small + grown[500:], P)[0], P))
    assert len(before) == 30
    for conv, splits in after.items():
        assert len(splits) == 1, conv  # every record of one conversation in one split
        assert splits == {split_of(conv, P.split)}
    for conv, splits in before.items():
        assert after[conv] == splits  # adding conversations moves no one
    assert {s for v in after.values() for s in v} == set(SPLITS)


def test_each_conversation_gives_every_kind_of_record():
    sets = compile_sets(_conversation(7), P)
    assert {r["source"] for r in sets["pairs"]} == {"thumbs", "preference"}
    assert {r["source"] for r in sets["reward_pairs"]} == {"thumbs", "preference", "rating"}
    assert {r["source"] for r in sets["sft"]} == {"rating", "correction"}


# --- the stage on the demo store -------------------------------------------------------------------------------------


def test_stage_on_demo_store(demo_store, tmp_path):
    out, metrics_file = tmp_path / "prepared", tmp_path / "metrics" / "prepare.json"
    result = main(demo_store.raw, P, out, metrics_file)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}-{sp}.jsonl" for s in SETS for sp in SPLITS)
    metrics = json.loads(metrics_file.read_text())
    assert metrics == result.metrics
    assert metrics["events"] == 44 + 743 + 743
    stored = {r["event_id"]: r for r in load_events(demo_store.raw)}
    conv_of = {eid: r["conversation_id"] for eid, r in stored.items()}
    for name in SETS:
        for split in SPLITS:
            records = read_set(out, name, split)
            assert len(records) == metrics[f"{name}_{split}"]
            for r in records:
                assert r["split"] == split
                assert all(eid in stored for eid in r["event_ids"])
                assert {split_of(conv_of[eid], P.split) for eid in r["event_ids"]} == {split}
                assert r["user_ids"] == sorted(
                    {stored[eid]["user_id"] for eid in r["event_ids"] if stored[eid]["user_id"]}
                )
    assert metrics["sft_train"] + metrics["sft_val"] + metrics["sft_test"] > 0
    assert sum(metrics[f"pairs_{s}"] for s in SPLITS) > 1400


def test_load_events_decodes_prompts_in_ingestion_order(demo_store):
    events = load_events(demo_store.raw)
    assert len(events) == len(rawstore.existing_ids(demo_store.raw))
    assert all(isinstance(e["prompt"], list) and e["prompt"][0]["role"] for e in events)
    order = [(e["ingested_at"], e["event_id"]) for e in events]
    assert order == sorted(order)


def test_prepare_reports_counts():
    events = [ev(conv="c1"), ev(conv="c1"), ev(conv="c1", response="Other.", value="down")]
    events[1]["response"] = events[0]["response"]
    result = prepare(events, P)
    assert result.metrics["events"] == 3 and result.metrics["exact_duplicates"] == 1
    assert sum(result.metrics[f"pairs_{s}"] for s in SPLITS) == 1


# --- unpaired examples for KTO ------------------------------------------------------------------------------------


def test_thumbs_that_form_no_pair_still_make_kto_examples():
    """Most feedback is one thumb on one answer: no pair forms, but every thumb is a KTO example."""
    up = ev(prompt="How do I boil an egg?", response="Simmer it for nine minutes.")
    down = ev(prompt="What is a good cat name?", response="No.", value="down")
    sets = compile_sets([up, down], P)
    assert sets["pairs"] == []
    kto = {r["answer"]: r for r in sets["kto"]}
    assert kto["Simmer it for nine minutes."]["desirable"] is True
    assert kto["No."]["desirable"] is False
    assert kto["No."]["event_ids"] == [down["event_id"]] and kto["No."]["source"] == "thumbs"
    assert kto["No."]["split"] == split_of(down["conversation_id"], P.split)


def test_ratings_are_kto_examples_by_the_thresholds_and_pairs_give_both_halves():
    rated = {r: ev(response=f"Answer rated {r}.", fb="rating", value=r) for r in (1, 2, 3, 4, 5)}
    pref = ev(response="The chosen answer.", fb="preference", value="The rejected answer.")
    kto = compile_sets([*rated.values(), pref], P)["kto"]
    got = {r["answer"]: r["desirable"] for r in kto}
    assert got == {
        "Answer rated 1.": False,
        "Answer rated 2.": False,
        "Answer rated 4.": True,
        "Answer rated 5.": True,
        "The chosen answer.": True,
        "The rejected answer.": False,
    }
    strict = shipped("prepare", kto={"desirable_min_rating": 5, "undesirable_max_rating": 1})
    assert {r["answer"] for r in compile_sets(list(rated.values()), strict)["kto"]} == {
        "Answer rated 1.",
        "Answer rated 5.",
    }


def test_kto_thresholds_that_overlap_are_refused():
    with pytest.raises(ValueError, match=r"undesirable_max_rating \(4\) must be below desirable_min_rating \(4\)"):
        shipped("prepare", kto={"desirable_min_rating": 4, "undesirable_max_rating": 4})


# ---- the golden set: never trained on ---------------------------------------------------------------------------
GOLDEN = shipped("golden")


def _golden(path):
    from flywheel.data.golden import load_golden

    c = shipped("contract")
    return load_golden(path, "hh-rlhf", c.max_text_chars, c.max_turns)


def test_the_golden_set_never_enters_a_training_set(demo_store, tmp_path, repo_root):
    golden = _golden(repo_root / GOLDEN.path)
    stored = load_events(demo_store.raw)
    held = {e["event_id"] for e in stored if golden.holds(e)}
    assert len(held) >= len(golden.pairs) > 250  # every golden row of the demo batches is in the store
    result = main(demo_store.raw, P, tmp_path / "prepared", tmp_path / "prepare.json", golden)
    assert result.metrics["golden_held_out"] == len(held) and result.metrics["events"] == len(stored)
    without = prepare(stored, P)
    for name in SETS:
        for split in SPLITS:
            for r in read_set(tmp_path / "prepared", name, split):
                assert not held & set(r["event_ids"]), (name, split)
    pairs = sum(result.metrics[f"pairs_{s}"] for s in SPLITS)
    assert pairs == sum(without.metrics[f"pairs_{s}"] for s in SPLITS) - len(held)


def test_a_golden_prompt_is_held_out_under_any_conversation_id_and_matched_after_redaction(tmp_path):
    head = "\n\nHuman: my e-mail is jane.doe@example.com, how do I reset my password?\n\nAssistant: "
    (tmp_path / "golden.jsonl").write_text(json.dumps({"chosen": head + "Use the link.", "rejected": head + "No."}))
    golden = _golden(tmp_path / "golden.jsonl")
    prompt = golden.pairs[0]["prompt"]
    assert "jane.doe@example.com" not in json.dumps(prompt)  # redacted, as the raw store holds it
    same_prompt = ev(turns=prompt, conv="another-conversation", fb="thumbs")
    same_conv = ev(prompt="a later turn", conv=golden.pairs[0]["conversation_id"], fb="rating", value=5)
    other = ev(prompt="How do I water a fern?", fb="rating", value=5)
    result = prepare([same_prompt, same_conv, other], P, golden)
    assert result.metrics["golden_held_out"] == 2
    kept = {eid for records in result.sets.values() for r in records for eid in r["event_ids"]}
    assert kept == {other["event_id"]}


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: b"}\n{"x": 1}',
            "line 2",
        ),
        ("", "holds no pairs"),
        (None, "no such file"),
    ],
    ids=["bad-line", "empty", "missing"],
)
def test_a_bad_golden_file_is_refused_naming_the_problem(tmp_path, content, message):
    from flywheel.data.golden import GoldenError

    path = tmp_path / "golden.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(GoldenError, match=message):
        _golden(path)


def test_a_native_golden_set_takes_preference_events_only(tmp_path, make_event):
    from flywheel.data.golden import GoldenError, load_golden

    path = tmp_path / "golden.jsonl"
    path.write_text(json.dumps(make_event()) + "\n")  # a thumbs event: no pair to score
    c = shipped("contract")
    with pytest.raises(GoldenError, match="line 1: a thumbs event, not a preference pair"):
        load_golden(path, "native", c.max_text_chars, c.max_turns)
