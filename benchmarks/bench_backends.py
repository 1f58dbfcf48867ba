"""The two training back-ends against each other and against plain TRL, in the same process, on the same data,
steps and LoRA adapter (params.yaml ``train_policy.lora`` on the layers above ``frozen_layers``):

- ``fast``: Flywheel's trunk-cached loop (``train_policy.backend: fast``, ``adapter: lora``);
- ``trl``: Flywheel's TRL path (``backend: trl``: flywheel/models/trl_backend.py);
- ``plain TRL``: TRL's DPOTrainer / KTOTrainer as a user would call it on the same text, with the same config
  values and the same LoRA config passed as ``peft_config``: what the trl path must not be slower than (it adds no
  overhead: within 10% of plain TRL's seconds per step).

For DPO and KTO (``--methods``) it prints seconds per step (the first step, which precomputes the reference
log-probabilities, left out), training tokens per second, and the held-out preference accuracy of the implicit
reward against the base model after the same number of steps (the shipped HH-RLHF test split).

``--random-model 0.5b`` times a randomly initialised Qwen2-style model of ~0.55B parameters on synthetic text
instead (no accuracy: the weights are random), on the GPU when there is one: the tokens/s figure of
benchmarks/README "On a GPU".

    python benchmarks/bench_backends.py [--steps 12] [--methods dpo,kto] [--json out.json]
    python benchmarks/bench_backends.py --random-model 0.5b --steps 10 --methods dpo,kto
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from _prefdata import ROOT, params_section, prepared_sets

SIZES = {  # hidden, intermediate, layers, heads, kv heads
    "0.5b": (1024, 5504, 28, 16, 4),  # ~0.55B parameters
    "tiny": (64, 128, 4, 4, 2),  # a smoke run of this benchmark on a CPU
}


def random_model(folder: Path, size: str) -> Path:
    """A Qwen2-style model of ``size`` with random weights and the tests' small tokenizer (no hub)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from devkit.tiny_models import build_tokenizer

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    tok = build_tokenizer()
    hidden, inter, layers, heads, kv = SIZES[size]
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def synthetic_rows(n: int, method: str, seed: int = 0) -> list[dict]:
    """Dialogues of ~100 words and answers of ~30 from the tests' vocabulary (length matters here, not sense)."""
    from devkit.tiny_models import CORPUS

    words = " ".join(CORPUS[:9]).split()
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": text(100)}]
        if method == "kto":
            rows.append({"prompt": prompt, "answer": text(30), "desirable": i % 2 == 0})
        else:
            rows.append({"prompt": prompt, "chosen": text(30), "rejected": text(30)})
    return rows


class _Timer:
    def __init__(self):
        self.stamps: list[float] = []

    def callback(self):
        from transformers import TrainerCallback

        stamps = self.stamps

        class Stamp(TrainerCallback):
            def on_step_end(self, *_, **__):
                stamps.append(time.perf_counter())

        return Stamp()

    def per_step(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]  # the first step (precompute) left out


