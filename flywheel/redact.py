"""Personal-data redaction with fast pattern detectors, applied before anything is stored.

Kinds: e-mail addresses (Unicode too), phone numbers (separated, international, or unseparated North American
and national forms), payment card numbers (Luhn-checked; space, dash or dot groups), IBANs (country length and
mod-97 checked; any case, space or dash groups), US social security numbers (area/group/serial rules) and IP
addresses (v4 and v6). E-mails, IPv6 and IBANs are replaced first, then one compiled alternation scans each run
of digits (cards and SSNs before phones, so a card is never counted as a phone); checksummed kinds are confirmed
in the callback, so a random digit run is not taken for a card.

Identifiers (event, conversation and user ids) holding personal data are pseudonymised rather than redacted:
``pseudonymise_id`` replaces such an id by a keyed hash (HMAC-SHA256), stable for one key, so duplicates still
match and ``flywheel erase --user-id <raw id>`` finds the rows by hashing the id the same way. The key is
``$FLYWHEEL_PSEUDONYM_KEY``, else a random key created once per workspace in ``.flywheel/pseudonym.key``
(git-ignored; every process that stores or erases must see the same key).

Presidio's pattern recognizers were considered. Borrowed from them: the IBAN pattern shape (2-7 groups of four,
space or dash separated, an optional short tail, retried without the tail when the checksum fails) with the
mod-97 checksum and a per-country length check (from ``iban_patterns``); the card validator (Luhn, after
removing separators); the SSN rules of ``UsSsnRecognizer.invalidate_result`` (one delimiter, no all-same digits,
no zero group or serial) plus the SSA's never-issued areas (000, 666, 9xx), though not its list of sample
numbers. Compiled regexes are kept rather than Presidio's analyzer: its pattern-only analyzer ran at ~430
texts/s on 300-character texts against ~25,000 for these regexes on the same machine (FACTS.md), it needs spaCy
and, for e-mails, a public-suffix download, and redaction runs on every stored text.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections import Counter
from pathlib import Path

KINDS = ("email", "iban", "card", "ssn", "ip", "phone")
PSEUDONYM_KEY_ENV = "FLYWHEEL_PSEUDONYM_KEY"
PSEUDONYM_KEY_FILE = Path(".flywheel") / "pseudonym.key"  # under the workspace root; git-ignored
PSEUDONYM_PREFIX = "pid-"
_PSEUDONYM = re.compile(r"pid-[0-9a-f]{32}")

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Unicode local parts and domains (józef@exämple.pl); the top-level domain is letters only. ASCII text uses the
# ASCII-only form (same matches there, ~2x faster); a match starts only where a local part can start.
_EMAIL = re.compile(r"(?<![\w.%+-])\w[\w.%+-]*@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}")
_EMAIL_ASCII = re.compile(r"(?<![\w.%+-])\w[\w.%+-]*@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}", re.ASCII)
_IPV6 = re.compile(
    r"(?<![0-9A-Fa-f:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
    r"|(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4}"
    r"|::(?:[0-9A-Fa-f]{1,4}:){0,6}[0-9A-Fa-f]{1,4})(?![0-9A-Fa-f:])"
)
_IBAN_HINT = re.compile(r"[A-Za-z][A-Za-z]\d\d")
_IBAN = re.compile(
    r"(?<![A-Za-z0-9])(?P<body>[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]{4}){2,7})"
    r"(?P<tail>[ -]?[A-Za-z0-9]{1,3})?(?![A-Za-z0-9])"
)
# IBAN length by country (ISO 13616 registry); a country not listed is not taken for an IBAN.
_IBAN_LENGTHS = {
    **dict.fromkeys(["NO"], 15),
    **dict.fromkeys(["BE"], 16),
    **dict.fromkeys(["DK", "FI", "FK", "FO", "GL", "NL", "SD"], 18),
    **dict.fromkeys(["MK", "SI"], 19),
    **dict.fromkeys(["AT", "BA", "EE", "KZ", "LT", "LU", "MN", "XK"], 20),
    **dict.fromkeys(["CH", "HR", "LI", "LV"], 21),
    **dict.fromkeys(["BG", "BH", "CR", "DE", "GB", "GE", "IE", "ME", "RS", "VA"], 22),
    **dict.fromkeys(["AE", "GI", "IL", "IQ", "OM", "SO", "TL"], 23),
    **dict.fromkeys(["AD", "CZ", "ES", "MD", "PK", "RO", "SA", "SE", "SK", "TN", "VG"], 24),
    **dict.fromkeys(["LY", "PT", "ST"], 25),
    **dict.fromkeys(["IS", "TR"], 26),
    **dict.fromkeys(["BI", "DJ", "FR", "GR", "IT", "MC", "MR", "SM"], 27),
    **dict.fromkeys(["AL", "AZ", "BY", "CY", "DO", "GT", "HN", "HU", "LB", "NI", "PL", "SV"], 28),
    **dict.fromkeys(["BR", "EG", "PS", "QA", "UA"], 29),
    **dict.fromkeys(["JO", "KW", "MU", "YE"], 30),
    **dict.fromkeys(["MT", "SC"], 31),
    **dict.fromkeys(["LC"], 32),
    **dict.fromkeys(["RU"], 33),
}
# A run of digits and separators; each run is then searched for the digit-shaped kinds.
_RUN = re.compile(r"\d[\d ().-]{5,}\d")
_DIGIT_KINDS = re.compile(
    # cards: 13-19 digits, space or dash separated anywhere, or in dotted groups of four; a run of that shape
    # that fails Luhn is left whole (an ISBN is not cut into a phone number)
    r"(?P<card>(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])|(?<![\d.])\d{4}\.\d{4}\.\d{4}\.\d{1,4}(?:\.\d{1,3})?(?![\d.]))"
    r"|(?P<ssn>(?<!\d)(?<!\d[ .-])\d{3}(?P<ss>[ .-])\d{2}(?P=ss)\d{4}(?!\d)(?![ .-]\d))"
    r"|(?P<ip>(?<![\d.])" + _OCTET + r"(?:\." + _OCTET + r"){3}(?![\d.]))"
    r"|(?P<phone>(?<!\d)(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?!\d)"
    r"|(?<!\d)\+\d{7,14}(?!\d)"
    # international forms in short groups: +33 1 23 45 67 89, 0044 20 7946 0958 (8-15 digits, checked below)
    r"|(?<!\d)(?:\+|00)\d{1,3}(?:[ .-]\d{1,4}){2,6}(?!\d)"
    # unseparated: North American (area and exchange codes start with 2-9) and national forms led by one 0
    r"|(?<!\d)1?[2-9]\d{2}[2-9]\d{6}(?!\d)|(?<!\d)0[1-9]\d{8,9}(?!\d))"
)
_PHONE_ONLY = re.compile(r"(?:\+|00)\d{1,3}(?:[ .-]\d{1,4}){2,6}|(?:\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}")
# A dotted quad right after a version word is a version, not an address: "version 1.2.3.4", "v10.0.0.1".
_VERSION_BEFORE = re.compile(r"(?:\b(?:v|version|ver|release|build|rev)\.?\s*)$", re.IGNORECASE)
# Cheap pre-filter: every kind needs a digit or an '@'.
_MAYBE = re.compile(r"[\d@]")
# One scan that finds whether the IBAN or digit-run step can change anything: a match exists exactly when
# _IBAN_HINT or _RUN has one (both are anchored on a digit, which the regex engine scans for quickly).
_DIGIT_STEPS = re.compile(r"\d(?:(?<=[A-Za-z][A-Za-z]\d)\d|[\d ().-]{5,}\d)")
# The same test for ASCII text, faster: each byte mapped to its class (digit '0', run separator 's', letter 'A',
# anything else 'x') in one C pass, then a substring test for the IBAN hint and a literal-led search for a run.
_ASCII_SHAPE = bytes(
    ord("0")
    if 48 <= b <= 57
    else ord("s")
    if chr(b) in " ().-"
    else ord("A")
    if chr(b).isalpha() and b < 128
    else ord("x")
    for b in range(256)
)
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
    """True when an IBAN (any case; spaces or dashes allowed) has its country's length and passes the ISO 13616
    mod-97 checksum."""
    s = text.replace(" ", "").replace("-", "").upper()
    if _IBAN_LENGTHS.get(s[:2]) != len(s) or not s.isalnum() or not s.isascii():
        return False
    moved = s[4:] + s[:4]
    number = "".join(str(int(c, 36)) for c in moved)
    return int(number) % 97 == 1


def _maybe(text: str) -> bool:
    """``_MAYBE.search(text)``, with substring tests for ASCII text (``\\d`` also matches non-ASCII digits)."""
    if text.isascii():
        return (
            "@" in text
            or "0" in text
            or "1" in text
            or "2" in text
            or "3" in text
            or "4" in text
            or "5" in text
            or "6" in text
            or "7" in text
            or "8" in text
            or "9" in text
        )
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
        text = (_EMAIL_ASCII if text.isascii() else _EMAIL).sub(lambda m: _mark(tally, "email"), text)
    if ":" in text and ("::" in text or text.count(":") >= 7):
        text = _IPV6.sub(lambda m: _mark(tally, "ip"), text)
    if not _digit_steps(text):
        return text  # neither an IBAN hint nor a digit run: the two steps below would change nothing
    if _IBAN_HINT.search(text):
        text = _IBAN.sub(lambda m: _redact_iban(m, tally), text)
    return _RUN.sub(lambda m: _redact_run(m, tally), text)


def _mark(tally: Counter, kind: str) -> str:
    tally[kind] += 1
    return f"[{kind.upper()}]"


def _redact_iban(m: re.Match[str], tally: Counter) -> str:
    # as Presidio does: when the whole match fails the checksum, try it without its short tail ("... 00 2 days")
    if iban_ok(m.group(0)):
        return _mark(tally, "iban")
    if m.group("tail") and iban_ok(m.group("body")):
        return _mark(tally, "iban") + m.group("tail")
    return m.group(0)


def _isolated(text: str, start: int, end: int) -> bool:
    """True when text[start:end] is not glued to a letter, digit or underscore (an id's hex is no phone)."""
    return (start == 0 or not (text[start - 1].isalnum() or text[start - 1] == "_")) and (
        end >= len(text) or not (text[end].isalnum() or text[end] == "_")
    )


def _ssn_ok(digits: str) -> bool:
    """The SSA's rules: area not 000, 666 or 9xx; group not 00; serial not 0000; not one digit repeated."""
    area = digits[:3]
    return (
        area not in ("000", "666")
        and area[0] != "9"
        and digits[3:5] != "00"
        and digits[5:] != "0000"
        and digits != digits[0] * 9
    )


def _redact_run(run: re.Match[str], tally: Counter) -> str:
    text, start = run.string, run.start()
    # A leading '+' or '(' belongs to a phone number but is not part of the run; keep it out of the
    # replacement and let the phone pattern see it through the run's own text.
    prefix = text[start - 1] if start and text[start - 1] in "+(" else ""
    offset = start - len(prefix)  # position in ``text`` of the scanned string's first character

    def _sub(m: re.Match[str]) -> str:
        value = m.group(0)
        if m.group("card") is not None:
            digits = value.replace(" ", "").replace("-", "").replace(".", "")
            if luhn_ok(digits):
                return _mark(tally, "card")
            # not a card; a phone number in groups may look like one (0044 20 7946 0958)
            if len(digits) <= 15 and _PHONE_ONLY.fullmatch(value):
                return _mark(tally, "phone")
            return value
        if m.group("ssn") is not None:
            return _mark(tally, "ssn") if _ssn_ok(value[:3] + value[4:6] + value[7:]) else value
        if m.group("ip") is not None:
            # all-single-digit quads (1.2.3.4) and quads after a version word are versions, not addresses
            if len(value) == 7 or _VERSION_BEFORE.search(text, max(0, offset + m.start() - 12), offset + m.start()):
                return value
            return _mark(tally, "ip")
        if not 7 <= sum(c.isdigit() for c in value) <= 15:
            return value
        if not _isolated(text, offset + m.start(), offset + m.end()):
            return value  # a number glued to letters is part of a word, an id or a timestamp, not a phone
        return _mark(tally, "phone")

    out = _DIGIT_KINDS.sub(_sub, prefix + run.group(0))
    return out[len(prefix) :] if prefix and out.startswith(prefix) else out


# ---- identifiers: pseudonymised, not redacted -------------------------------------------------------------
_keys: dict[tuple[str, str, str], bytes] = {}


def pseudonym_key() -> bytes:
    """The pseudonymisation key: ``$FLYWHEEL_PSEUDONYM_KEY``, else the workspace's ``.flywheel/pseudonym.key``
    (created with 32 random bytes the first time; git-ignored). Raises ``ValueError`` naming the setting."""
    env = os.environ.get(PSEUDONYM_KEY_ENV, "")
    where = (env, os.environ.get("FLYWHEEL_ROOT", ""), os.getcwd())
    key = _keys.get(where)
    if key is None:
        key = _keys[where] = _load_key(env)
    return key


def _load_key(env: str) -> bytes:
    from flywheel.settings import SettingsError, find_root

    if env:
        if len(env.strip()) < 32:
            raise ValueError(
                f"{PSEUDONYM_KEY_ENV} is {len(env.strip())} characters; use at least 32 random "
                "characters (e.g. `openssl rand -hex 32`)"
            )
        return env.strip().encode()
    try:
        root = find_root()
    except SettingsError as exc:
        raise ValueError(
            f"no pseudonymisation key: set {PSEUDONYM_KEY_ENV} or run inside a workspace ({exc})"
        ) from None
    path = root / PSEUDONYM_KEY_FILE
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.write_text(secrets.token_hex(32) + "\n")
        tmp.chmod(0o600)
        try:
            os.link(tmp, path)  # atomic and exclusive: two processes creating it at once agree on one key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip().encode()


def contains_personal_data(value: str) -> bool:
    """True when ``redact`` finds any personal data in ``value``."""
    found: Counter = Counter()
    redact(value, found)
    return bool(found)


def pseudonymise_id(value: str | None, counts: Counter | None = None) -> str | None:
    """An identifier as stored: unchanged when it holds no personal data, else ``pid-`` and 32 hex digits of its
    HMAC-SHA256 under ``pseudonym_key()`` (the same id always maps to the same pseudonym; a pseudonym maps to
    itself). Kinds found are tallied in ``counts``. ``flywheel erase`` hashes a given user id with this too."""
    if not value or _PSEUDONYM.fullmatch(value):
        return value
    found: Counter = Counter()
    redact(value, found)
    if not found:
        return value
    if counts is not None:
        counts.update(found)
    digest = hmac.new(pseudonym_key(), value.encode("utf-8"), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:32]
