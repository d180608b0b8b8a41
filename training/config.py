"""``TrainConfig``: the validated schema of the ``train`` job (``configs/train.yaml``).

Every section forbids unknown keys (``pipeline.config.Strict``), so a typo fails before
Ray starts. Override any key from the command line, e.g.
``python -m ray_jobs.train --config configs/train.yaml deepspeed.zero_stage=3``.

One job trains one model (``data``, ``model``, ``output.dir``), or several, one after another
in one Ray Train worker group (``runs:``, e.g. the paper's four students), sharing the start-up
of Ray Train and DeepSpeed. With ``runs`` the top-level ``data``, ``model``, ``optim``,
``schedule``, ``resume_from`` and ``seed`` are defaults that each entry overrides key by key;
``ray``, ``deepspeed``, ``scaling``, ``failure`` and ``output.checkpoint_dir`` are shared::

    model: {build_tiny: true, tiny: {hidden_size: 96, num_layers: 2}}
    schedule: {max_steps: 300}
    output: {dir: runs/train, checkpoint_dir: runs/train/checkpoints, run_name: students}
    runs:
      - {name: s_dt, data: {train_path: runs/select/decomposer_all/train}}
      - {name: s_dr, data: {train_path: runs/select/decomposer_correct/train}, schedule: {max_steps: 200}}

:meth:`TrainConfig.model_runs` gives each model as a one-model ``TrainConfig`` (what the
recipe trains and what its manifest records).
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional, Union

from pydantic import Field, model_validator

from pipeline import storage
from pipeline.config import RayConfig, Strict, deep_merge

# Sections a model of a several-model job may set for itself (the rest is shared by the job).
PER_MODEL_KEYS = ("data", "model", "optim", "schedule", "resume_from", "seed")


class TrainDataConfig(Strict):
    train_path: str = Field(..., description="Parquet dataset (dir or file, local or s3://) written by the `select` job.")
    validation_path: Optional[str] = Field(None, description="Parquet validation set; None skips validation.")
    max_length: int = Field(1024, ge=16, le=131072, description="Tokens per example; longer examples are truncated (and counted).")
    pack_or_group: Literal["group_by_length", "pack", "none"] = Field(
        "group_by_length",
        description="group_by_length: sort by length within shuffled mega-batches (less padding), the micro-batches "
        "then run in shuffled steps; "
        "pack: concatenate examples up to max_length (block-diagonal attention via position_ids); none: plain shuffle.",
    )
    mega_batch_multiplier: int = Field(32, ge=1, description="group_by_length: mega-batch = this many rounds of micro-batches.")
    shuffle: bool = True
    wait_for: Optional[str] = Field(
        None, description="A path (local or s3://) that must exist before the workers read train_path: the completion "
        "marker of the job that writes it (e.g. the select job's manifest.json). The job's workers then start, load "
        "the base model and import DeepSpeed while that job still runs.")
    wait_timeout_s: float = Field(3600.0, gt=0, description="How long to wait for wait_for before failing.")
    skip_if_empty: bool = Field(False, description="A train set without usable rows skips this model (no manifest is "
                                "written) instead of failing the job: for a set that an upstream filter may leave empty.")


class TinyModelConfig(Strict):
    arch: Literal["llama", "gpt2"] = "llama"
    tokenizer: Literal["bpe", "word"] = Field("bpe", description="bpe: byte-level BPE of vocab_size trained on the training "
                                              "text; word: one token per word of it (a generated world's vocabulary).")
    tokenizer_from: Optional[str] = Field(None, description="A model or tokenizer dir whose tokenizer to share (students of "
                                          "a tiny teacher: every token counted with one tokenizer); overrides tokenizer.")
    vocab_size: int = Field(2048, ge=300)
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    max_positions: int = Field(1024, ge=16)


class LoraSection(Strict):
    """Parameter-efficient fine-tuning with peft: only the low-rank adapters train and are checkpointed."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Union[list[str], Literal["all-linear"]] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]; GPT-2: [c_attn]) or all-linear.")
    qlora: bool = Field(False, description="Load the frozen base in 4-bit NF4 (bitsandbytes; GPU only, ZeRO 0-2).")
    export: Literal["merged", "adapter"] = Field(
        "merged", description="output.dir gets the base with the adapter merged in, or the adapter alone (+ tokenizer).")


