"""The service's per-row sampling and stopping work on the model's device, not only on the CPU. The ``meta`` device
stands in for an accelerator: mixing its tensors with CPU ones fails as mixing CUDA and CPU tensors does."""

from __future__ import annotations

import torch

from service.generation import _PerRowStop, _Row, _RowSampling


def _rows() -> list[_Row]:
    return [
        _Row(job=None, prompt=[1], max_tokens=4, temperature=0.0, top_p=1.0, live=False),
        _Row(job=None, prompt=[1], max_tokens=4, temperature=0.7, top_p=0.9, live=False),
    ]


def test_row_sampling_follows_the_scores_device():
    scores = torch.zeros(2, 11, device="meta")
    out = _RowSampling(_rows())(torch.zeros(2, 3, dtype=torch.long, device="meta"), scores)
    assert out.device.type == "meta" and out.shape == (2, 11)


def test_row_sampling_on_the_cpu_keeps_greedy_rows_greedy():
    scores = torch.tensor([[0.1, 2.0, 0.3], [0.1, 2.0, 0.3]])
    out = _RowSampling(_rows())(torch.zeros(2, 1, dtype=torch.long), scores)
    assert out[0].tolist() == [float("-inf"), 0.0, float("-inf")]


def test_per_row_stop_answers_on_the_input_device():
    rows = _rows()
    rows[1].done = True
    done = _PerRowStop(rows)(torch.zeros(2, 3, dtype=torch.long, device="meta"), None)
    assert done.device.type == "meta" and done.dtype == torch.bool
