"""flywheel.contract: what a valid event is, and a named reason for every way a line can be wrong."""

from __future__ import annotations

import json

import jsonschema
import pytest

from flywheel import contract
from flywheel.contract import ContractError, FeedbackEvent, parse_event

FEEDBACK = {
    "thumbs up": {"type": "thumbs", "value": "up"},
    "thumbs down": {"type": "thumbs", "value": "down"},
    "rating": {"type": "rating", "value": 3},
    "preference": {"type": "preference", "rejected": "A worse answer."},
    "correction": {"type": "correction", "text": "The right answer."},
}


def line(event: dict) -> str:
    return json.dumps(event)


@pytest.mark.parametrize("name", FEEDBACK)
def test_valid_event_of_each_feedback_type_parses(make_event, name):
    event = parse_event(line(make_event(feedback=FEEDBACK[name])))
    assert isinstance(event, FeedbackEvent)
    assert event.feedback.type == FEEDBACK[name]["type"]
    assert event.schema_version == 1


def test_parse_keeps_the_fields(make_event):
    raw = make_event(
        prompt=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye?"},
        ],
        user_id=None,
    )
    event = parse_event(line(raw).encode("utf-8"))
    assert event.event_id == raw["event_id"]
    assert [m.role for m in event.prompt] == ["system", "user", "assistant", "user"]
    assert event.response == raw["response"]
    assert event.user_id is None


@pytest.mark.parametrize(
    "ts",
    ["2026-11-27T10:00:00Z", "2026-11-27T10:00:00.123456+02:00", "2026-11-27 10:00:00-05:00", "2024-02-29T23:59:59z"],
)
def test_valid_timestamps(make_event, ts):
    assert parse_event(line(make_event(timestamp=ts))).timestamp == ts


@pytest.mark.parametrize("rating", [1, 5])
def test_rating_bounds_are_inclusive(make_event, rating):
    assert parse_event(line(make_event(feedback={"type": "rating", "value": rating}))).feedback.value == rating


def _without(event: dict, key: str) -> dict:
    event = dict(event)
    del event[key]
    return event


# (case id, function of a valid event dict -> bad line, words the reason must contain)
BAD = [
    ("invalid JSON", lambda e: line(e)[:-5], ["invalid JSON"]),
    ("not JSON at all", lambda e: "hello there", ["invalid JSON"]),
    ("JSON array", lambda e: json.dumps([e]), ["JSON object"]),
    ("JSON string", lambda e: json.dumps("event"), ["JSON object"]),
    ("JSON null", lambda e: "null", ["JSON object"]),
    ("missing response", lambda e: line(_without(e, "response")), ["response", "Field required"]),
    ("missing event_id", lambda e: line(_without(e, "event_id")), ["event_id", "Field required"]),
    ("missing feedback", lambda e: line(_without(e, "feedback")), ["feedback", "Field required"]),
    ("event_id a number", lambda e: line({**e, "event_id": 42}), ["event_id", "string"]),
    ("prompt a string", lambda e: line({**e, "prompt": "hi"}), ["prompt", "array"]),
    ("response a list", lambda e: line({**e, "response": ["hi"]}), ["response", "string"]),
    ("user_id a number", lambda e: line({**e, "user_id": 7}), ["user_id", "string"]),
    (
        "rating 0",
        lambda e: line({**e, "feedback": {"type": "rating", "value": 0}}),
        ["feedback.rating.value", "greater than or equal to 1"],
    ),
    (
        "rating 6",
        lambda e: line({**e, "feedback": {"type": "rating", "value": 6}}),
        ["feedback.rating.value", "less than or equal to 5"],
    ),
    (
        "rating as string",
        lambda e: line({**e, "feedback": {"type": "rating", "value": "5"}}),
        ["feedback.rating.value", "integer"],
    ),
    (
        "rating as float",
        lambda e: line({**e, "feedback": {"type": "rating", "value": 4.5}}),
        ["feedback.rating.value", "integer"],
    ),
    (
        "thumbs sideways",
        lambda e: line({**e, "feedback": {"type": "thumbs", "value": "sideways"}}),
        ["feedback.thumbs.value", "'up' or 'down'"],
    ),
    (
        "unknown feedback type",
        lambda e: line({**e, "feedback": {"type": "emoji", "value": ":)"}}),
        ["feedback", "'emoji'", "does not match"],
    ),
    ("feedback without type", lambda e: line({**e, "feedback": {"value": "up"}}), ["feedback", "type"]),
    ("empty response", lambda e: line({**e, "response": ""}), ["response", "text is empty"]),
    ("whitespace-only response", lambda e: line({**e, "response": " \n\t "}), ["response", "text is empty"]),
    (
        "empty prompt turn",
        lambda e: line({**e, "prompt": [{"role": "user", "content": "  "}]}),
        ["prompt.0.content", "text is empty"],
    ),
    (
        "empty correction",
        lambda e: line({**e, "feedback": {"type": "correction", "text": ""}}),
        ["feedback.correction.text", "text is empty"],
    ),
    (
        "whitespace rejected",
        lambda e: line({**e, "feedback": {"type": "preference", "rejected": "\n"}}),
        ["feedback.preference.rejected", "text is empty"],
    ),
    ("bad timestamp format", lambda e: line({**e, "timestamp": "27/11/2026 10:00"}), ["timestamp", "RFC 3339"]),
    ("timestamp without zone", lambda e: line({**e, "timestamp": "2026-11-27T10:00:00"}), ["timestamp", "RFC 3339"]),
    ("impossible date", lambda e: line({**e, "timestamp": "2026-02-30T10:00:00Z"}), ["timestamp", "not a valid date"]),
    ("impossible hour", lambda e: line({**e, "timestamp": "2026-11-27T25:00:00Z"}), ["timestamp", "not a valid date"]),
    (
        "unknown role",
        lambda e: line({**e, "prompt": [{"role": "bot", "content": "hi"}]}),
        ["prompt.0.role", "'system', 'user' or 'assistant'"],
    ),
    (
        "no user turn",
        lambda e: line({**e, "prompt": [{"role": "system", "content": "hi"}]}),
        ["prompt", "no user turn"],
    ),
    ("no turns", lambda e: line({**e, "prompt": []}), ["prompt", "at least 1"]),
    (
        "preference rejected equals response",
        lambda e: line({**e, "feedback": {"type": "preference", "rejected": e["response"]}}),
        ["rejected equals response"],
    ),
    ("extra unknown field", lambda e: line({**e, "mood": "happy"}), ["mood", "Extra inputs are not permitted"]),
    (
        "extra field in feedback",
        lambda e: line({**e, "feedback": {"type": "thumbs", "value": "up", "why": "x"}}),
        ["feedback.thumbs.why", "Extra inputs"],
    ),
    (
        "extra field in a turn",
        lambda e: line({**e, "prompt": [{"role": "user", "content": "hi", "name": "x"}]}),
        ["prompt.0.name", "Extra inputs"],
    ),
    ("unknown schema version", lambda e: line({**e, "schema_version": 2}), ["schema_version"]),
    ("empty event_id", lambda e: line({**e, "event_id": ""}), ["event_id", "at least 1"]),
]


