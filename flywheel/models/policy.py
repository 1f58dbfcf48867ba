"""The policy (any causal LM with a chat template: SmolLM2, Qwen, Llama, Gemma, Phi-3, ...) split into a frozen
trunk and a trainable top.

Every policy Flywheel trains keeps the lower ``frozen_layers`` layers (and the embeddings) of the
base model. So the trunk's output for a sequence is the same for the reference, the champion and
the challenger: it is computed once per batch and shared, which is what makes DPO and held-out
scoring affordable on a CPU. Log-probabilities are computed only at answer positions.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flywheel.models.device import best_device  # noqa: F401  (re-exported: callers read it here)
from flywheel.registry import base_hash  # noqa: F401  (re-exported: the base an adapter records)


class UnsupportedModel(ValueError):
    """A policy model Flywheel cannot split into a frozen trunk and a trained top (or has no chat template)."""


ADAPTER_INFO = "flywheel_adapter.json"  # in an adapter version: the base model it was trained on


def is_adapter(folder: Path | str) -> bool:
    """Whether a policy folder holds a PEFT adapter (adapter-only weights on a base model) rather than a model."""
    return (Path(folder) / "adapter_config.json").is_file()


def adapter_base(folder: Path | str, base: Path | str | None) -> Path:
    """The base model folder an adapter version loads on: ``base`` (the workspace's ``models/base/policy``),
    checked against the base content hash the adapter records; a clear error when it is missing or another."""
    info_file = Path(folder) / ADAPTER_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if base is None:
        raise UnsupportedModel(
            f"{folder} is a LoRA adapter: it loads on its base model ({info.get('base_source', 'unknown')}); "
            "pass the base folder (models/base/policy)"
        )
    base = Path(base)
    if not base.is_dir():
        raise FileNotFoundError(
            f"the adapter {folder} needs its base model, and {base} does not exist (dvc repro base_models)"
        )
    want, have = info.get("base_hash"), base_hash(base) if info.get("base_hash") else None
    if want and have != want:
        raise UnsupportedModel(
            f"the adapter {folder} was trained on base {info.get('base_source')} (sha256 {want[:12]}), but {base} "
            f"holds another model (sha256 {have[:12]}): set models.policy.source back, or retrain"
        )
    return base


def load_policy(
    folder: Path | str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    base: Path | str | None = None,
    trainable_adapter: bool = False,
    four_bit: bool = False,
):
    """(model, tokenizer) from a saved folder, on ``device``. An adapter version loads on ``base``: merged into it
    (a plain model, as a full version loads), or, with ``trainable_adapter``, as a PEFT model whose adapter
    training continues. ``four_bit``: the weights quantized to 4 bits on load (QLoRA's NF4; CUDA only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load: dict = {"dtype": dtype}
    if four_bit:
        load = four_bit_load(device)

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise UnsupportedModel(
            f"the tokenizer of {folder} has no chat template: set models.policy.chat_template in params.yaml"
        )
    if is_adapter(folder):
        from peft import PeftModel

        root = adapter_base(folder, base)
        model = AutoModelForCausalLM.from_pretrained(root, **load)
        if four_bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = PeftModel.from_pretrained(model, str(folder), is_trainable=trainable_adapter)
        if not trainable_adapter:
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, **load)
        if four_bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if not four_bit:  # a 4-bit model is placed on the GPU as it loads, and cannot move
        model.to(device)
    model.eval()
    return model, tok


def four_bit_load(device: str) -> dict:
    """``from_pretrained`` arguments for a 4-bit (NF4, bf16 compute) base, as QLoRA trains on; a clear error where it
    cannot run: bitsandbytes' 4-bit layers need a CUDA GPU."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        raise UnsupportedModel(
            "train_policy.adapter: qlora needs a CUDA GPU (bitsandbytes' 4-bit layers); this machine has none: "
            "use adapter: lora"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise UnsupportedModel(
            "train_policy.adapter: qlora needs the bitsandbytes package: pip install bitsandbytes"
        ) from exc
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    return {"quantization_config": quant, "dtype": torch.bfloat16, "device_map": {"": torch.cuda.current_device()}}


def end_token(tok) -> int:
    """The token that closes an assistant turn, read off the chat template: the first special token the template
    puts after an assistant message's text (``<|im_end|>`` for SmolLM2, ``<end_of_turn>`` for Gemma, ``<|end|>``
    for Phi-3, ``<|eot_id|>`` for Llama 3); the tokenizer's end-of-sequence token when the template puts none."""
    cached = getattr(tok, "_flywheel_end_token", None)
    if cached is not None:
        return cached
    found = tok.eos_token_id
    marker = "Zq7 marker answer"
    try:
        text = tok.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a template that cannot render an assistant turn: fall back to end-of-sequence
        text = ""
    at = text.rfind(marker)
    if at >= 0:
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        for i in tok(text[at + len(marker) :], add_special_tokens=False)["input_ids"]:
            if i in special:
                found = i
                break
    if found is None:
        raise UnsupportedModel(
            "the policy tokenizer has neither an end-of-turn token in its chat template nor an eos token"
        )
    try:
        tok._flywheel_end_token = found
    except AttributeError:
        pass
    return found


