"""flywheel.redact: planted personal data is replaced and counted; look-alikes are left alone."""

from __future__ import annotations

from collections import Counter

import pytest

from flywheel import redact as redact_mod
from flywheel.redact import iban_ok, luhn_ok, pseudonymise_id, redact

PLANTED = [
    # (kind, the personal datum, as it sits in a sentence)
    ("email", "jane.roe@example.org", "You can reach me at {} if you need more details."),
    ("email", "j.o-e+tag@mail.co.uk", "mail {}."),
    ("phone", "+1 415-555-0132", "My number is {}, call me after six."),
    ("phone", "+44 20 7946 0958", "Call {} today."),
    ("phone", "+447911123456", "Text {} please."),
    ("phone", "(415) 555-0132", "Office: {} (mornings)."),
    ("phone", "415.555.0132", "Or {}."),
    ("phone", "020 7946 0958", "London office {}."),
    ("phone", "+33 1 23 45 67 89", "Paris: {}."),
    ("phone", "0044 20 7946 0958", "From abroad dial {} instead."),
    ("card", "4111 1111 1111 1111", "I paid with card {} and never got a refund."),
    ("card", "4111-1111-1111-1111", "card {}"),
    ("card", "5555555555554444", "card {} expired"),
    ("card", "378282246310005", "amex {}"),
    ("iban", "DE89 3704 0044 0532 0130 00", "Please refund to IBAN {} as soon as possible."),
    ("iban", "DE89370400440532013000", "IBAN:{}"),
    ("iban", "GB82 WEST 1234 5698 7654 32", "Pay {} now."),
    ("ip", "192.168.10.24", "The router at {} keeps dropping the connection."),
    ("ip", "10.0.0.1", "ping {}."),
    ("ip", "2001:db8::1", "IPv6 {} is mine."),
    ("ip", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "full form {} here"),
    ("ip", "fe80::1ff:fe23:4567:890a", "link-local {}"),
    # gaps found in the security review
    ("ssn", "123-45-6789", "My SSN is {}, please update it."),
    ("ssn", "078 05 1121", "ssn {} on file"),
    ("phone", "4155550132", "Call me at {} tonight."),
    ("phone", "14155550132", "US number {}."),
    ("phone", "07911123456", "mobile {}"),
    ("iban", "DE89-3704-0044-0532-0130-00", "IBAN {} please."),
    ("iban", "de89 3704 0044 0532 0130 00", "iban {} (lowercase)"),
    ("iban", "gb82west12345698765432", "pay {}"),
    ("iban", "DE89370400440532013000", "I want my deposit in {} 2 days from today."),
    ("card", "4111.1111.1111.1111", "card {} expired"),
    ("card", "5555.5555.5555.4444", "mastercard {}."),
    ("email", "józef@exämple.pl", "Napisz do {} jutro."),
    ("email", "用户@例子.广告", "邮件 {} 谢谢"),
    ("email", "Zoë_Ünal@mail.de", "mail {}!"),
]


@pytest.mark.parametrize("kind, value, sentence", PLANTED, ids=[f"{k}:{v}" for k, v, _ in PLANTED])
def test_planted_personal_data_is_redacted_and_counted(kind, value, sentence):
    counts = Counter()
    out = redact(sentence.format(value), counts)
    assert f"[{kind.upper()}]" in out
    assert counts == Counter({kind: 1})
    digits = "".join(ch for ch in value if ch.isalnum())
    assert value not in out
    # no run of the datum's characters survives (e.g. the digits of a phone number minus its '+')
    assert digits[-6:] not in "".join(ch for ch in out if ch.isalnum())


def test_text_outside_the_datum_is_kept():
    assert redact("Write to jane.roe@example.org today.") == "Write to [EMAIL] today."
    assert redact("card 4111 1111 1111 1111, thanks") == "card [CARD], thanks"


def test_several_kinds_in_one_text_are_all_counted():
    text = (
        "Mail jane.roe@example.org or call +1 415-555-0132; card 4111 1111 1111 1111, "
        "IBAN DE89 3704 0044 0532 0130 00, from 192.168.10.24 and 2001:db8::1. Also bob@example.com."
    )
    counts = Counter()
    out = redact(text, counts)
    assert counts == Counter({"email": 2, "phone": 1, "card": 1, "iban": 1, "ip": 2})
    for planted in ("jane.roe", "bob@", "555-0132", "4111", "DE89", "192.168", "2001:db8"):
        assert planted not in out


def test_counts_accumulate_across_calls():
    counts = Counter()
    redact("a@b.io", counts)
    redact("c@d.io and 10.1.2.3", counts)
    assert counts == Counter({"email": 2, "ip": 1})


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112",  # fails Luhn
        "card 1234 5678 9012 3456",  # fails Luhn
        "IBAN DE88 3704 0044 0532 0130 00",  # fails mod-97
        "IBAN GB00 WEST 1234 5698 7654 32",  # fails mod-97
        "on 2021-11-27 we met",
        "between 2021-11-27 and 2021-12-01",
        "2021-11-27, 2021-11-28, 2021-11-29",
        "at 2026-11-27T10:00:00Z",
        "the number 12345 here",
        "codes 12345 67890",
        "order 1234567",
        "the years 1990-2000",
        "price 1,050.00 or 3.14159265",
        "ts 1700000000",
        "time 10:30:00 and ratio 3:2",
        "hello world, nothing to see",
        "an @ sign alone and user@localhost",
        "ISBN 978-3-16-148410-0",
        # look-alikes of the kinds added after the review: versions, prices, dates, ids, failed checksums
        "upgrade to 1.2.3.4 then 2.0.1.5",
        "version 10.2.0.1 and v172.16.0.4",
        "pydantic 2.14.4, fastapi 0.136.3, section 4.2.1",
        "it costs $1,299.99 or EUR 45.00 (was 1299.00)",
        "dates 27.11.2026, 11/27/2026 and 2026.11.27",
        "at 2026-11-27T10:00:00.123456Z on port 8080",
        "card 4111.1111.1111.1112",  # fails Luhn
        "iban de88 3704 0044 0532 0130 00",  # fails mod-97
        "code ab12 cdef ghij klmn op",  # not an IBAN country
        "SSN-shaped 000-12-3456, 666-12-3456, 912-34-5678, 123-00-4567, 123-45-0000, 111-11-1111",
        "ids hh-3f8e4155550132ab and evt_4155550132x",  # digits glued to letters are part of an id
        "serial 1700000000 and 1234567890",  # no North-American area code starts with 1
        "5 out of 10, 3/4 of 100",
        "user@localhost and @handle",
    ],
)
def test_look_alikes_are_not_redacted(text):
    counts = Counter()
    assert redact(text, counts) == text
    assert not counts