class TrainModelConfig(Strict):
    name_or_path: Optional[str] = Field(None, description="HF hub name, local dir or s3:// dir of a causal LM (ignored when build_tiny).")
    build_tiny: bool = Field(False, description="Build a tiny random Llama + BPE tokenizer trained on the training text (no download).")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype to load weights in; auto follows deepspeed.precision."
    )
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = Field(None, description="e.g. sdpa | eager | flash_attention_2; None = library default.")
    lora: Optional[LoraSection] = Field(None, description="LoRA / QLoRA adapters (peft) instead of full fine-tuning.")
    torch_compile: bool = Field(False, description="torch.compile the model in the DeepSpeed engine (dynamic shapes): "
                                "pays off on long runs with data.pack_or_group=pack (see bench_training_throughput).")

    @model_validator(mode="after")
    def _need_a_model(self) -> "TrainModelConfig":
        if not self.build_tiny and not self.name_or_path:
            raise ValueError("set model.name_or_path or model.build_tiny=true")
        return self


class DeepSpeedSection(Strict):
    zero_stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer states to CPU (stage >= 1).")
    offload_param: bool = Field(False, description="Offload parameters to CPU (stage 3 only).")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field("auto", description="auto: bf16 on a GPU that supports it, else fp32.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per worker per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_clipping: float = Field(1.0, ge=0.0)
    extra: dict[str, Any] = Field(default_factory=dict, description="Merged (recursively) into the generated DeepSpeed config.")

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "DeepSpeedSection":
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")
        return self


class OptimConfig(Strict):
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: Optional[int] = Field(None, ge=0, description="Overrides warmup_ratio when set.")
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine: final lr as a fraction of lr.")


class ScheduleConfig(Strict):
    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps (across epochs).")
    checkpoint_every_steps: Optional[int] = Field(None, ge=1, description="Also checkpoint every N optimizer steps.")
    checkpoint_every_epoch: bool = Field(True, description="Checkpoint at each epoch's end (false: only every "
                                         "checkpoint_every_steps and at the end; a small set's epoch is a few steps).")
    log_every_steps: int = Field(10, ge=1, description="Report metrics every N optimizer steps.")
    report_every_s: float = Field(30.0, ge=0, description="Metrics-only reports reach Ray Train at most this often (each "
                                  "waits for the controller's next poll: every 10 steps stalled a tiny model 75 % of the "
                                  "time); checkpoints always do. Progress lines follow log_every_steps.")
    eval_every_epoch: bool = True


class ScalingSection(Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, ge=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources, e.g. {trainer: 1}.")


class TrainOutputConfig(Strict):
    dir: Optional[str] = Field(None, description="Where the final Hugging Face model + manifest.json go (local or s3://); "
                               "with runs: the folder holding <name>/ of every run that sets no output_dir.")
    checkpoint_dir: str = Field(..., description="Ray Train storage_path for checkpoints (local or s3://; shared storage on multi-node).")
    run_name: str = Field("train", description="The Ray Train run (checkpoints in checkpoint_dir/run_name). Re-running with the "
                          "same run_name + checkpoint_dir resumes from its latest checkpoint (each model of runs from its own).")
    num_checkpoints_to_keep: int = Field(2, ge=1, description="Latest checkpoints kept; with runs, plus each model's final one.")


class TrainRunConfig(Strict):
    """One model of a job that trains several (``runs:``); unset sections come from the top level."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="The model's name: its checkpoints, base model and manifest use it.")
    output_dir: Optional[str] = Field(None, description="Its exported model + manifest.json (default: <output.dir>/<name>).")
    data: TrainDataConfig
    model: TrainModelConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    resume_from: Optional[str] = Field(None, description="A checkpoint of an earlier run to start from when this model has none.")
    seed: int = 0


class TrainFailureConfig(Strict):
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the latest checkpoint (-1: unlimited).")


class TrainConfig(Strict):
    ray: RayConfig = Field(default_factory=RayConfig)
    data: Optional[TrainDataConfig] = Field(None, description="The training data (required unless runs lists the models).")
    model: Optional[TrainModelConfig] = Field(None, description="The model (required unless runs lists the models).")
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    output: TrainOutputConfig
    failure: TrainFailureConfig = Field(default_factory=TrainFailureConfig)
    resume_from: Optional[str] = Field(
        None, description="A checkpoint directory (local or s3://) of an earlier run to start from when this run has none."
    )
    seed: int = 0
    runs: list[TrainRunConfig] = Field(default_factory=list, description="Several models trained one after another in one "
                                       "worker group; the top-level per-model sections are their defaults.")

    @model_validator(mode="before")
    @classmethod
    def _defaults_under_runs(cls, data: Any) -> Any:
        """With ``runs``, the top-level per-model sections become each entry's defaults."""
        if not isinstance(data, dict) or not data.get("runs") or not isinstance(data["runs"], list):
            return data
        data = dict(data)
        defaults = {k: data.pop(k) for k in PER_MODEL_KEYS if k in data}
        data["runs"] = [deep_merge(defaults, r) if isinstance(r, dict) else r for r in data["runs"]]
        return data

    @model_validator(mode="after")
    def _one_model_or_runs(self) -> "TrainConfig":
        if not self.runs:
            for key, value in (("data", self.data), ("model", self.model), ("output.dir", self.output.dir)):
                if value is None:
                    raise ValueError(f"{key}: missing required field (or list the models to train under runs)")
            return self
        names = [r.name for r in self.runs]
        if len(set(names)) != len(names):
            raise ValueError(f"runs: names must be unique, got {names}")
        for i, r in enumerate(self.runs):
            if r.output_dir is None and self.output.dir is None:
                raise ValueError(f"runs.{i}.output_dir: set it, or output.dir as the folder of every run's export")
        return self

    @model_validator(mode="after")
    def _qlora_needs_a_gpu(self) -> "TrainConfig":
        for model in [self.model] + [r.model for r in self.runs]:
            lora = model.lora if model is not None else None
            if lora is None or not lora.qlora:
                continue
            if not self.scaling.use_gpu:
                raise ValueError("model.lora.qlora (4-bit bitsandbytes) needs a GPU: set scaling.use_gpu=true, "
                                 "or model.lora.qlora=false for plain LoRA on CPU")
            if self.deepspeed.zero_stage == 3:
                raise ValueError("model.lora.qlora works with deepspeed.zero_stage 0-2 (4-bit weights are not partitioned)")
        return self

    # ---------------------------------------------------------------- the models of the job
    @property
    def several(self) -> bool:
        """Whether this job trains several models (``runs``)."""
        return bool(self.runs)

    def model_runs(self) -> list["TrainConfig"]:
        """Every model of the job as a one-model config (this config itself when it has no runs)."""
        return [self.for_run(r) for r in self.runs] if self.runs else [self]

    def for_run(self, run: TrainRunConfig) -> "TrainConfig":
        out_dir = run.output_dir or storage.join(self.output.dir, run.name)
        output = self.output.model_copy(update={"dir": out_dir, "run_name": run.name})
        return self.model_copy(update={"data": run.data, "model": run.model, "optim": run.optim, "schedule": run.schedule,
                                       "resume_from": run.resume_from, "seed": run.seed, "output": output, "runs": []})

    def with_absolute_paths(self) -> "TrainConfig":
        """Resolve local paths (workers may run in another cwd); remote (s3://) paths are kept."""
        def fix(p: Optional[str]) -> Optional[str]:
            return p if not p or not storage.is_local(p) else storage.localize(p)

        def fix_data(d: Optional[TrainDataConfig]) -> Optional[TrainDataConfig]:
            return d and d.model_copy(update={"train_path": fix(d.train_path), "validation_path": fix(d.validation_path),
                                              "wait_for": fix(d.wait_for)})

        runs = [r.model_copy(update={"data": fix_data(r.data), "output_dir": fix(r.output_dir), "resume_from": fix(r.resume_from)})
                for r in self.runs]
        output = self.output.model_copy(update={"dir": fix(self.output.dir), "checkpoint_dir": fix(self.output.checkpoint_dir)})
        return self.model_copy(update={"data": fix_data(self.data), "output": output, "resume_from": fix(self.resume_from),
                                       "runs": runs})