def plain_trl(base: Path, dataset, recipe, method: str, device: str) -> tuple[object, list[float]]:
    """TRL's trainer as a user calls it: the model folder loaded, a LoRA ``peft_config``, the config values."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from flywheel.models.dpo import lora_config

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    lora: LoraConfig = lora_config(model, recipe)  # the same LoRA (target modules, layers), as a user writes it
    cuda = device.startswith("cuda")
    common = dict(
        max_steps=recipe.steps,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.lr,
        beta=recipe.beta,
        lr_scheduler_type="linear",
        warmup_steps=recipe.warmup_steps,
        max_grad_norm=recipe.max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=recipe.seed,
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,
        precompute_ref_log_probs=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    timer = _Timer()
    with tempfile.TemporaryDirectory() as out:
        if method == "kto":
            args = KTOConfig(output_dir=out, **common)
            trainer = KTOTrainer(
                model=model,
                args=args,
                train_dataset=dataset,
                processing_class=tok,
                peft_config=lora,
                callbacks=[timer.callback()],
            )
        else:
            args = DPOConfig(output_dir=out, loss_type=["sigmoid"], **common)
            trainer = DPOTrainer(
                model=model,
                args=args,
                train_dataset=dataset,
                processing_class=tok,
                peft_config=lora,
                callbacks=[timer.callback()],
            )
        trainer.train()
    return trainer.model, timer.per_step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--methods", default="dpo,kto")
    ap.add_argument("--arms", default="fast,trl,plain")
    ap.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (bench_policy.py's LoRA arm)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "pref")
    ap.add_argument("--base", type=Path, default=ROOT / "models" / "base" / "policy")
    ap.add_argument("--random-model", choices=sorted(SIZES), default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--test-pairs", type=int, default=0, help="score the first N held-out pairs (0: all)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from flywheel.evaluation.policy_eval import implicit_margins
    from flywheel.evaluation.stats import correct_from_margin, mean_ci
    from flywheel.models import trl_backend
    from flywheel.models.dpo import attach_lora, train_dpo, train_kto
    from flywheel.models.policy import best_device, encode, load_policy

    device = best_device()
    if device == "cpu":
        torch.set_num_threads(2)
    recipe = params_section("train_policy").updated(
        adapter="lora", lr=args.lr, steps=args.steps, sft_weight=0.0, backend="trl"
    )
    if args.batch_size:
        recipe = recipe.updated(batch_size=args.batch_size)
    evalp = params_section("evaluate").updated(frozen_layers=recipe.frozen_layers)
    n = recipe.steps * recipe.batch_size
    if args.random_model:
        base = random_model(ROOT / "benchmarks" / "out" / f"random-{args.random_model}", args.random_model)
        recipe = recipe.updated(frozen_layers=0)  # LoRA on every layer: a GPU's usual set-up
        data = {m: (synthetic_rows(n, m), []) for m in args.methods.split(",")}
    else:
        from pipelines.base_models import build_policy
        from pipelines.prepare import read_set

        base = args.base
        if not (base / "model.safetensors").exists():
            build_policy(base)
        prepared = prepared_sets(args.work)
        test = read_set(prepared, "pairs", "test")
        test = test[: args.test_pairs] if args.test_pairs else test
        data = {
            "dpo": (read_set(prepared, "pairs", "train")[:n], test),
            "kto": (read_set(prepared, "kto", "train")[:n], test),
        }
    reference, tok = load_policy(base, device=device)
    params_m = sum(p.numel() for p in reference.parameters()) / 1e6
    print(
        f"device {device}; base {base.name} ({params_m:.0f}M params); {recipe.steps} steps of {recipe.batch_size}; "
        f"LoRA r={recipe.lora.r} on layers >= {recipe.frozen_layers}"
    )
    results = {}
    for method in args.methods.split(","):
        rows, test = data[method]
        r = recipe.updated(method=method)
        fields = ("answer",) if method == "kto" else ("chosen", "rejected")
        enc = encode(tok, rows, r.max_prompt_tokens, r.max_answer_tokens, fields=fields)
        flags = [bool(x["desirable"]) for x in rows] if method == "kto" else None
        tokens_per_item = statistics.mean(len(e.prompt) * len(e.answers) + sum(map(len, e.answers)) for e in enc)
        for arm in args.arms.split(","):
            model = load_policy(base, device=device)[0]
            timer = _Timer()
            if arm == "plain":
                model, per_step = plain_trl(
                    base, trl_backend.policy_dataset(tok, enc, method, flags), r, method, device
                )
                model = model.merge_and_unload()
            else:
                model = attach_lora(model, r)
                if arm == "trl":
                    trl_backend.train_policy(model, tok, enc, r, flags, callbacks=[timer.callback()])
                    per_step = timer.per_step()
                else:
                    stamps: list[float] = []
                    fast = r.updated(backend="fast", frozen_bf16=device != "cpu" or r.frozen_bf16)
                    on = lambda s, row: stamps.append(time.perf_counter())  # noqa: E731
                    if method == "kto":
                        train_kto(model, enc, flags, [], tok.pad_token_id, fast, on)
                    else:
                        train_dpo(model, enc, [], tok.pad_token_id, fast, on)
                    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
                model = model.merge_and_unload()
            s = statistics.mean(per_step)
            row = {"seconds_per_step": round(s, 3), "tokens_per_second": round(tokens_per_item * r.batch_size / s, 1)}
            if test:
                model.float()
                m = implicit_margins(reference, {"m": model}, tok, test, evalp)["m"]
                acc = mean_ci(correct_from_margin(m))
                row.update(
                    accuracy=round(acc["value"], 4), accuracy_ci95=[round(x, 4) for x in acc["ci"]], test_pairs=acc["n"]
                )
            results[f"{method}/{arm}"] = row
            shown = f", held-out accuracy {row['accuracy']:.3f} {row['accuracy_ci95']}" if test else ""
            print(f"{method:>3} {arm:>5}: {s:6.2f} s/step, {row['tokens_per_second']:8.0f} tokens/s{shown}", flush=True)
            del model
        if {"trl", "plain"} <= set(args.arms.split(",")):
            ratio = results[f"{method}/trl"]["seconds_per_step"] / results[f"{method}/plain"]["seconds_per_step"]
            results[f"{method}/trl_over_plain"] = round(ratio, 3)
            print(f"{method:>3} trl / plain TRL s/step: {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
