"""One generate call for a batch of chat jobs: per-row temperature, top-p and length, streamed token by token,
best-of candidates reranked by the reward model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from flywheel.models.policy import device_of, end_token, prompt_ids
from service.batching import Job


@dataclass
class Answer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model_version: str
    candidates: int = 1


@dataclass
class _Row:
    job: Job
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    live: bool  # streams its deltas (a single-candidate stream)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    finish: str = "length"


class _RowSampling(LogitsProcessor):
    """Each row's own temperature and top-p; temperature 0 is greedy."""

    def __init__(self, rows: list[_Row]):
        self.temp = torch.tensor([r.temperature for r in rows]).unsqueeze(1)
        self.top_p = torch.tensor([r.top_p for r in rows]).unsqueeze(1)

    def __call__(self, input_ids, scores):
        scores = scores.float()
        temp, top_p = self.temp.to(scores.device), self.top_p.to(scores.device)  # the model's device
        greedy = temp == 0
        scaled = scores / torch.where(greedy, torch.ones_like(temp), temp)
        probs = scaled.softmax(-1)
        sorted_p, order = probs.sort(-1, descending=True)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) > top_p  # keeps at least the top token
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
        best = torch.full_like(scores, float("-inf")).scatter(1, scores.argmax(-1, keepdim=True), 0.0)
        return torch.where(greedy, best, scaled)


class _Streamer(BaseStreamer):
    """Receives each step's tokens for the whole batch; tracks per-row stops and streams text deltas."""

    def __init__(self, tok, rows: list[_Row], stops: set[int]):
        self.tok, self.rows, self.stops, self.prompt_seen = tok, rows, stops, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, t in zip(self.rows, value.tolist()):
            if row.done:
                continue
            if t in self.stops:
                row.done, row.finish = True, "stop"
                continue
            row.ids.append(t)
            if len(row.ids) >= row.max_tokens:
                row.done = True
            if row.live:
                text = self.tok.decode(row.ids, skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > len(row.text):  # a whole character is out
                    row.job.emit(text[len(row.text) :])
                    row.text = text

    def end(self):
        for row in self.rows:
            if row.live:
                text = self.tok.decode(row.ids, skip_special_tokens=True)
                if len(text) > len(row.text):
                    row.job.emit(text[len(row.text) :])
                    row.text = text


class _PerRowStop(StoppingCriteria):
    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def run_batch(jobs: list[Job], policy, reward, max_prompt: int, best_of_temperature: float) -> None:
    """Answer ``jobs`` with one generate call of ``policy`` (a loaded model slot); each job is finished
    (or failed) through its own futures. ``reward`` (a slot or None) reranks best-of candidates."""
    model, tok, version = policy.model, policy.tok, policy.version
    if policy.adapter:  # a LoRA version on the shared base: its adapter answers this batch
        model.set_adapter(policy.adapter)
    positions = getattr(model.config, "max_position_embeddings", None) or 10**9
    rows: list[_Row] = []
    for job in jobs:
        job.begin(version)
        max_tokens = min(job.max_tokens, positions // 2)  # prompt and answer must fit the model's positions
        ids = prompt_ids(tok, job.messages, min(max_prompt, positions - max_tokens))
        temp = job.temperature if job.copies == 1 or job.temperature > 0 else best_of_temperature
        for _ in range(job.copies):
            rows.append(_Row(job, ids, max_tokens, temp, job.top_p, live=job.stream and job.copies == 1))
    width = max(len(r.prompt) for r in rows)
    pad = tok.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r.prompt) :] = torch.tensor(r.prompt)
        att[b, width - len(r.prompt) :] = 1
    stops = {end_token(tok), tok.eos_token_id}
    dev = device_of(model)
    model.generate(
        input_ids=ids.to(dev),
        attention_mask=att.to(dev),
        max_new_tokens=max(r.max_tokens for r in rows),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=pad,
        eos_token_id=sorted(stops),
        logits_processor=LogitsProcessorList([_RowSampling(rows)]),
        stopping_criteria=StoppingCriteriaList([_PerRowStop(rows)]),
        streamer=_Streamer(tok, rows, stops),
    )
    i = 0
    for job in jobs:
        group, i = rows[i : i + job.copies], i + job.copies
        texts = [r.text if r.live else tok.decode(r.ids, skip_special_tokens=True) for r in group]
        best = 0
        if len(group) > 1 and reward is not None:
            scores = reward.model.score([job.messages] * len(group), [t.strip() or "(empty)" for t in texts])
            best = max(range(len(group)), key=scores.__getitem__)
        if job.stream and not group[best].live:
            job.emit(texts[best].strip())
        row = group[best]
        job.finish(
            Answer(
                texts[best] if row.live else texts[best].strip(),
                row.finish,
                len(row.prompt),
                len(row.ids),
                version,
                len(group),
            )
        )
