"""Typed settings: the trainer service (env prefix FLYWHEEL_TRAINER_) and its training job
(FLYWHEEL_TRAINER_JOB_), both nested with __."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings

from flywheel_common.settings import (
    AuthSettings,
    GrpcSettings,
    KafkaSettings,
    LoggingSettings,
    MetricsSettings,
    TracingSettings,
    env_config,
)


class ConsumerSettings(BaseModel):
    """The Kafka consumer that joins feedback to interactions."""

    group_id: str = "flywheel-trainer"
    poll_timeout_ms: int = Field(default=500, ge=10)
    max_records: int = Field(default=500, ge=1)
    # File stamped while the poll loop turns; the chart's liveness probe checks its age.
    heartbeat_file: Path | None = None
    # The heartbeat file is stamped only while the poll loop turned within this many seconds.
    heartbeat_max_age_s: float = Field(default=60.0, gt=0)


class PolicySettings(BaseModel):
    """Which feedback becomes which kind of example."""

    # Ratings (1-5) at or above this keep the model's own answer as a positive example.
    positive_min_rating: int = Field(default=4, ge=1, le=5)
    # Ratings at or below this (and thumbs down) without a correction are kept as negatives.
    negative_max_rating: int = Field(default=2, ge=1, le=5)
    # Use high ratings / thumbs up as positive training examples at all.
    use_positives: bool = True
    # Roles whose high ratings keep the model's answer as a positive. Visitors (user) are left out
    # by default: their sessions cost nothing to make and the page text they ask about is theirs, so
    # two scripted sessions could agree on an answer read from a page they wrote (docs/security.md).
    # Add "user" where visitors are trusted (the local simulation does).
    positive_roles: list[Literal["user", "expert", "admin"]] = ["expert", "admin"]
    # A positive (the model's own answer, rated high) trains only once this many distinct sessions
    # rated the same answer to the same question high, or one reviewer of a trusted role did: one
    # visitor with the public token cannot feed the trainer (docs/security.md). 1: any single rating.
    positive_min_sessions: int = Field(default=2, ge=1)
    trusted_positive_roles: list[Literal["user", "expert", "admin"]] = ["expert", "admin"]
    # Reviewer roles whose corrections become supervised examples.
    correction_roles: list[Literal["user", "expert", "admin"]] = ["expert", "admin"]
    # Corrections or answers longer than this (characters) are not used as targets.
    max_target_chars: int = Field(default=2000, ge=1)


class ReviewSettings(BaseModel):
    """The review queue of answers that need an expert."""

    # A claim keeps an item from other experts this long (an expert who walks away frees it).
    claim_ttl_s: float = Field(default=15 * 60, gt=0)
    default_limit: int = Field(default=50, ge=1)
    max_limit: int = Field(default=500, ge=1)


class BatchSettings(BaseModel):
    """When a batch of examples is cut into a dataset (negatives ride along, they do not count)."""

    # Cut as soon as this many training examples wait (N); a batch holds at most this many.
    max_examples: int = Field(default=64, ge=1)
    # Or when the oldest waiting example has waited this long (T) ...
    max_wait_s: float = Field(default=3600.0, gt=0)
    # ... and at least this many wait (M).
    min_examples: int = Field(default=8, ge=1)
    # How often the batcher looks.
    check_interval_s: float = Field(default=2.0, gt=0)


class JobsSettings(BaseModel):
    """How training jobs are launched."""

    # auto: kubernetes when a Job template is configured (as the chart does), else local.
    launcher: Literal["auto", "local", "kubernetes"] = "auto"
    # At most this many jobs run at once (K); the rest queue.
    max_concurrent: int = Field(default=1, ge=1)
    # Local launcher: the command run for a job (arguments --dataset, --base-version, --job-id follow).
    local_command: list[str] = ["{python}", "-m", "flywheel_trainer.job"]
    # Local launcher: stop running jobs when the trainer shuts down (else they are adopted on restart).
    local_stop_on_shutdown: bool = True
    # Kubernetes launcher: the Job template (the chart's ConfigMap) and where to create Jobs.
    template_file: Path | None = None
    namespace: str = "default"
    # Kubernetes launcher: kubeconfig file (in-cluster configuration when unset and running in a pod).
    kubeconfig: Path | None = None
    # Base version a job trains from: the production version when unset.
    base_version: str | None = None


class TrainerSettings(BaseSettings):
    """Everything the trainer service reads from its environment."""

    model_config = env_config("FLYWHEEL_TRAINER_")

    grpc: GrpcSettings = GrpcSettings(port=50053)
    metrics: MetricsSettings = MetricsSettings(port=9103)
    tracing: TracingSettings = TracingSettings()
    logging: LoggingSettings = LoggingSettings()
    kafka: KafkaSettings = KafkaSettings(client_id="flywheel-trainer")
    auth: AuthSettings = AuthSettings()
    # Verifies the feedback service's signature on each Feedback event (docs/security.md).
    event_signing_key_file: Path | None = None
    # Pseudonymises the session id a ForgetSession request names (the key inference and feedback use).
    pseudonym_key_file: Path | None = None
    # Inference signs Interaction events with a key derived from the query-id key; the development
    # key when unset (docs/security.md).
    query_id_key_file: Path | None = None
    consumer: ConsumerSettings = ConsumerSettings()
    policy: PolicySettings = PolicySettings()
    batch: BatchSettings = BatchSettings()
    review: ReviewSettings = ReviewSettings()
    jobs: JobsSettings = JobsSettings()
    # The registry and datasets live here (shared with the jobs, the evaluator and inference).
    artifact_root: Path = Path("var/artifacts")
    # The trainer's own state: the SQLite join store and job logs.
    data_dir: Path = Path("var/trainer")
    # Interactions and feedback are forgotten after this long (batched examples too; waiting ones
    # are kept until batched). Equal to the feedback service's query id lifetime and the topics'
    # retention (docs/security.md), so feedback can always meet its interaction.
    retention_s: float = Field(default=14 * 24 * 3600, gt=0)
    # Create missing topics at start (turn off where the platform team owns topics).
    create_topics: bool = True


class HyperParameters(BaseModel):
    """What a training job does; recorded with every candidate."""

    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    # Attention and MLP projections: Llama-style names, and Phi-3's fused ones (a name a model lacks
    # adapts nothing; a linear layer no name covers is logged as left out).
    target_modules: list[str] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "qkv_proj",
        "gate_up_proj",
    ]
    # Adapt only the top N decoder layers (0: all). Backpropagation then stops at the lowest adapted
    # layer: with half the layers a step costs about a third less.
    lora_layers: int = Field(default=0, ge=0)
    learning_rate: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    epochs: int = Field(default=2, ge=1)
    # Examples per forward pass; gradients accumulate over `gradient_accumulation` of them.
    micro_batch_size: int = Field(default=1, ge=1)
    gradient_accumulation: int = Field(default=8, ge=1)
    # Stop after this many optimizer steps (0: no limit beyond the epochs).
    max_steps: int = Field(default=0, ge=0)
    # Examples longer than this (prompt + answer tokens) are skipped, never truncated.
    max_seq_tokens: int = Field(default=1024, ge=16)
    # Earlier batches the base model has not learned (their candidate was rejected, or never made)
    # are trained on again, whole batches newest first, up to this many examples (0: only this batch).
    carry_over_max_examples: int = Field(default=512, ge=0)
    # Examples of batches the base has learned are mixed in, as a share of the examples above (so
    # nothing is forgotten).
    replay_fraction: float = Field(default=0.5, ge=0)
    replay_max_examples: int = Field(default=64, ge=0)
    # What an answer is taught as: the span of the passages it quotes (see job/targets.py), or the
    # text as written; and whether answers the passages do not ground are kept, dropped, or (abstain)
    # corrections taught as "The page does not say." (the passages the model saw lack the answer).
    # Dropping them kept gate accuracy and raised precision and F1 on two datasets, with a shorter
    # job (docs/quality.md, the ablation).
    target: Literal["as_written", "grounded_span"] = "grounded_span"
    ungrounded: Literal["keep", "drop", "abstain"] = "drop"
    # Weight of the odds-ratio preference loss (ORPO) that pushes a corrected example's target above
    # the model answer it corrected (0: supervised loss only).
    preference_weight: float = Field(default=0.0, ge=0)
    seed: int = 1234
    gradient_checkpointing: bool = False
    max_grad_norm: float = Field(default=1.0, gt=0)
    # False: each example's prompt runs without gradients (its KV cache is a constant) and only the
    # answer's positions back-propagate, so a step costs about a forward pass instead of three; the
    # adapter then learns from what the answer's positions read, not from how the prompt is encoded.
    prompt_grad: bool = True

    @model_validator(mode="after")
    def _prompt_cache_needs_no_checkpointing(self) -> HyperParameters:
        if not self.prompt_grad and self.gradient_checkpointing:
            raise ValueError(
                "prompt_grad=false runs the prompt with a KV cache, which gradient checkpointing turns off"
            )
        return self


class VerifySettings(BaseModel):
    """The export check: ONNX greedy must equal PyTorch greedy on a few prompts."""

    prompts: int = Field(default=3, ge=0)
    max_new_tokens: int = Field(default=24, ge=1)
    # A divergence is tolerated only where PyTorch's two best logits are closer than this (a tie).
    tie_tolerance: float = Field(default=1e-3, ge=0)


class JobSettings(BaseSettings):
    """Everything the training job reads from its environment."""

    model_config = env_config("FLYWHEEL_TRAINER_JOB_")

    logging: LoggingSettings = LoggingSettings()
    artifact_root: Path = Path("var/artifacts")
    # Adapter, merged weights and the ONNX export are built here before registration.
    scratch_dir: Path = Path("var/trainer/scratch")
    # The ONNX exporter's cache (scratch_dir/hf-export when unset).
    export_cache_dir: Path | None = None
    # auto: CUDA when present, else CPU.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # auto: QLoRA (bitsandbytes NF4, bf16 compute) on CUDA, plain fp32 LoRA on CPU.
    quantization: Literal["auto", "nf4", "none"] = "auto"
    # CPU threads for torch (0: torch's default).
    threads: int = Field(default=0, ge=0)
    hyper: HyperParameters = HyperParameters()
    verify: VerifySettings = VerifySettings()
