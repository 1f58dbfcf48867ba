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
    r"|(?<!\d)\+\d{7,14}(?!\d)"
    # international forms in short groups: +33 1 23 45 67 89, 0044 20 7946 0958 (8-15 digits, checked below)
    r"|(?<!\d)(?:\+|00)\d{1,3}(?:[ .-]\d{1,4}){2,6}(?!\d))"
)
_PHONE_ONLY = re.compile(r"(?:\+|00)\d{1,3}(?:[ .-]\d{1,4}){2,6}|(?:\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}")
# Cheap pre-filter: every kind needs a digit or an '@'.
_MAYBE = re.compile(r"[\d@]")
# One scan that finds whether the IBAN or digit-run step can change anything: a match exists exactly when
# _IBAN_HINT or _RUN has one (both are anchored on a digit, which the regex engine scans for quickly).
_DIGIT_STEPS = re.compile(r"\d(?:(?<=[A-Z][A-Z]\d)\d|[\d ().-]{5,}\d)")
# The same test for ASCII text, faster: each byte mapped to its class (digit '0', run separator 's', capital 'A',
# anything else 'x') in one C pass, then a substring test for the IBAN hint and a literal-led search for a run.
_ASCII_SHAPE = bytes(ord("0") if 48 <= b <= 57 else ord("s") if chr(b) in " ().-" else ord("A") if 65 <= b <= 90
                     else ord("x") for b in range(256))
_SHAPE_RUN = re.compile(rb"0[0s]{5,}0")


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


def _maybe(text: str) -> bool:
    """``_MAYBE.search(text)``, with substring tests for ASCII text (``\\d`` also matches non-ASCII digits)."""
    if text.isascii():
        return ("@" in text or "0" in text or "1" in text or "2" in text or "3" in text or "4" in text
                or "5" in text or "6" in text or "7" in text or "8" in text or "9" in text)
    return _MAYBE.search(text) is not None


def _digit_steps(text: str) -> bool:
    """True when ``_IBAN_HINT`` or ``_RUN`` finds something in ``text`` (``_DIGIT_STEPS.search``)."""
    if text.isascii():
        shape = text.encode("ascii").translate(_ASCII_SHAPE)
        return b"AA00" in shape or _SHAPE_RUN.search(shape) is not None
    return _DIGIT_STEPS.search(text) is not None


def redact(text: str, counts: Counter | None = None) -> str:
    """Replace personal data in ``text`` by ``[KIND]`` placeholders; tally each kind in ``counts``."""
    if not _maybe(text):
        return text
    tally: Counter = Counter() if counts is None else counts
    if "@" in text:
        text = _EMAIL.sub(lambda m: _mark(tally, "email"), text)
    if ":" in text and ("::" in text or text.count(":") >= 7):
        text = _IPV6.sub(lambda m: _mark(tally, "ip"), text)
    if not _digit_steps(text):
        return text  # neither an IBAN hint nor a digit run: the two steps below would change nothing
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
                # not a card; a phone number in groups may look like one (0044 20 7946 0958)
                if len(digits) <= 15 and _PHONE_ONLY.fullmatch(value):
                    return _mark(tally, "phone")
                return value
        elif kind == "phone" and not 7 <= sum(c.isdigit() for c in value) <= 15:
            return value
        return _mark(tally, kind)

    out = _DIGIT_KINDS.sub(_sub, prefix + run.group(0))
    return out[len(prefix):] if prefix and out.startswith(prefix) else out
