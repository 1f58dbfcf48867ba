"""The service's hot reload of a LoRA version against a full-weight one, on the same base policy (the shipped
SmolLM2-135M unless ``--base``), in one process: seconds and resident memory added by

- loading a full-weight version (``from_pretrained`` of a whole folder in fp32, as the service loads a version:
  what a full version's reload costs), and
- adding an adapter version to the already-loaded shared base (``PeftModel.load_adapter``: what
  service/models.py does for a LoRA version after the first).

Also the adapter's size on disk beside the base's. Adapters are made with params.yaml ``train_policy.lora`` on
the layers above ``train_policy.frozen_layers`` (weights randomised: only sizes and times are measured).

    python benchmarks/bench_adapter_reload.py [--base models/base/policy] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _prefdata import ROOT, params_section


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, default=ROOT / "models" / "base" / "policy")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flywheel.models.dpo import attach_lora
    from pipelines.base_models import build_policy

    torch.set_num_threads(2)
    if not (args.base / "config.json").exists():
        build_policy(args.base)
    recipe = params_section("train_policy").updated(adapter="lora")
    work = Path(tempfile.mkdtemp(prefix="bench-adapter-"))
    for i in range(args.repeat + 1):
        model = attach_lora(AutoModelForCausalLM.from_pretrained(args.base), recipe)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.01)
        model.save_pretrained(work / f"a{i}")
        del model
    size = lambda d: sum(f.stat().st_size for f in Path(d).rglob("*.safetensors")) / 2**20  # noqa: E731

    full_s, full_mb = [], []
    keep = []
    for _ in range(args.repeat):
        before, t0 = rss_mb(), time.perf_counter()
        keep.append(AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval())
        full_s.append(time.perf_counter() - t0)
        full_mb.append(rss_mb() - before)
    del keep
    shared = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(args.base), str(work / "a0"), adapter_name="a0"
    )
    add_s, add_mb = [], []
    for i in range(1, args.repeat + 1):
        before, t0 = rss_mb(), time.perf_counter()
        shared.load_adapter(str(work / f"a{i}"), adapter_name=f"a{i}")
        shared.set_adapter(f"a{i}")
        add_s.append(time.perf_counter() - t0)
        add_mb.append(rss_mb() - before)
    out = {
        "base_mb_on_disk": round(size(args.base), 1),
        "adapter_mb_on_disk": round(size(work / "a0"), 2),
        "adapter_share_of_base": round(size(work / "a0") / size(args.base), 4),
        "full_reload_s_median": round(statistics.median(full_s), 3),
        "full_reload_rss_mb_median": round(statistics.median(full_mb), 1),
        "adapter_reload_s_median": round(statistics.median(add_s), 4),
        "adapter_reload_rss_mb_median": round(statistics.median(add_mb), 2),
        "lora": recipe.lora.model_dump(),
        "trained_layers": f"above {recipe.frozen_layers}",
    }
    print(
        f"adapter {out['adapter_mb_on_disk']} MB on disk = {100 * out['adapter_share_of_base']:.2f}% of the base "
        f"({out['base_mb_on_disk']} MB)\n"
        f"reload, full weights: {out['full_reload_s_median']} s, +{out['full_reload_rss_mb_median']} MB RSS\n"
        f"reload, adapter on the shared base: {out['adapter_reload_s_median']} s, "
        f"+{out['adapter_reload_rss_mb_median']} MB RSS"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