@pytest.mark.parametrize("make_line, words", [pytest.param(f, w, id=i) for i, f, w in BAD])
def test_bad_input_raises_contract_error_naming_the_problem(make_event, make_line, words):
    with pytest.raises(ContractError) as err:
        parse_event(make_line(make_event()))
    assert isinstance(err.value, ValueError)
    assert err.value.reason == str(err.value)
    for word in words:
        assert word in err.value.reason
    assert "\n" not in err.value.reason  # one line, fit for the quarantine file


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", "{\"event_id\": \"caf\xe9\"}".encode("latin-1")])
def test_non_utf8_bytes(raw):
    with pytest.raises(ContractError, match="not valid UTF-8"):
        parse_event(raw)


@pytest.mark.parametrize("field", ["event_id", "conversation_id", "model_version", "user_id"])
@pytest.mark.parametrize("char", ["\u0000", "\n", "\x1b", "\x7f", "\u0085"])
def test_control_characters_in_identifiers_are_refused_naming_the_field(make_event, validator, field, char):
    """A NUL in an id once passed the contract and made PostgreSQL refuse a whole group commit."""
    value = f"secret-id-7731{char}tail"
    event = make_event(**{field: value})
    with pytest.raises(ContractError) as err:
        parse_event(line(event))
    assert err.value.reason.startswith(f"{field}: contains a control character (U+{ord(char):04X})")
    assert "secret-id-7731" not in err.value.reason  # the value is never echoed
    assert list(validator.iter_errors(event)) != []  # the shipped JSON Schema says the same


def test_printable_unicode_identifiers_are_kept(make_event):
    event = parse_event(line(make_event(event_id="évt-ß-日本-1", user_id="józef")))
    assert (event.event_id, event.user_id) == ("évt-ß-日本-1", "józef")


def test_oversize_text_uses_max_text_chars(make_event):
    ok = line(make_event(response="x" * 50))
    assert parse_event(ok, max_text_chars=50).response == "x" * 50
    with pytest.raises(ContractError) as err:
        parse_event(ok, max_text_chars=49)
    assert "response" in err.value.reason and "50 characters" in err.value.reason and "49" in err.value.reason