def prompt_ids(tok, messages: list[dict], max_tokens: int) -> list[int]:
    """The chat-template rendering of ``messages`` up to the assistant's turn, keeping its last tokens."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)[-max_tokens:]


def answer_ids(tok, text: str, max_tokens: int) -> list[int]:
    """At most ``max_tokens`` ids of an answer. Only an answer that ends within the budget gets the end-of-turn
    token: a cut one must not teach (or score) stopping mid-sentence, so it keeps ``max_tokens`` text tokens."""
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if len(ids) < max_tokens:
        return ids + [end_token(tok)]
    return ids[:max_tokens]


@dataclass
class Encoded:
    prompt: list[int]
    answers: list[list[int]]  # chosen, rejected (or a single SFT completion)


def encode(tok, records: list[dict], max_prompt: int, max_answer: int, fields=("chosen", "rejected")) -> list[Encoded]:
    return [
        Encoded(prompt_ids(tok, r["prompt"], max_prompt), [answer_ids(tok, r[f], max_answer) for f in fields])
        for r in records
    ]


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) right-padded
    attention: torch.Tensor  # (B, T)
    target_pos: torch.Tensor  # (N,) flat positions (b * T + t) whose next token is an answer token
    targets: torch.Tensor  # (N,) the answer tokens
    seq_of_target: torch.Tensor  # (N,) which sequence each target belongs to
    layout: list[tuple[int, int, int, int]] | None = None  # per sequence: row, prompt length, answer start, length
    position_ids: torch.Tensor | None = None  # (B, T): packed rows only (flywheel/models/packing.py)
    segments: torch.Tensor | None = None  # (B, T) packed rows: 0 the prompt, s the s-th answer, -1 padding

    @property
    def n_seqs(self) -> int:
        return len(self.layout) if self.layout is not None else self.ids.shape[0]

    def forward_args(self, model, dtype: torch.dtype, dev) -> dict:
        """The attention arguments of a forward pass over this batch: the padding mask, or for packed rows (answers
        sharing their prompt) a 4D mask where an answer sees the prompt and itself, and the positions each answer
        would have alone. SDPA takes a boolean mask; other attention code adds a float one to its scores."""
        if self.segments is None:
            return {"attention_mask": self.attention.to(dev)}
        seg = self.segments.to(dev)
        width = seg.shape[1]
        query, key = seg[:, :, None], seg[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        allowed = causal & (key >= 0) & ((key == 0) | (key == query))
        allowed |= (query < 0) & (torch.arange(width, device=dev) == 0)  # a padding query sees token 0: no NaN
        if getattr(causal_lm(model).config, "_attn_implementation", "") != "sdpa":
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
        return {"attention_mask": allowed[:, None], "position_ids": self.position_ids.to(dev)}


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Sequences of (prompt, answer) token ids into one right-padded batch."""
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    pos, tgt, which = [], [], []
    for b, (p, a) in enumerate(seqs):
        full = p + a
        ids[b, : len(full)] = torch.tensor(full)
        att[b, : len(full)] = 1
        for j in range(len(a)):
            pos.append(b * width + len(p) + j - 1)
            tgt.append(a[j])
            which.append(b)
    layout = [(b, len(p), len(p), len(a)) for b, (p, a) in enumerate(seqs)]
    return Batch(ids, att, torch.tensor(pos), torch.tensor(tgt), torch.tensor(which), layout)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the trunk's output is known."""


