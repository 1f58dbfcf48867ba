"""Log-probabilities already computed, kept across evaluations: per sequence (the token ids of a prompt and an
answer) the trunk's output and each model's answer log-probability.

Measured reason: the margins were most of a loop turn (demo, AMX Xeon: 306 s of turn 1's 409 s evaluation,
451 s of turn 2's 574 s), and most of that work repeats. The golden set never changes, the base model (the
reference) never changes, turn N's champion is turn N-1's challenger, the test split only grows, and the unpaired
test examples are mostly halves of the test pairs. A sequence scored before needs only the new challenger's top
layers on its stored trunk output: about a quarter of a forward pass (6 of 30 layers and the output head).

Keys are hashes: of the token ids (a sequence), of the model's content, the reference's content and the trunk that
computed the hidden states (a score). No text is stored, but trunk outputs are derived from user text: `flywheel
erase` empties the cache (``clear``), as it empties the answer cache. Trunk outputs are kept in their own dtype
(float32 here; bf16 where the trunk runs in bf16), so a stored one is bit-identical to a recomputed one.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are read (`flywheel erase` clears the cache without it)
    import torch

FILE = "scores.sqlite"
SCORE_CACHE = "score-cache"  # the folder under settings.models
_DTYPES = ("float32", "bfloat16", "float16")


def seq_key(prompt: list[int], answer: list[int]) -> str:
    """A sequence's key: its prompt and answer token ids (the tokenizer, template and truncation are in them)."""
    h = hashlib.sha256(np.asarray(prompt, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(answer, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


class ScoreCache:
    """Answer log-probabilities per (score key, sequence key) and trunk outputs per (trunk key, sequence key).

    ``folder`` None: kept in memory for this process only (an evaluation still scores a sequence it meets twice
    once: a test pair's halves are unpaired test examples too). ``max_trunk_bytes``: trunk outputs stop being
    stored past it (a 7B model's hidden states are large; 0 stores none); scores are always stored.
    """

    def __init__(self, folder: Path | None, max_trunk_bytes: int = 0):
        self.max_trunk_bytes = max_trunk_bytes
        self.memory: dict[tuple[str, str], float] = {}
        self.db: sqlite3.Connection | None = None
        self.trunk_bytes = 0
        self.hits = {"scores": 0, "trunks": 0}
        self.computed = {"scores": 0, "trunks": 0}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(folder / FILE, timeout=60)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS scores (model TEXT, seq TEXT, logp REAL, PRIMARY KEY (model, seq))"
            )
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS trunks (trunk TEXT, seq TEXT, dtype TEXT, length INTEGER, "
                "width INTEGER, data BLOB, PRIMARY KEY (trunk, seq))"
            )
            self.trunk_bytes = self.db.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM trunks").fetchone()[0]

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    # ---- scores ------------------------------------------------------------------------------------------------
    def scores(self, model: str, seqs: list[str]) -> dict[str, float]:
        """The known log-probabilities of ``seqs`` under the score key ``model``."""
        found = {s: self.memory[(model, s)] for s in seqs if (model, s) in self.memory}
        rest = [s for s in dict.fromkeys(seqs) if s not in found]
        if self.db is not None and rest and not model.startswith("mem:"):
            for i in range(0, len(rest), 500):
                chunk = rest[i : i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self.db.execute(
                    f"SELECT seq, logp FROM scores WHERE model = ? AND seq IN ({marks})", [model, *chunk]
                )
                for s, lp in rows:
                    found[s] = lp
                    self.memory[(model, s)] = lp
        return found

    def put_scores(self, model: str, values: dict[str, float]) -> None:
        for s, lp in values.items():
            self.memory[(model, s)] = lp
        self.computed["scores"] += len(values)
        if self.db is not None and values and not model.startswith("mem:"):
            with self.db:
                self.db.executemany(
                    "INSERT OR REPLACE INTO scores VALUES (?, ?, ?)", [(model, s, lp) for s, lp in values.items()]
                )

    # ---- trunk outputs -----------------------------------------------------------------------------------------
    def trunks(self, trunk: str, seqs: list[str]) -> dict[str, torch.Tensor]:
        """Stored trunk outputs (length, width) of ``seqs`` under the trunk key ``trunk``."""
        if self.db is None or not self.max_trunk_bytes or not seqs:
            return {}
        import torch

        found = {}
        marks = ",".join("?" * len(seqs))
        rows = self.db.execute(
            f"SELECT seq, dtype, length, width, data FROM trunks WHERE trunk = ? AND seq IN ({marks})", [trunk, *seqs]
        )
        for s, dtype, length, width, data in rows:
            raw = torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype))
            found[s] = raw.reshape(length, width)
        self.hits["trunks"] += len(found)
        return found

    def put_trunks(self, trunk: str, values: dict[str, torch.Tensor]) -> None:
        """Store trunk outputs (length, width), while the store is under its size limit."""
        self.computed["trunks"] += len(values)
        if self.db is None or not self.max_trunk_bytes:
            return
        import torch

        rows = []
        for s, t in values.items():
            t = t.detach().to("cpu").contiguous()
            name = str(t.dtype).removeprefix("torch.")
            if name not in _DTYPES:
                continue
            data = t.view(torch.uint8).numpy().tobytes()
            if self.trunk_bytes + len(data) > self.max_trunk_bytes:
                break
            self.trunk_bytes += len(data)
            rows.append((trunk, s, name, t.shape[0], t.shape[1], data))
        if rows:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO trunks VALUES (?, ?, ?, ?, ?, ?)", rows)


HEAD_NAMES = ("lm_head.weight", "embed_out.weight")  # output heads that ``tie_word_embeddings`` ties to the input


def _safetensors_digests(path: Path) -> dict[str, str]:
    """Per tensor of a safetensors file: its dtype, shape and a hash of its bytes (read from the header's offsets,
    without torch: a tensor's content, whatever the file's layout, metadata or sharding)."""
    import json
    import mmap

    out = {}
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        start = 8 + size
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                lo, hi = info["data_offsets"]
                digest = hashlib.sha256(mm[start + lo : start + hi]).hexdigest()
                out[name] = f"{info['dtype']}{info['shape']}:{digest}"
    return out


def weights_hash(folder: Path) -> str:
    """A hash of a model's weights (and an adapter's config): the scores' model key. Not the folder's content hash:
    the registry's copy of a version re-saves its files (MLflow's transformers flavor drops two tokenizer-config
    keys, and writes a tied output head once where the challenger's folder held a copy of it), which changes no
    log-probability (the token ids are in the sequence key). Safetensors are hashed per tensor (name, dtype, shape,
    bytes), so sharding, file metadata and an output head stored beside the embedding it equals do not count;
    other weight files by their bytes."""
    folder = Path(folder)
    names = ("*.safetensors", "*.bin", "*.pt", "adapter_config.json")
    files = sorted({f for pattern in names for f in folder.rglob(pattern) if f.is_file()})
    if not files:
        raise FileNotFoundError(f"no weight files in {folder}")
    h = hashlib.sha256()
    tensors: dict[str, str] = {}
    for f in files:
        rel = f.relative_to(folder)
        if f.suffix == ".safetensors":
            for name, digest in _safetensors_digests(f).items():
                tensors[f"{rel.parent}/{name}"] = digest
            continue
        h.update(str(rel).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    stored = {digest for name, digest in tensors.items() if not name.endswith(HEAD_NAMES)}
    for name in sorted(tensors):
        if name.endswith(HEAD_NAMES) and tensors[name] in stored:
            continue  # a tied head written out: the same weights as the embedding it equals
        h.update(f"{name}={tensors[name]}".encode())
    return h.hexdigest()


VOLATILE_KEYS = ("is_local", "local_files_only")  # written by some loaders of a tokenizer, dropped by others


def answers_hash(folder: Path, weights: str | None = None) -> str:
    """A hash of what a model's greedy answers depend on: its weights and every other file, JSON files read with
    the keys some loaders add or drop (``VOLATILE_KEYS``) left out, so the registry's copy of a version shares its
    answer-cache entries with the challenger folder it was registered from. ``weights``: the folder's
    ``weights_hash`` when the caller has it (reading the weights once)."""
    import json

    h = hashlib.sha256((weights or weights_hash(folder)).encode())
    weights = ("*.safetensors", "*.bin", "*.pt")
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        if any(f.match(w) for w in weights):
            continue
        h.update(str(f.relative_to(folder)).encode())
        data = f.read_bytes()
        if f.suffix == ".json":
            try:
                obj = json.loads(data)
                if isinstance(obj, dict):
                    obj = {k: v for k, v in obj.items() if k not in VOLATILE_KEYS}
                data = json.dumps(obj, sort_keys=True).encode()
            except ValueError:
                pass
        h.update(data)
    return h.hexdigest()


def trunk_key(model, k: int) -> str:
    """The key of a model's trunk outputs: its frozen part's fingerprint, dtype (a bf16 trunk computes other
    numbers), split and device type."""
    from flywheel.models.policy import decoder_layers, device_of, param_dtype, trunk_fingerprint

    dtype = str(param_dtype(decoder_layers(model)[0].get_input_embeddings())).removeprefix("torch.")
    return f"{trunk_fingerprint(model, k)}-{dtype}-k{k}-{device_of(model).type}"


def trunk_rows(
    cache: ScoreCache | None, memo: dict, src, key: str, k: int, seqs: list[tuple[str, tuple]], pad_id: int
) -> list:
    """Trunk outputs (length, width) of ``seqs`` ((sequence key, (prompt ids, answer ids)) each) by ``src``'s
    trunk (key ``key``), in its top layers' dtype: from ``memo`` (this run's, filled), else the cache, else one
    trunk pass over the rest (stored in the cache, in the trunk's own dtype: lossless)."""
    from flywheel.models.packing import make_batch, split
    from flywheel.models.policy import decoder_layers, device_of, param_dtype, run_trunk

    top_dt = param_dtype(decoder_layers(src)[1][k])
    dev = device_of(src)
    lacking = [s for s, _ in seqs if s not in memo]
    if lacking and cache is not None:
        memo.update({s: t.to(dev, top_dt) for s, t in cache.trunks(key, lacking).items()})
    lacking = [(s, seq) for s, seq in seqs if s not in memo]
    if lacking:
        batch = make_batch(src, k, [seq for _, seq in lacking], pad_id)  # a pair's prompt runs once
        rows = split(run_trunk(src, batch, k), batch)
        new = {s: rows[b] for b, (s, _) in enumerate(lacking)}
        if cache is not None:
            stored = param_dtype(decoder_layers(src)[0].get_input_embeddings())
            cache.put_trunks(key, {s: t.to(stored) for s, t in new.items()})
        memo.update(new)
    return [memo[s] for s, _ in seqs]


class CachedRewards:
    """A reward model whose ``score`` reads known rewards from the cache and keeps new ones (key: the model's
    ``answers_hash``, which covers its weights and its max length; a sequence is the text the model reads). A
    champion reward model scored the golden set and the older test pairs when it was the challenger. Everything
    else is the wrapped model's."""

    def __init__(self, model, key: str, cache: ScoreCache):
        self.model, self.key, self.cache = model, f"reward-{key[:32]}", cache

    def score(self, prompts: list[list[dict]], answers: list[str], batch_size: int = 32) -> list[float]:
        texts = [self.model.text(p, a) for p, a in zip(prompts, answers)]
        keys = [hashlib.sha256(t.encode()).hexdigest()[:32] for t in texts]
        known = self.cache.scores(self.key, keys)
        self.cache.hits["scores"] += len(known)
        todo = [i for k, i in {k: i for i, k in reversed(list(enumerate(keys)))}.items() if k not in known]
        if todo:
            new = self.model.score([prompts[i] for i in todo], [answers[i] for i in todo], batch_size)
            fresh = {keys[i]: v for i, v in zip(todo, new)}
            self.cache.put_scores(self.key, fresh)
            known.update(fresh)
        return [known[k] for k in keys]

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def clear(folder: Path) -> int:
    """Remove the cache's files (``flywheel erase``); returns how many were removed."""
    files = sorted(folder.glob(FILE + "*")) if folder.is_dir() else []
    for f in files:
        f.unlink()
    return len(files)
