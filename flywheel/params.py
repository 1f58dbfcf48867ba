"""Every section of params.yaml, typed once: one pydantic model per top-level key, and ``Params``, the whole file.

params.yaml is the one home of every tunable, so the models carry no defaults: a key params.yaml ships is a key every
workspace's params.yaml must set (a missing one fails at load, naming it). The only defaults are for keys a
params.yaml leaves out by design, and each equals what leaving it out means there (a gate rule's checks it does
not apply); tests/code/test_params.py holds them to the shipped file. Unknown keys and wrong types fail at load with
the dotted key (``params.yaml train_policy.lr: ...``). Loading (profiles merged once) is ``flywheel.settings``'s.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class Section(BaseModel):
    """A params.yaml mapping: unknown keys refused, values frozen once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def updated(self, **changes: Any) -> Self:
        """A validated copy with ``changes`` (a mapping value is merged into the nested section key by key)."""
        return type(self).model_validate(_merge(self.model_dump(by_alias=True), changes))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---- settings: paths and URIs (resolved by flywheel.settings; FLYWHEEL_<KEY> overrides each) ------------------


class PathSettings(Section):
    raw_store: str
    quarantine: str
    prepared: str
    reports: str
    models: str
    tracking_uri: str
    registry_uri: str  # empty: same as tracking_uri
    artifact_root: str
    feedback_store: str
    dvc_remote: str  # empty: no remote
    airflow_home: str
    airflow_db: str  # Airflow metadata DB; empty: Airflow's SQLite under airflow_home
    celery_broker: str  # Celery broker of the distributed Airflow; empty: no Celery


# ---- data: contract, ingest, validate, prepare --------------------------------------------------------------


class ContractParams(Section):
    max_text_chars: int = Field(gt=0)
    max_turns: int = Field(gt=0)
    max_line_bytes: int = Field(gt=0)


class IngestChecks(Section):
    max_empty_answer_rate: float = Field(ge=0, le=1)
    max_duplicate_answer_rate: float = Field(ge=0, le=1)
    min_positive_rate: float = Field(ge=0, le=1)
    max_positive_rate: float = Field(ge=0, le=1)
    max_negative_rate_rise: float = Field(ge=0, le=1)
    max_pii_rate: float = Field(ge=0, le=1)
    min_response_chars: int = Field(ge=0)
    max_response_chars: int = Field(gt=0)
    min_events_for_rate_checks: int = Field(ge=0)


class TraceSource(Section):
    """Where ``flywheel ingest --from mlflow`` (and feedback_ingest's ``ingest_traces`` task) reads traces with
    human assessments: an MLflow experiment ("" is off) and its tracking URI ("" is the workspace's)."""

    experiment: str
    tracking_uri: str


class IngestParams(Section):
    chunk_events: int = Field(gt=0)
    checks: IngestChecks
    quarantine_retention_days: int = Field(ge=0)
    traces: TraceSource


class ValidateParams(Section):
    window_days: int = Field(ge=0)
    max_null_rate: float = Field(ge=0, le=1)
    min_rows: int = Field(ge=0)
    min_positive_rate: float = Field(ge=0, le=1)
    max_positive_rate: float = Field(ge=0, le=1)
    max_length_drift_ratio: float = Field(ge=1)
    max_negative_rate_rise: float = Field(ge=0, le=1)
    max_response_chars: int = Field(gt=0)


class SplitParams(Section):
    test_pct: int = Field(ge=0, le=100)
    val_pct: int = Field(ge=0, le=100)


Backend = Literal["fast", "trl"]
Devices = Literal["auto"] | typing.Annotated[int, Field(ge=1)]


def _one_process_unless_trl(section: str, backend: str, devices) -> None:
    """Several processes need the trl back-end: the fast loop runs in one."""
    if backend == "fast" and devices not in ("auto", 1):
        raise ValueError(
            f"devices: {devices} needs backend: trl (the fast loop runs in one process); set "
            f"{section}.backend: trl, or devices: auto"
        )


