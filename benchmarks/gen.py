"""Generate a batch of native contract-v1 feedback events as JSONL, for the benchmarks. Deterministic.

    python benchmarks/gen.py 100000 benchmarks/out/events-100000.jsonl [--seed 0]

Each event: 1 to 3 prompt turns and a response of made-up but word-like English prose, about 1 KiB of
text across prompt and response on average (preferences and corrections carry a second, shorter answer);
feedback mixed between thumbs (40%), ratings (30%), preferences (15%) and corrections (15%); about 1% of
events carry one planted e-mail address, phone number or Luhn-valid card number; texts hold ordinary
digits too (years, counts, percentages, versions) that the redactor must leave alone. Event ids are
unique; answers are unique, so the duplicate-answer check passes. Events are written one at a time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

# Common words, roughly by frequency; sampled with Zipf-like weights so texts read like prose statistics.
_WORDS = """
the of and to a in is it you that for on with as be this are was have or your can at by not from
but they if we more an which will their one all there would what so about when up out them do some
also other then into time these only could its how like than first two may use each way make people
water day most very new after should because over good well through long many where much before must
right help back any those even just work keep need small same find still take while start step often
few without own place under again most around check between always never usually next every both give
year part try best simple easy clear sure point plan list note short slowly quickly carefully together
apart later early enough instead rather though although however therefore meanwhile otherwise perhaps
house plant garden kitchen recipe bread pasta sauce onion garlic pepper salt butter flour oven pan heat
minutes hours week month morning evening night weekend holiday travel train station ticket airport
city street map route walk bike car engine tyre brake battery charger phone laptop screen keyboard
file folder backup password account email message letter complaint refund receipt invoice order store
price budget money saving interest loan bank rent bill tax salary job interview company manager team
project deadline meeting report draft review feedback question answer example problem solution reason
idea detail context summary section chapter book library language grammar word sentence paragraph
essay story poem music song guitar piano lesson practice habit routine exercise running stretch muscle
sleep coffee tea breakfast lunch dinner vegetable fruit apple lemon rice beans soup salad cheese milk
doctor symptom fever cough rest medicine dose pharmacy appointment hospital nurse health diet energy
child parent friend neighbour colleague teacher student class school course exam grade homework study
dog cat bird fish pet walk food toy vet training leash noise bark quiet calm gentle patient polite
weather rain snow wind storm summer winter spring autumn temperature degree window door roof wall floor
paint brush colour light lamp bulb switch socket wire fuse tool hammer screw drill glue tape box shelf
clean wash rinse dry fold iron stain soap vinegar bleach cloth sponge bucket mop dust vacuum filter
python code function variable loop error bug test module library package install version update server
database query table column index cache request response client network router signal cable speed
data model chart graph average median percent total count number rate ratio share trend growth range
history science physics chemistry biology planet star moon ocean river mountain forest desert island
government law rule policy vote election citizen council court contract agreement insurance claim form
write read speak listen learn teach explain describe compare choose decide prepare follow avoid reduce
improve increase measure track record share send call visit buy sell pay cook bake boil fry chop mix
stir serve store freeze open close turn press hold move lift carry push pull cut join add remove change
repair replace build design draw plan test run stop wait watch notice remember forget worry relax enjoy
important useful common typical possible likely certain simple difficult cheap expensive safe risky
healthy fresh warm cold hot dry wet soft hard heavy light bright dark quiet loud busy free full empty
local national public private personal general specific main basic extra final whole single double
""".split()
_NAMES = [
    "Alice",
    "Bruno",
    "Chen",
    "Dara",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Imani",
    "Jonas",
    "Keiko",
    "Liam",
    "Maya",
    "Nikos",
    "Olga",
    "Priya",
    "Quentin",
    "Rosa",
    "Sami",
    "Tomas",
]
_UNITS = [
    "minutes",
    "hours",
    "days",
    "weeks",
    "people",
    "items",
    "pages",
    "euros",
    "dollars",
    "grams",
    "litres",
    "metres",
    "kilometres",
    "files",
    "steps",
    "times",
    "tests",
    "rows",
]
_EMAIL_HOSTS = ["example.org", "mail.example.com", "corp.example.net", "example.co.uk"]
_FEEDBACK_WEIGHTS = [("thumbs", 40), ("rating", 30), ("preference", 15), ("correction", 15)]
PII_RATE = 0.01


def _weights(n: int) -> list[float]:
    return [1.0 / (rank + 1) ** 0.9 for rank in range(n)]


class _TextMaker:
    """Word-like prose with punctuation and occasional innocuous numbers."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.words = _WORDS
        self.cum = list(itertools.accumulate(_weights(len(self.words))))

    def _number(self) -> str:
        r = self.rng.random()
        if r < 0.3:
            return f"in {self.rng.randint(1950, 2030)}"
        if r < 0.6:
            return f"{self.rng.randint(2, 500)} {self.rng.choice(_UNITS)}"
        if r < 0.8:
            return f"{self.rng.randint(1, 99)}%"
        if r < 0.9:
            return f"version {self.rng.randint(1, 12)}.{self.rng.randint(0, 20)}"
        return f"{self.rng.randint(1, 9)},{self.rng.randint(0, 999):03d} {self.rng.choice(_UNITS)}"

    def sentence(self) -> str:
        rng = self.rng
        n = rng.randint(6, 22)
        words = rng.choices(self.words, cum_weights=self.cum, k=n)
        if rng.random() < 0.25:
            words.insert(rng.randrange(1, n), self._number())
        if rng.random() < 0.1:
            words.insert(rng.randrange(1, n), rng.choice(_NAMES))
        if n > 10 and rng.random() < 0.4:
            words[rng.randrange(3, n - 3)] += ","
        words[0] = words[0].capitalize()
        return " ".join(words) + rng.choice("....!?")

    def text(self, chars: int) -> str:
        parts, size = [], 0
        while size < chars:
            s = self.sentence()
            parts.append(s)
            size += len(s) + 1
        return " ".join(parts)