@pytest.mark.parametrize(
    "digits, ok",
    [
        ("4111111111111111", True),
        ("4111111111111112", False),
        ("79927398713", True),
        ("79927398710", False),
        ("0", True),
    ],
)
def test_luhn(digits, ok):
    assert luhn_ok(digits) is ok


@pytest.mark.parametrize(
    "iban, ok",
    [
        ("DE89 3704 0044 0532 0130 00", True),
        ("DE89370400440532013000", True),
        ("GB82WEST12345698765432", True),
        ("DE88370400440532013000", False),
        ("DE89 3704", False),
    ],
)
def test_iban_checksum(iban, ok):
    assert iban_ok(iban) is ok


def test_cards_and_ibans_are_not_counted_as_phones():
    counts = Counter()
    out = redact("pay 4111.1111.1111.1111 or DE89-3704-0044-0532-0130-00, call 4155550132", counts)
    assert out == "pay [CARD] or [IBAN], call [PHONE]"
    assert counts == Counter({"card": 1, "iban": 1, "phone": 1})


# ---- identifiers ---------------------------------------------------------------------------------------------
KEY = "k" * 40


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_PSEUDONYM_KEY", KEY)
    return KEY


@pytest.mark.parametrize(
    "value", ["jane.roe@example.org", "user-4155550132", "+44 20 7946 0958", "123-45-6789", "józef@exämple.pl"]
)
def test_ids_holding_personal_data_are_pseudonymised_stably(key, value):
    counts = Counter()
    pid = pseudonymise_id(value, counts)
    assert pid.startswith("pid-") and len(pid) == 36 and value not in pid
    assert pseudonymise_id(value) == pid  # the same id, the same pseudonym
    assert pseudonymise_id(pid) == pid  # a pseudonym is left as it is
    assert sum(counts.values()) == 1


@pytest.mark.parametrize("value", ["user-17", "u-1873", "evt-000001", "hh-3f8e4155550132ab9c", "conv-42", "", None])
def test_ids_without_personal_data_are_kept(key, value):
    assert pseudonymise_id(value) == value


def test_the_pseudonym_depends_on_the_key(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_PSEUDONYM_KEY", "a" * 32)
    first = pseudonymise_id("jane@example.org")
    monkeypatch.setenv("FLYWHEEL_PSEUDONYM_KEY", "b" * 32)
    assert pseudonymise_id("jane@example.org") != first


def test_a_short_key_fails_naming_the_variable(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_PSEUDONYM_KEY", "short")
    with pytest.raises(ValueError, match="FLYWHEEL_PSEUDONYM_KEY"):
        pseudonymise_id("jane@example.org")


def test_without_a_key_the_workspace_gets_one_of_its_own(tmp_path, monkeypatch):
    monkeypatch.delenv("FLYWHEEL_PSEUDONYM_KEY", raising=False)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "params.yaml").write_text("{}\n")
    monkeypatch.setenv("FLYWHEEL_ROOT", str(tmp_path / "a"))
    first = pseudonymise_id("jane@example.org")
    key_file = tmp_path / "a" / redact_mod.PSEUDONYM_KEY_FILE
    assert key_file.is_file() and oct(key_file.stat().st_mode & 0o777) == "0o600"
    redact_mod._keys.clear()  # a new process reads the same file
    assert pseudonymise_id("jane@example.org") == first
    monkeypatch.setenv("FLYWHEEL_ROOT", str(tmp_path / "b"))
    assert pseudonymise_id("jane@example.org") != first  # another workspace, another key


def test_event_rows_carry_pseudonyms_for_ids_holding_personal_data(key, make_event):
    import json

    from flywheel.contract import parse_event
    from flywheel.data.ingest import event_row

    event = parse_event(
        json.dumps(
            make_event(
                event_id="evt-jane@example.org", conversation_id="conv-4155550132", user_id="jane.roe@example.org"
            )
        )
    )
    found = Counter()
    row = event_row(event, found)
    assert row["user_id"] == pseudonymise_id("jane.roe@example.org")
    assert row["event_id"] == pseudonymise_id("evt-jane@example.org")
    assert row["conversation_id"] == pseudonymise_id("conv-4155550132")
    assert "example.org" not in json.dumps(row) and "4155550132" not in json.dumps(row)
    assert found == Counter({"email": 2, "phone": 1}) and row["pii_found"] == 3
    plain = event_row(parse_event(json.dumps(make_event(user_id="user-07"))), Counter())
    assert plain["user_id"] == "user-07"  # an id without personal data is kept as it is