class KtoLabels(Section):
    desirable_min_rating: int = Field(ge=1, le=5)  # a rated answer at or above this is desirable (KTO) ...
    undesirable_max_rating: int = Field(ge=1, le=5)  # ... at or below this undesirable; between: not used

    @model_validator(mode="after")
    def _undesirable_below_desirable(self) -> Self:
        if self.undesirable_max_rating >= self.desirable_min_rating:
            raise ValueError(
                f"undesirable_max_rating ({self.undesirable_max_rating}) must be below desirable_min_rating "
                f"({self.desirable_min_rating})"
            )
        return self


class PrepareParams(Section):
    near_dup_threshold: float = Field(gt=0, le=1)
    minhash_perms: int = Field(gt=0)
    shingle_chars: int = Field(gt=0)
    split: SplitParams
    sft_min_rating: int = Field(ge=1, le=5)
    pair_min_rating_gap: int = Field(ge=1, le=4)
    kto: KtoLabels
    sft_requires_review: bool  # corrections reach SFT only once a reviewer approved them (flywheel review)


class GoldenParams(Section):
    # a fixed preference file (README "The golden set"): scored every turn beside the test split; its
    # conversations and prompts are kept out of every training set, whatever the window
    path: str = Field(min_length=1)
    format: Literal["native", "hh-rlhf"]


# ---- training and evaluation ---------------------------------------------------------------------------------


class ScoreCacheParams(Section):
    # models/score-cache (flywheel/models/scores.py): trunk outputs and answer log-probabilities kept across turns,
    # read by train_policy and evaluate; trunk outputs stop being kept past this size (0: none are)
    max_gb: float = Field(ge=0)


class ModelSource(Section):
    # a folder | a Hugging Face hub id (with `revision`; only where the hub is reachable) | models:/NAME/VERSION
    # (or models:/NAME@ALIAS) | shipped:smollm2 (policy) | shipped:minilm (reward)
    source: str = Field(min_length=1)
    revision: str  # a hub id's branch, tag or commit ("" : its default branch)
    dtype: Literal["bfloat16", "float16", "float32"]  # how the base model is stored and loaded
    trust_remote_code: bool  # run the model folder's own Python code (only for a source you trust)
    chat_template: str  # a Jinja chat template replacing the tokenizer's ("" : keep the tokenizer's)


class ModelsParams(Section):
    policy: ModelSource
    reward: ModelSource


class LoraParams(Section):
    r: int = Field(ge=1)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: str | list[str] = Field(min_length=1)  # module names, or "all-linear" (PEFT)


class TrainRewardParams(Section):
    frozen_encoder: bool  # true: train the head alone on frozen encoder embeddings
    epochs: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    head_lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_ratio: float = Field(ge=0, le=1)
    max_length: int = Field(ge=1)  # tokens; the end of the text (the answer) is kept
    context_turns: int = Field(ge=0)
    group_by_length: bool
    bf16: bool  # bf16 autocast of the encoder while training (where bf16 runs fast); scoring stays fp32
    backend: Backend  # fast: Flywheel's loop | trl: TRL's RewardTrainer (the model trains as sequence classification)
    devices: Devices  # auto: one process per visible GPU (trl), else one | N: N processes through accelerate launch
    accelerate_config: str  # accelerate config file for devices > 1 ("" : DDP); infra/accelerate/ has DDP, ZeRO-2/3
    start_from: Literal["champion", "base"]  # champion: continue a trained champion | base: the base on the window
    champion_epochs: float = Field(gt=0)  # epochs over the window when continuing the champion (from the base: epochs)
    seed: int

    @model_validator(mode="after")
    def _backend_supports(self) -> Self:
        _one_process_unless_trl("train_reward", self.backend, self.devices)
        return self


class KtoParams(Section):
    desirable_weight: float = Field(gt=0)  # KTO's lambda_D and lambda_U: raise the rarer side's weight so that
    undesirable_weight: float = Field(gt=0)  # weight x count is about equal (the KTO paper's advice)