def _luhn_complete(prefix: str) -> str:
    """``prefix`` plus the check digit that makes it pass Luhn."""
    total = 0
    for i, ch in enumerate(reversed(prefix)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return prefix + str((10 - total % 10) % 10)


def _pii(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["email", "phone", "card"])
    if kind == "email":
        user = f"{rng.choice(_NAMES).lower()}.{rng.choice(_WORDS)}{rng.randint(1, 99)}"
        return kind, f"You can reach me at {user}@{rng.choice(_EMAIL_HOSTS)} if you need more details."
    if kind == "phone":
        number = rng.choice(
            [
                f"+1 415-555-{rng.randint(0, 9999):04d}",
                f"+44 20 7946 {rng.randint(0, 9999):04d}",
                f"(030) {rng.randint(100, 999)} {rng.randint(1000, 9999)}",
                f"+33 1 {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}",
            ]
        )
        return kind, f"My number is {number}, call me after six."
    digits = _luhn_complete(rng.choice(["4", "51", "37"]) + "".join(str(rng.randint(0, 9)) for _ in range(13)))
    digits = digits[:16] if len(digits) > 16 else digits
    if len(digits) == 16 and rng.random() < 0.7:
        card = " ".join(digits[i : i + 4] for i in range(0, 16, 4))
    else:
        card = digits
    return kind, f"I paid with card {card} and never got a refund."


def events(n: int, seed: int = 0, start: int = 0) -> Iterator[dict]:
    """``n`` events, one at a time; the same ``seed`` gives the same events."""
    rng = random.Random(seed)
    tm = _TextMaker(rng)
    kinds = [k for k, _ in _FEEDBACK_WEIGHTS]
    kind_cum = list(itertools.accumulate(w for _, w in _FEEDBACK_WEIGHTS))
    for i in range(start, start + n):
        # ~1 KiB of text across prompt and response (mean ~1,025 chars): both lengths skewed (gamma).
        prompt_chars = int(rng.gammavariate(3.0, 90.0)) + 10
        response_chars = int(rng.gammavariate(3.0, 210.0)) + 20
        turns = 1 if rng.random() < 0.8 else 3
        if turns == 1:
            prompt = [{"role": "user", "content": tm.text(prompt_chars)}]
        else:
            third = max(prompt_chars // 3, 20)
            prompt = [
                {"role": "user", "content": tm.text(third)},
                {"role": "assistant", "content": tm.text(third)},
                {"role": "user", "content": tm.text(third)},
            ]
        if rng.random() < 0.05:
            prompt.insert(0, {"role": "system", "content": "You are a helpful assistant. Answer clearly."})
        response = tm.text(response_chars)
        if rng.random() < PII_RATE:
            _, planted = _pii(rng)
            if rng.random() < 0.5:
                prompt[-1]["content"] += " " + planted
            else:
                response += " " + planted
        kind = rng.choices(kinds, cum_weights=kind_cum)[0]
        if kind == "thumbs":
            feedback = {"type": "thumbs", "value": "up" if rng.random() < 0.65 else "down"}
        elif kind == "rating":
            feedback = {"type": "rating", "value": rng.choices([1, 2, 3, 4, 5], weights=[8, 10, 17, 30, 35])[0]}
        elif kind == "preference":
            feedback = {"type": "preference", "rejected": tm.text(int(rng.gammavariate(2.0, 150.0)) + 20)}
        else:
            feedback = {"type": "correction", "text": tm.text(int(rng.gammavariate(2.0, 200.0)) + 20)}
        day = 1 + i % 28
        hh, mm, ss = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
        ts = f"2026-{1 + (i // 28) % 12:02d}-{day:02d}T{hh:02d}:{mm:02d}:{ss:02d}"
        r = rng.random()
        ts += "Z" if r < 0.8 else (f".{rng.randint(0, 999):03d}Z" if r < 0.95 else "+02:00")
        event = {
            "schema_version": 1,
            "event_id": f"bench-{seed}-{i:09d}",
            "timestamp": ts,
            "conversation_id": f"conv-{seed}-{i // 3:08d}",
            "model_version": f"flywheel-policy/{1 + i % 4}",
            "prompt": prompt,
            "response": response,
            "user_id": None if rng.random() < 0.1 else f"user-{rng.randint(0, 49999):05d}",
            "feedback": feedback,
        }
        yield event


def write(path: Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` events to ``path`` (JSONL), streaming; written to a temporary name, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8", buffering=1 << 20) as fh:
        for e in events(n, seed):
            fh.write(json.dumps(e, ensure_ascii=False, separators=(",", ":")))
            fh.write("\n")
    tmp.replace(path)
    return path


def cached(workdir: Path, n: int, seed: int = 0) -> Path:
    """The input file for ``n`` events and ``seed`` under ``workdir``, generated once."""
    path = Path(workdir) / f"events-{n}-seed{seed}.jsonl"
    if not path.exists():
        write(path, n, seed)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, help="number of events")
    ap.add_argument("out", type=Path, help="output JSONL file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write(args.out, args.n, args.seed)
    print(f"wrote {args.n} events to {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