class _PassThrough(nn.Module):
    """Stands in for a trunk layer while the top layers run on a cached trunk output: returns its input."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def param_dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def causal_lm(model):
    """The transformers model under a PEFT wrapper (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model) -> tuple[nn.Module, nn.ModuleList]:
    """(the decoder stack, its list of layers): found the same way for Llama, Qwen2/3, Mistral, Gemma, Phi-3,
    GPT-NeoX and the other decoders transformers builds alike; a clear error for one it does not."""
    lm = causal_lm(model)
    kind = getattr(lm.config, "model_type", type(lm).__name__)
    try:
        decoder = lm.get_decoder()
    except Exception as exc:  # transformers raises several types for a model without a decoder rule
        raise UnsupportedModel(f"policy architecture {kind!r}: no decoder stack found ({exc})") from exc
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModel(
            f"policy architecture {kind!r}: its decoder has no `layers` list, so Flywheel cannot split it into a "
            "frozen trunk and trained top layers (supported: Llama, Qwen2/3, Mistral, Gemma, Phi-3, GPT-NeoX and "
            "decoders built like them)"
        )
    return decoder, layers


def check_frozen_layers(model, k: int, setting: str = "train_policy.frozen_layers") -> None:
    """``k`` must leave at least one layer to train."""
    n = len(decoder_layers(model)[1])
    if not 0 <= k < n:
        raise ValueError(f"{setting} is {k}, but the policy has {n} layers: set it to 0..{n - 1}")


@contextmanager
def _skipping(layers: nn.ModuleList, k: int):
    """Layers ``[0, k)`` replaced by pass-throughs for the duration (the top runs on a cached trunk output)."""
    saved = [layers[i] for i in range(k)]
    try:
        for i in range(k):
            layers[i] = _PassThrough(saved[i])
        yield
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


def run_trunk(model, batch: Batch, k: int) -> torch.Tensor:
    """The hidden states after the embeddings and the lower ``k`` layers (call under ``torch.no_grad`` when they
    are frozen), by the model's own forward stopped after layer ``k``: masks, positions and rotary embeddings are
    the model's. It runs in the trunk's dtype; the output comes back in the dtype of the layers above it."""
    decoder, layers = decoder_layers(model)
    dev = device_of(model)
    top_dt = param_dtype(layers[k]) if k < len(layers) else param_dtype(decoder)
    ids = batch.ids.to(dev)
    if k == 0:
        return decoder.get_input_embeddings()(ids).to(top_dt)
    extra = batch.forward_args(model, param_dtype(decoder.get_input_embeddings()), dev)
    got: list[torch.Tensor] = []

    def grab(_module, _args, output):
        got.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = layers[k - 1].register_forward_hook(grab)
    try:
        decoder(input_ids=ids, use_cache=False, **extra)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0].to(top_dt)