class TrainPolicyParams(Section):
    frozen_layers: int = Field(ge=0)  # lower layers shared with the base model, never trained (the one home)
    beta: float = Field(gt=0)
    lr: float = Field(gt=0)
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    warmup_steps: int = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    sft_weight: float = Field(ge=0)
    sft_batch_size: int = Field(ge=1)
    max_prompt_tokens: int = Field(ge=1)
    max_answer_tokens: int = Field(ge=1)
    bf16: bool
    cache_trunk: bool  # trunk outputs computed once per pair (reference log-probs always are)
    adapter: Literal["none", "lora", "qlora"]  # none: the top layers' weights; lora: a LoRA adapter on them (PEFT);
    # qlora: the same adapter on a 4-bit base (bitsandbytes; CUDA only)
    lora: LoraParams
    method: Literal["dpo", "kto"]  # dpo: preference pairs; kto: unpaired desirable / undesirable answers
    start_from: Literal["champion", "base"]  # champion: continue it on the window; base: train the base on it
    kto: KtoParams

    @property
    def kto_weights(self) -> tuple[float, float]:
        return self.kto.desirable_weight, self.kto.undesirable_weight

    frozen_bf16: bool  # the frozen lower layers run in bf16 (AMX / AVX512-BF16 CPUs, GPUs)
    threads: int = Field(ge=0)  # 0: torch's default
    backend: Backend  # fast: the trunk-cached loop (the CPU default) | trl: TRL's DPOTrainer / KTOTrainer
    devices: Devices  # auto: one process per visible GPU (trl), else one | N: N processes through accelerate launch
    accelerate_config: str  # accelerate config file for devices > 1 ("" : DDP); infra/accelerate/ has DDP, ZeRO-2/3
    gradient_checkpointing: bool  # trl back-end: recompute activations in the backward pass (less memory, slower)
    seed: int

    @model_validator(mode="after")
    def _backend_supports(self) -> Self:
        _one_process_unless_trl("train_policy", self.backend, self.devices)
        if self.backend == "fast" and self.adapter == "qlora":
            raise ValueError("adapter: qlora needs backend: trl (the fast loop shares a bf16 trunk, not a 4-bit one)")
        return self


class EvaluateParams(Section):
    max_prompt_tokens: int = Field(ge=1)
    max_answer_tokens: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    # where the margin computation splits the models: below it a model whose lower layers equal the reference's
    # reuses the reference's pass; the margins do not depend on it (a model whose lower layers differ runs its own),
    # only the time does (train_policy.frozen_layers is the fastest value). Its own value, not train_policy's.
    frozen_layers: int = Field(ge=0)
    bf16: bool  # frozen trunk in bf16 for the margins, bf16 copies to generate
    golden_pairs: int = Field(ge=0)  # score the golden set's first N pairs (0: all); prepare holds out every one
    judged_prompts: int = Field(ge=0)
    redteam_prompts: int = Field(ge=0)
    benign_prompts: int = Field(ge=0)
    max_new_tokens: int = Field(ge=1)
    gen_batch_size: int = Field(ge=1)
    bootstrap: int = Field(ge=1)
    confidence: float = Field(gt=0, lt=1)
    slices: list[Literal["feedback_type", "turns", "chosen_shorter"]]
    seed: int


# ---- the gate and the release --------------------------------------------------------------------------------
# A rule lists the checks it applies: each of its keys may be left out, and its default then applies no check
# (a gate's slice_rule likewise). The gate's hash is over these models' dump: a new field changes every hash.


class MetricRule(Section):
    direction: Literal["higher", "lower"] = "higher"
    min_value: float | None = None
    max_value: float | None = None
    max_regression_abs: float | None = None  # how much worse than the champion, in the metric's units
    max_regression_rel: float | None = None  # ... as a fraction of the champion's value
    min_n: int = 0  # gate only when at least this many items were scored
    # True: refused when the challenger is worse than the champion beyond noise (the paired interval of the
    # difference lies wholly on the worse side of 0); a difference within noise passes
    no_regression_beyond_noise: bool = False
    required: bool = False  # True: a check that cannot be applied blocks the blessing


