"""Personal-data redaction with fast pattern detectors, applied before anything is stored.

Kinds: e-mail addresses, phone numbers, payment card numbers (Luhn-checked), IBANs (mod-97 checked)
and IP addresses (v4 and v6). One compiled alternation scans each text once; checksummed kinds
are confirmed in the callback, so a random digit run is not taken for a card.
"""

from __future__ import annotations

import re
from collections import Counter

KINDS = ("email", "iban", "card", "ip", "phone")

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_EMAIL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_IPV6 = re.compile(
    r"(?<![0-9A-Fa-f:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
    r"|(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4}"
    r"|::(?:[0-9A-Fa-f]{1,4}:){0,6}[0-9A-Fa-f]{1,4})(?![0-9A-Fa-f:])"
)
_IBAN_HINT = re.compile(r"[A-Z][A-Z]\d\d")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")
# A run of digits and separators; each run is then searched for the digit-shaped kinds.
_RUN = re.compile(r"\d[\d ().-]{5,}\d")
_DIGIT_KINDS = re.compile(
    r"(?P<card>(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-]))"
    r"|(?P<ip>(?<![\d.])" + _OCTET + r"(?:\." + _OCTET + r"){3}(?![\d.]))"
    r"|(?P<phone>(?<!\d)(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?!\d)"
    r"|(?<!\d)\+\d{7,14}(?!\d))"
)
# Cheap pre-filter: every kind needs a digit or an '@'.
_MAYBE = re.compile(r"[\d@]")


def luhn_ok(digits: str) -> bool:
    """True when a digit string passes the Luhn checksum."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """True when an IBAN (spaces allowed) passes its ISO 13616 mod-97 checksum."""
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    number = "".join(str(int(c, 36)) for c in moved)
    return int(number) % 97 == 1


def redact(text: str, counts: Counter | None = None) -> str:
    """Replace personal data in ``text`` by ``[KIND]`` placeholders; tally each kind in ``counts``."""
    if not _MAYBE.search(text):
        return text
    tally: Counter = Counter() if counts is None else counts
    if "@" in text:
        text = _EMAIL.sub(lambda m: _mark(tally, "email"), text)
    if "::" in text or text.count(":") >= 7:
        text = _IPV6.sub(lambda m: _mark(tally, "ip"), text)
    if _IBAN_HINT.search(text):
        text = _IBAN.sub(lambda m: _mark(tally, "iban") if iban_ok(m.group(0)) else m.group(0), text)
    return _RUN.sub(lambda m: _redact_run(m, tally), text)


def _mark(tally: Counter, kind: str) -> str:
    tally[kind] += 1
    return f"[{kind.upper()}]"


def _redact_run(run: re.Match[str], tally: Counter) -> str:
    text, start = run.string, run.start()
    # A leading '+' or '(' belongs to a phone number but is not part of the run; keep it out of the
    # replacement and let the phone pattern see it through the run's own text.
    prefix = text[start - 1] if start and text[start - 1] in "+(" else ""

    def _sub(m: re.Match[str]) -> str:
        kind = m.lastgroup
        value = m.group(0)
        if kind == "card":
            digits = value.replace(" ", "").replace("-", "")
            if not luhn_ok(digits):
                return value
        return _mark(tally, kind)

    out = _DIGIT_KINDS.sub(_sub, prefix + run.group(0))
    return out[len(prefix):] if prefix and out.startswith(prefix) else out
