"""flywheel.redact: planted personal data is replaced and counted; look-alikes are left alone."""

from __future__ import annotations

from collections import Counter

import pytest

from flywheel.redact import iban_ok, luhn_ok, redact

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
    text = ("Mail jane.roe@example.org or call +1 415-555-0132; card 4111 1111 1111 1111, "
            "IBAN DE89 3704 0044 0532 0130 00, from 192.168.10.24 and 2001:db8::1. Also bob@example.com.")
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


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112",            # fails Luhn
    "card 1234 5678 9012 3456",            # fails Luhn
    "IBAN DE88 3704 0044 0532 0130 00",     # fails mod-97
    "IBAN GB00 WEST 1234 5698 7654 32",     # fails mod-97
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
])
def test_look_alikes_are_not_redacted(text):
    counts = Counter()
    assert redact(text, counts) == text
    assert not counts


@pytest.mark.parametrize("digits, ok", [("4111111111111111", True), ("4111111111111112", False),
                                        ("79927398713", True), ("79927398710", False), ("0", True)])
def test_luhn(digits, ok):
    assert luhn_ok(digits) is ok


@pytest.mark.parametrize("iban, ok", [("DE89 3704 0044 0532 0130 00", True), ("DE89370400440532013000", True),
                                      ("GB82WEST12345698765432", True), ("DE88370400440532013000", False),
                                      ("DE89 3704", False)])
def test_iban_checksum(iban, ok):
    assert iban_ok(iban) is ok