class ModelGate(Section):
    primary: str
    primary_min_ci_lower: float
    # the primary metric when ``primary`` was not measured (no test pairs: unpaired_accuracy), held to the same
    # lower bound; left out: no fallback (an unmeasured primary is never blessed)
    fallback_primary: str | None = None
    metrics: dict[str, MetricRule]
    slice_rule: MetricRule | None = None  # left out: slices are reported, not gated
    # slice families the slice rule gates; the others (e.g. chosen_shorter, where a model leaning either way
    # on length must lose on one side) are reported beside the length baseline, not gated
    gated_slices: list[str]
    block_length_only_gain: bool


class GateParams(Section):
    policy: ModelGate
    reward: ModelGate


class BlessParams(Section):
    gates: dict[str, GateParams] = Field(min_length=1)
    gate: str  # the gate in force: `flywheel release` accepts only a blessing from it

    @field_validator("gate")
    @classmethod
    def _gate_is_defined(cls, gate: str, info: ValidationInfo) -> str:
        gates = info.data.get("gates")
        if gates is not None and gate not in gates:
            raise ValueError(f"unknown gate {gate!r}; defined: {', '.join(gates)}")
        return gate


class SmokeParams(Section):
    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(ge=1)
    timeout_s: float = Field(gt=0)
    min_chars: int = Field(ge=0)  # an answer shorter than this (after stripping) fails the check


class ReleaseParams(Section):
    smoke: SmokeParams


# ---- the service and the orchestration -----------------------------------------------------------------------


class RateLimit(Section):
    """A token bucket per API token: ``per_s`` requests a second on average, bursts of ``burst``. The feedback
    bucket counts events (a batch of n costs n), so its burst bounds the largest batch a token can send."""

    per_s: float = Field(gt=0)
    burst: int = Field(gt=0)


class TracingParams(Section):
    """The service's answers as MLflow traces and their feedback as assessments (service/tracing.py), in
    ``experiment`` of the workspace's tracking store; written off the request path through a queue of
    ``max_queue`` records (a full queue drops the trace, never the request)."""

    enabled: bool
    experiment: str = Field(min_length=1)
    max_queue: int = Field(gt=0)


class ReviewParams(Section):
    """What ``flywheel review export`` hands to reviewers (flywheel/data/review.py)."""

    max_rating: int = Field(ge=1, le=5)  # ratings at or below this are reviewed, besides every correction
    batch: int = Field(gt=0)  # tasks per exported file


class ServeParams(Section):
    host: str
    port: int = Field(ge=0, le=65535)
    fallback_policy: str  # served when the registry has no champion
    fallback_reward: str
    max_body_bytes: int = Field(gt=0)  # a chat request; 413 past it
    max_batch_body_bytes: int = Field(gt=0)
    max_batch_events: int = Field(gt=0)
    max_messages: int = Field(gt=0)
    max_message_chars: int = Field(gt=0)
    max_new_tokens: int = Field(gt=0)  # the largest max_tokens a request may ask for
    default_max_tokens: int = Field(gt=0)
    max_prompt_tokens: int = Field(gt=0)  # a longer prompt keeps its last tokens
    batch_window_ms: float = Field(ge=0)  # how long the batcher waits for more requests
    max_batch_size: int = Field(gt=0)  # rows (answers) in one generate call
    max_queue: int = Field(gt=0)  # waiting requests past which chat answers 503
    best_of_n: int = Field(ge=1, le=16)  # default candidates per answer, reranked by the reward model
    max_best_of: int = Field(ge=1, le=16)
    best_of_temperature: float = Field(gt=0, le=2)
    threads: int = Field(ge=0)  # torch threads for generation; 0: torch's default (all cores)
    challenger_fraction: float = Field(ge=0, le=1)
    reload_poll_s: float = Field(gt=0, le=10)
    write_batch_max: int = Field(gt=0)  # feedback requests committed in one transaction
    sqlite_synchronous: Literal["normal", "full"]
    access_log: bool
    chat_rate: RateLimit
    feedback_rate: RateLimit  # events; burst bounds the largest batch
    tracing: TracingParams