def top_logits(model, hidden: torch.Tensor, batch: Batch, k: int) -> torch.Tensor:
    """Logits at the answer positions (N, vocab): the layers above ``k`` (and the final norm, the output head) run
    by the model's own forward on the trunk output ``hidden``."""
    decoder, layers = decoder_layers(model)
    lm = causal_lm(model)
    dev = hidden.device
    extra = batch.forward_args(model, hidden.dtype, dev)
    with _skipping(layers, k):
        h = decoder(inputs_embeds=hidden, use_cache=False, **extra).last_hidden_state
    flat = h.reshape(-1, h.shape[-1])[batch.target_pos.to(dev)]
    head = lm.get_output_embeddings()
    with torch.autocast(dev.type, enabled=False):  # the head in its own dtype under a bf16 autocast of the top
        logits = head(flat.to(param_dtype(head))).float()  # layers: bf16 logits would blur the log-probs
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _sum_logps(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    dev = logits.device
    lp = torch.log_softmax(logits, dim=-1).gather(1, batch.targets.to(dev).unsqueeze(1)).squeeze(1)
    out = torch.zeros(batch.n_seqs, dtype=lp.dtype, device=dev)
    return out.index_add(0, batch.seq_of_target.to(dev), lp)


def top_logps(model, hidden: torch.Tensor, batch: Batch, k: int) -> torch.Tensor:
    """Sum of answer-token log-probabilities per sequence, from the top layers on the trunk output ``hidden``."""
    return _sum_logps(top_logits(model, hidden, batch, k), batch)


@torch.no_grad()
def full_logits(model, batch: Batch) -> torch.Tensor:
    """Logits at the answer positions from the model's whole forward pass (what the split is checked against)."""
    dev = device_of(model)
    logits = model(input_ids=batch.ids.to(dev), attention_mask=batch.attention.to(dev)).logits.float()
    return logits.reshape(-1, logits.shape[-1])[batch.target_pos.to(dev)]


def full_logps(model, batch: Batch) -> torch.Tensor:
    return _sum_logps(full_logits(model, batch), batch)


def split_tolerance(model) -> float:
    """The largest relative error two ways of computing the same logits may show, by the weights' precision."""
    return 1e-3 if param_dtype(model) == torch.float32 else 5e-2


@torch.no_grad()
def check_split(model, tok, k: int) -> None:
    """Check on a probe dialogue that trunk + top computes the logits the whole model computes: an architecture
    whose forward does something the split does not reproduce (an embedding multiplier, a logits scale) is
    refused, never trained or scored wrongly. Tolerance: relative, by the weights' precision."""
    probe = [{"role": "user", "content": "Hello, how are you?"}]
    batch = collate([(prompt_ids(tok, probe, 64), answer_ids(tok, "I am well, thank you.", 16))], tok.pad_token_id)
    was_training = model.training
    model.eval()
    try:
        split = top_logits(model, run_trunk(model, batch, k), batch, k)
        whole = full_logits(model, batch)
    finally:
        model.train(was_training)
    rel = float((split - whole).abs().max() / whole.abs().max().clamp(min=1e-6))
    if not rel <= split_tolerance(model):
        kind = getattr(causal_lm(model).config, "model_type", "?")
        raise UnsupportedModel(
            f"policy architecture {kind!r}: running its top layers on a cached trunk output does not reproduce the "
            f"model's own logits (relative error {rel:.3g}); Flywheel cannot train or score it"
        )


def cast_frozen(model, k: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """Cast the frozen trunk (embeddings and the lower ``k`` layers) to ``dtype`` in place. CPUs with AMX /
    AVX512-BF16 run bf16 matrix products several times faster than fp32; the trunk's weights come from bf16
    files, so only its activations lose precision. The output head keeps its dtype (bf16 logits would blur
    log-probabilities by ~0.1): a head tied to the embeddings gets its own copy first."""
    lm = causal_lm(model)
    decoder, layers = decoder_layers(model)
    embed, head = decoder.get_input_embeddings(), lm.get_output_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    embed.to(dtype)
    for layer in layers[:k]:
        layer.to(dtype)


def retie_head(model) -> bool:
    """Tie the output head back to the input embeddings where the config ties them and ``cast_frozen`` gave the head
    its own copy that still equals them: the saved folder then holds the embedding once (56 MB less for
    SmolLM2-135M in bf16), as the registry's copy of the version does. Returns whether it tied them."""
    cfg = getattr(model, "config", None)
    if not getattr(cfg, "tie_word_embeddings", False):
        return False
    lm = causal_lm(model)
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if head is None or head.weight is embed.weight or head.weight.shape != embed.weight.shape:
        return False
    if head.weight.dtype != embed.weight.dtype or not torch.equal(head.weight.detach(), embed.weight.detach()):
        return False
    head.weight = embed.weight
    return True


def trunk_fingerprint(model, k: int) -> str:
    """A hash of the frozen part (embeddings and lower ``k`` layers): equal fingerprints share a trunk."""
    decoder, layers = decoder_layers(model)
    h = hashlib.sha256()
    params = [decoder.get_input_embeddings().weight] + [p for layer in layers[:k] for p in layer.parameters()]
    for p in params:
        head = p.detach().reshape(-1)[:1024].to(torch.float32)  # the first 4 KiB; NumPy needs host memory
        h.update(head.cpu().numpy().tobytes())
        h.update(str(float(p.detach().float().sum())).encode())
    return h.hexdigest()[:16]


def freeze_trunk(model, k: int) -> list[nn.Parameter]:
    """Freeze everything but the top layers; returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for layer in decoder_layers(model)[1][k:] for p in layer.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


@torch.no_grad()
def generate(
    model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 16, max_prompt: int = 256
) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding."""
    tok.padding_side = "left"
    out: list[str] = []
    stop = end_token(tok)
    for i in range(0, len(prompts), batch_size):
        chunk = [prompt_ids(tok, p, max_prompt) for p in prompts[i : i + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for b, c in enumerate(chunk):
            ids[b, width - len(c) :] = torch.tensor(c)
            att[b, width - len(c) :] = 1
        dev = device_of(model)
        gen = model.generate(
            input_ids=ids.to(dev),
            attention_mask=att.to(dev),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=[stop, tok.eos_token_id],
            pad_token_id=tok.pad_token_id,
        )
        for row in gen[:, width:].cpu():  # one copy to host memory per batch, not one per answer
            out.append(tok.decode(row, skip_special_tokens=True).strip())
    return out