@pytest.mark.parametrize(
    "where, event_overrides",
    [
        ("prompt.0.content", {"prompt": [{"role": "user", "content": "y" * 40}]}),
        ("feedback.correction.text", {"feedback": {"type": "correction", "text": "y" * 40}}),
        ("feedback.preference.rejected", {"feedback": {"type": "preference", "rejected": "y" * 40}}),
    ],
)
def test_oversize_text_in_every_text_field(make_event, where, event_overrides):
    event = make_event(response="short", **event_overrides)
    with pytest.raises(ContractError) as err:
        parse_event(line(event), max_text_chars=39)
    assert where in err.value.reason and "over the limit of 39" in err.value.reason


def test_default_limits_come_from_the_contract(make_event):
    event = make_event(response="z" * (contract.DEFAULT_MAX_CHARS + 1))
    with pytest.raises(ContractError, match="over the limit"):
        parse_event(line(event))


def test_too_many_turns(make_event):
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(5)]
    event = line(make_event(prompt=turns))
    assert len(parse_event(event, max_turns=5).prompt) == 5
    with pytest.raises(ContractError) as err:
        parse_event(event, max_turns=4)
    assert "prompt" in err.value.reason and "5 turns" in err.value.reason and "limit of 4" in err.value.reason


def test_several_problems_are_all_named(make_event):
    bad = {**make_event(), "response": "", "feedback": {"type": "rating", "value": 9}}
    with pytest.raises(ContractError) as err:
        parse_event(line(bad))
    assert "response" in err.value.reason and "feedback.rating.value" in err.value.reason


# --- the JSON Schema shipped beside the models -------------------------------------------------------------------


def test_shipped_schema_equals_generated_schema():
    shipped = json.loads(contract.SCHEMA_PATH.read_text())
    assert shipped == contract.json_schema(), "run `flywheel contract schema --write` after changing the models"
    assert contract.SCHEMA_PATH.read_text() == json.dumps(contract.json_schema(), indent=2, sort_keys=True) + "\n"


def test_write_schema_round_trips(tmp_path):
    path = contract.write_schema(tmp_path / "schema.json")
    assert json.loads(path.read_text()) == contract.json_schema()


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(contract.SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema)
    assert cls is jsonschema.Draft202012Validator
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("name", FEEDBACK)
def test_jsonschema_accepts_good_events(validator, make_event, name):
    event = make_event(feedback=FEEDBACK[name])
    assert list(validator.iter_errors(event)) == []
    parse_event(line(event))  # and the models agree


@pytest.mark.parametrize(
    "change",
    [
        {"feedback": {"type": "rating", "value": 9}},
        {"feedback": {"type": "emoji"}},
        {"prompt": [{"role": "bot", "content": "hi"}]},
        {"mood": "happy"},
        {"event_id": 5},
    ],
)
def test_jsonschema_rejects_bad_events(validator, make_event, change):
    event = {**make_event(), **change}
    assert list(validator.iter_errors(event)) != []
    with pytest.raises(ContractError):
        parse_event(line(event))


def test_jsonschema_requires_the_required_fields(validator, make_event):
    event = _without(make_event(), "conversation_id")
    assert any("conversation_id" in e.message for e in validator.iter_errors(event))


def test_the_contract_names_each_feedback_type_and_the_columns_it_fills_once(make_event):
    """What a kind of feedback stores is the contract's: ingest and validate read it from there (README
    "Extending Flywheel": a new kind touches the contract and the prepare step only)."""
    from collections import Counter

    from flywheel.data import rawstore
    from flywheel.data.ingest import event_row
    from pipelines.validate import FEEDBACK_TYPES

    assert FEEDBACK_TYPES == list(contract.FEEDBACK_TYPES) == ["thumbs", "rating", "preference", "correction"]
    assert set(contract.FEEDBACK_COLUMNS) <= set(rawstore.SCHEMA.names)
    polarity = {"thumbs up": 1, "thumbs down": -1, "rating": 0, "preference": 0, "correction": -1}
    for name, feedback in FEEDBACK.items():
        row = event_row(parse_event(line(make_event(feedback=feedback))), Counter())
        filled = {c: row[c] for c in contract.FEEDBACK_COLUMNS if row[c] is not None}
        assert filled == parse_event(line(make_event(feedback=feedback))).feedback.columns(), name
        assert row["feedback_type"] == feedback["type"] and row["polarity"] == polarity[name], name

    class Edit(contract._Feedback):  # a new kind, as README's example adds it: ingest is not touched
        type: str = "edit"
        text: str

        def columns(self):
            return {"correction": self.text}

        def polarity(self):
            return -1

    event = parse_event(line(make_event()))
    edited = event.model_copy(update={"feedback": Edit(text="Write to me at jo@example.com instead.")})
    found = Counter()
    row = event_row(edited, found)
    assert row["feedback_type"] == "edit" and row["polarity"] == -1 and found["email"] == 1
    assert row["correction"] == "Write to me at [EMAIL] instead." and row["thumbs"] is None