class OrchestrationParams(Section):
    """Schedules, the retrain threshold, retries and the DVC pool of the Airflow DAGs."""

    schedule: str  # feedback_ingest
    fallback_schedule: str  # continuous_improvement, besides the feedback asset
    min_new_events: int = Field(ge=0)
    max_negative_rate_rise: float = Field(ge=0, le=1)
    min_events_for_rate: int = Field(ge=1)
    retries: int = Field(ge=0)
    retry_delay_minutes: float = Field(ge=0)
    max_retry_delay_minutes: float = Field(ge=0)
    stage_timeout_minutes: float = Field(gt=0)
    approval_required: bool
    approval_timeout_hours: float = Field(gt=0)
    pool: str
    default_queue: str  # Celery queues (ignored by the local executors)
    gpu_queue: str
    gpu_stages: list[str]
    warm_runner: bool  # local `dvc repro`: the workspace's runner; a DAG task: a runner of its own, in its tree
    warm_idle_seconds: float = Field(gt=0)


# ---- the whole file ------------------------------------------------------------------------------------------


class Params(Section):
    """params.yaml, typed (after the chosen profile's overrides were merged in; ``profiles`` itself is not kept)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    settings: PathSettings
    contract: ContractParams
    ingest: IngestParams
    validate_: ValidateParams = Field(alias="validate")  # `validate` would shadow a pydantic method
    prepare: PrepareParams
    golden: GoldenParams
    models: ModelsParams
    score_cache: ScoreCacheParams
    profile: str  # the profile in force ("" for none)
    train_reward: TrainRewardParams
    train_policy: TrainPolicyParams
    evaluate: EvaluateParams
    bless: BlessParams
    release: ReleaseParams
    review: ReviewParams
    serve: ServeParams
    orchestration: OrchestrationParams

    def section(self, name: str) -> Section:
        """The typed section of params.yaml's top-level key ``name``; KeyError for a name that is not a section."""
        if name not in SECTIONS:
            raise KeyError(f"params.yaml has no section {name!r}; sections: {', '.join(SECTIONS)}")
        return getattr(self, _ATTR.get(name, name))


# each section model -> its params.yaml key (a step's `stage()` asks for its section by annotating this class),
# read off the fields of Params: adding a section is its model and its field there, nothing else
SECTION_OF: dict[type[BaseModel], str] = {
    f.annotation: (f.alias or name)
    for name, f in Params.model_fields.items()
    if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
}
SECTIONS: tuple[str, ...] = tuple(SECTION_OF.values())
_ATTR = {"validate": "validate_"}


def describe_errors(
    err: ValidationError, where: str = "params.yaml", model: type[BaseModel] = Params, prefix: str = ""
) -> str:
    """``err`` as one entry per problem (joined by "; "), each naming the dotted key (``params.yaml train_policy.lr:
    ...``); an unknown key lists the keys expected there. ``model`` is the model validated, ``prefix`` its dotted
    place in the file."""
    parts = []
    for e in err.errors(include_url=False):
        loc = [str(p) for p in e["loc"]]
        key = (prefix + ".".join(p.replace("validate_", "validate") for p in loc)).rstrip(".")
        if e["type"] == "extra_forbidden":
            known = _keys_at(model, loc[:-1])
            msg = "unknown key" + (f"; expected one of {', '.join(known)}" if known else "")
        elif e["type"] == "missing":
            msg = "missing: params.yaml must set it (the code has no default)"
        elif e["type"] == "value_error" and "error" in e.get("ctx", {}):
            msg = str(e["ctx"]["error"])  # our own validator's words, without pydantic's "Value error, "
        else:
            msg = e["msg"]
        parts.append(f"{where} {key}: {msg}" if key else f"{where}: {msg}")
    return "; ".join(parts)


def _keys_at(model: Any, loc: list[str]) -> list[str]:
    """The keys the model expects at ``loc`` (dict keys and list indices passed through); [] when unknown."""
    ann: Any = model
    for part in loc:
        ann = _unwrap(ann)
        origin = typing.get_origin(ann)
        if origin in (dict, list):
            ann = typing.get_args(ann)[-1]
            continue
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        fields = {f.alias or name: f for name, f in ann.model_fields.items()}
        if part not in fields:
            return []
        ann = fields[part].annotation
    ann = _unwrap(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [f.alias or name for name, f in ann.model_fields.items()]
    return []


def _unwrap(ann: Any) -> Any:
    """``X | None`` -> ``X``."""
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return ann
