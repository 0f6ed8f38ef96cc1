"""Fine-tuning of a policy on LETI training texts (LETI.md, step 4).

`method: lora` (the default here): iteration i starts from the adapter of iteration i-1, or from a
fresh LoRA on the base model, and the LETI special tokens' embedding rows train with it.
`method: full` (the reference's): every weight trains, and iteration i starts from the whole model
that iteration i-1 saved. Every optimizer
step is logged; every `checkpoint_every` steps the trainable weights, optimizer,
scheduler, random state and position in the data are saved, so a killed job that
is rerun continues where it stopped and ends with the same adapter.

`processes: N` trains data-parallel: `leti finetune` starts N copies of itself through torch's
launcher (`run_processes`), one per GPU on CUDA, gloo processes on a CPU. Every process plans
every step, so each knows every other's share without asking: the texts of a step are dealt out
over the processes, every process runs as many forward passes (zero-weight stand-ins where its
share is shorter), and the loss is divided by the whole step's token counts, so the gradient is
the one-process gradient up to float rounding.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import math
import os
import random
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel

from leti.config import FinetuneSettings, RegularizerConfig
from leti.errors import LetiError
from leti.io import (
    ArtifactError,
    atomic_directory,
    atomic_path,
    file_sha256,
    iter_jsonl,
    read_jsonl,
    write_jsonl,
)
from leti.model.device import resolve_device, set_cpu_threads, training_dtype
from leti.model.tokens import LETI_SPECIAL_TOKENS, padding_id
from leti.records import FeedbackExample, TrainStep

IGNORE_INDEX = -100
CHECKPOINT_FILE = "checkpoint.pt"
# Part of every run's fingerprint: a checkpoint in an older layout is not resumed.
CHECKPOINT_FORMAT = 2


class FinetuneError(LetiError):
    pass


@dataclass(frozen=True)
class TokenizedText:
    input_ids: list[int]
    labels: list[int]


# --- data


def tokenize_examples(
    examples: Sequence[FeedbackExample], tokenizer, max_length: int, loss_on: str
) -> list[TokenizedText]:
    """Token ids and labels; with loss_on="program", everything before the program is masked."""
    sequences = []
    for example in examples:
        encoded = tokenizer(
            example.text,
            add_special_tokens=False,
            truncation=True,
            max_length=max_length,
            return_offsets_mapping=loss_on == "program",
        )
        input_ids = list(encoded["input_ids"])
        if loss_on == "program":
            labels = [
                token if start >= example.program_offset else IGNORE_INDEX
                for token, (start, _) in zip(input_ids, encoded["offset_mapping"], strict=True)
            ]
        else:
            labels = list(input_ids)
        sequences.append(TokenizedText(input_ids, labels))
    return sequences


def regularizer_texts(corpus: str) -> Iterator[str]:
    """Documents of the regulariser corpus, in a fixed order."""
    if corpus == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        for path in sorted(root.rglob("*.py")):
            # Tests and vendored tools are not the ordinary code we want to keep the model fluent in.
            if not {"test", "tests", "idlelib", "site-packages"} & set(path.relative_to(root).parts):
                yield path.read_text(encoding="utf-8", errors="replace")
        return
    path = Path(corpus)
    if not path.is_file():
        raise FinetuneError(f"finetune.regularizer.corpus: no such file: {corpus}")
    if path.suffix == ".jsonl":
        yield from (document.text for document in iter_jsonl(path, _CorpusDocument))
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


class _CorpusDocument(BaseModel):
    text: str


def regularizer_blocks(config: RegularizerConfig, tokenizer, count: int, seed: int) -> list[TokenizedText]:
    """`count` blocks of `block_tokens` tokens cut from the corpus; documents are visited in a seeded order."""
    if count == 0:
        return []
    documents = list(regularizer_texts(config.corpus))
    random.Random(seed).shuffle(documents)
    blocks: list[TokenizedText] = []
    buffer: list[int] = []
    for document in documents:
        buffer += tokenizer(document, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            buffer.append(tokenizer.eos_token_id)
        while len(buffer) >= config.block_tokens and len(blocks) < count:
            block, buffer = buffer[: config.block_tokens], buffer[config.block_tokens :]
            blocks.append(TokenizedText(block, list(block)))
        if len(blocks) == count:
            return blocks
    if not blocks:
        raise FinetuneError(
            f"the regulariser corpus {config.corpus!r} holds fewer than {config.block_tokens} tokens"
        )
    # A small corpus is cycled rather than under-weighted.
    return [blocks[index % len(blocks)] for index in range(count)]


def plan_epoch(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled, length-grouped batches of sequence indices.

    Indices are shuffled, cut into windows of 50 batches, sorted by length inside each
    window (little padding), batched, and the batches shuffled again, so that neither
    one problem's samples nor one length class fill a batch.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda index: lengths[index], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def interleave(feedback_batches: int, ratio: float) -> list[bool]:
    """The batch schedule of one epoch: False for a feedback batch, True for a regulariser batch.

    After feedback batch b come floor((b+1)*ratio) - floor(b*ratio) regulariser batches,
    so ratio 1.0 alternates them, as the reference did.
    """
    schedule: list[bool] = []
    for batch in range(feedback_batches):
        schedule.append(False)
        schedule += [True] * (math.floor((batch + 1) * ratio) - math.floor(batch * ratio))
    return schedule


def collate(sequences: Sequence[TokenizedText], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(sequence.input_ids) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        length = len(sequence.input_ids)
        input_ids[row, :length] = torch.tensor(sequence.input_ids)
        labels[row, :length] = torch.tensor(sequence.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def predicted_tokens(sequence: TokenizedText) -> int:
    """Tokens the loss counts: each labelled token after the first, which nothing predicts."""
    return sum(label != IGNORE_INDEX for label in sequence.labels[1:])


def forward_passes(sequences: Sequence[TokenizedText], max_tokens: int) -> list[list[TokenizedText]]:
    """`sequences` split into consecutive runs whose padded size (rows x longest row) is at most
    `max_tokens`, one sequence at least. The logits of a pass take rows x longest x vocabulary
    floats (150k for Qwen), which on a CPU is most of the peak memory."""
    passes: list[list[TokenizedText]] = []
    current: list[TokenizedText] = []
    longest = 0
    for sequence in sequences:
        length = len(sequence.input_ids)
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            passes.append(current)
            current, longest = [], 0
        current.append(sequence)
        longest = max(longest, length)
    passes.append(current)
    return passes


@dataclass(frozen=True)
class TrainingPlan:
    """Every batch of every epoch, fixed before training starts so that a resumed run replays it."""

    batches: list[list[TokenizedText]]
    epoch_of_batch: list[int]

    @property
    def total_batches(self) -> int:
        return len(self.batches)


def plan_training(feedback: Sequence[TokenizedText], settings: FinetuneSettings, tokenizer) -> TrainingPlan:
    lengths = [len(sequence.input_ids) for sequence in feedback]
    epochs = [
        plan_epoch(lengths, settings.batch_size, settings.seed + epoch) for epoch in range(settings.epochs)
    ]
    schedules = [interleave(len(batches), settings.regularizer.ratio) for batches in epochs]
    regularizer_batches = sum(sum(schedule) for schedule in schedules)
    blocks = iter(
        regularizer_blocks(
            settings.regularizer, tokenizer, regularizer_batches * settings.batch_size, settings.seed
        )
    )
    batches: list[list[TokenizedText]] = []
    epoch_of_batch: list[int] = []
    for epoch, (feedback_batches, schedule) in enumerate(zip(epochs, schedules, strict=True)):
        pending = iter(feedback_batches)
        for is_regularizer in schedule:
            if is_regularizer:
                batches.append([next(blocks) for _ in range(settings.batch_size)])
            else:
                batches.append([feedback[index] for index in next(pending)])
            epoch_of_batch.append(epoch)
    return TrainingPlan(batches, epoch_of_batch)


@dataclass(frozen=True)
class WeightedPass:
    """One forward pass and the weight of its summed token losses in the step's loss."""

    sequences: list[TokenizedText]
    weight: float


def process_passes(
    batches: Sequence[Sequence[TokenizedText]], rank: int, processes: int, forward_tokens: int
) -> list[WeightedPass]:
    """The forward passes of one optimizer step that process `rank` of `processes` runs.

    The step's texts are dealt out in turn, so a step of fewer texts than processes leaves some
    with none. A pass holds texts of one batch, and weighs each token 1 / (its batch's labelled
    tokens x the step's batches): the step's loss is the mean over its batches of each batch's mean
    token loss, however the batches are split into passes and over processes.
    """
    weights = []
    for batch in batches:
        labelled = sum(predicted_tokens(sequence) for sequence in batch)
        weights.append(1 / (labelled * len(batches)) if labelled else 0.0)
    dealt = [(index, sequence) for index, batch in enumerate(batches) for sequence in batch][rank::processes]
    return [
        WeightedPass(part, weights[index])
        for index, group in itertools.groupby(dealt, key=lambda item: item[0])
        for part in forward_passes([sequence for _, sequence in group], forward_tokens)
    ]


def step_passes(
    batches: Sequence[Sequence[TokenizedText]], rank: int, processes: int, forward_tokens: int
) -> list[WeightedPass | None]:
    """`process_passes`, with None (a zero-weight stand-in) up to the most passes of any process:
    every process must run as many forward and backward passes, or the gradient all-reduce of the
    last one waits forever for the processes that ran out."""
    shares = [process_passes(batches, other, processes, forward_tokens) for other in range(processes)]
    most = max(len(share) for share in shares)
    return [*shares[rank], *[None] * (most - len(shares[rank]))]


def run_processes(processes: int, device: str, threads: int, arguments: Sequence[str]) -> int:
    """Runs `leti <arguments>` in `processes` processes started by torch's launcher (torchrun), one
    per GPU on CUDA (NCCL), gloo on a CPU, and returns its exit status. `--standalone` picks a free
    port, so jobs side by side do not collide."""
    if resolve_device(device).type == "cuda" and processes > torch.cuda.device_count():
        raise FinetuneError(
            f"finetune.processes: {processes} processes, one per GPU, but this job sees "
            f"{torch.cuda.device_count()} GPUs; give fine-tuning jobs as many (resources.gpus)"
        )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        # Without it, torchrun's parser takes `--log` for an abbreviation of its own `--log-dir`.
        "--",
        "leti.cli",
        *arguments,
    ]
    # torchrun sets 1 thread, with a warning, where OpenMP's count is not set.
    threads_each = str(max(1, threads // processes))
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": threads_each}).returncode


def launched() -> bool:
    """Is this process one of those a distributed launcher (torchrun, `accelerate launch`) started?"""
    return "WORLD_SIZE" in os.environ


def die_with_launcher() -> None:
    """Has Linux kill this process when the launcher that started it dies.

    torchrun starts each process in a session of its own, so killing the job's process group (a
    killed Snakemake, `kill -9`) would leave them training, and writing the outputs, unseen;
    the rerun would then race them."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


# --- model


def load_policy(
    model_dir: str | os.PathLike[str],
    previous: str | os.PathLike[str] | None,
    settings: FinetuneSettings,
    dtype,
    tokenizer,
):
    """The model to train. LoRA: the base model, its frozen weights in `dtype`, with the previous
    iteration's adapter, or a fresh one that also trains the LETI tokens' embedding rows. Full: every
    weight of the previous iteration's model, or of the base model, in float32."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    if settings.method == "full":
        # The master weights stay float32 from iteration to iteration: loaded in bfloat16, every
        # iteration would round what the last one learned. `dtype` is only the compute's (autocast).
        return AutoModelForCausalLM.from_pretrained(
            previous or model_dir, dtype=torch.float32, local_files_only=True
        )
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    if previous is not None:
        return PeftModel.from_pretrained(base, previous, is_trainable=True)
    special_ids = tokenizer.convert_tokens_to_ids(list(LETI_SPECIAL_TOKENS))
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in special_ids:
        raise FinetuneError(
            f"{model_dir}: the tokenizer lacks the LETI special tokens; run `leti model prepare`"
        )
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_target_modules,
        trainable_token_indices=special_ids,
    )
    return get_peft_model(base, config)


@contextlib.contextmanager
def half_precision_compute(
    model: torch.nn.Module, dtype: torch.dtype, device: torch.device
) -> Iterator[None]:
    """Runs the LoRA layers in the frozen weights' half dtype while their weights stay float32.

    peft casts each adapted layer's input to its float32 weight and keeps that copy, and its
    dropout's, for the backward pass: 1.4 GB more peak memory for four texts of up to 243
    tokens on Qwen-0.5B. Under autocast the input stays bfloat16, as TRL runs it.
    """
    if dtype == torch.float32:
        yield
        return
    from peft.tuners.lora import LoraLayer

    # peft.helpers.disable_input_dtype_casting trips over the trainable-token layers (peft 0.21).
    lora_layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    for layer in lora_layers:
        layer.cast_input_dtype_enabled = False
    try:
        # Without cache_enabled=False, autocast would reuse the first half-precision copy of each
        # LoRA weight for as long as the context lasts, and the optimizer's updates would never show.
        with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
            yield
    finally:
        for layer in lora_layers:
            layer.cast_input_dtype_enabled = True


def enable_gradient_checkpointing(policy: torch.nn.Module) -> None:
    """Each decoder layer's activations are recomputed in the backward pass instead of kept.

    Non-reentrant checkpoints: the gradient reaches the LoRA weights although the frozen layers'
    inputs need none (what the reentrant kind needs `enable_input_require_grads` for), and DDP sees
    each weight's gradient once per backward pass."""
    # Renamed in transformers 5, where the old name warns; 4.x has only the old one.
    enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
    enable({"use_reentrant": False})


class NextTokenLoss(torch.nn.Module):
    """The policy's summed next-token cross-entropy over the labelled positions of a pass.

    The output layer runs on `chunk_tokens` positions at a time, every chunk but the last under an
    activation checkpoint, so the logits of only one chunk exist at once, in the forward and in the
    backward pass: a pass of 16k positions over Qwen's 152k-token vocabulary would otherwise hold
    10 GB of float32 logits, and as much again for their gradient. The last chunk's logits are the
    first the backward pass needs, so keeping them costs no more memory than recomputing them, and
    a pass of one chunk computes nothing twice. Only labelled positions reach the output layer. The
    sum is the one transformers' causal-LM loss computes, before it divides by the count.
    """

    def __init__(self, policy: torch.nn.Module, chunk_tokens: int) -> None:
        super().__init__()
        self.policy = policy
        self.chunk_tokens = chunk_tokens

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        hidden = (
            self.policy.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        ).last_hidden_state
        targets = labels[:, 1:]
        labelled = targets != IGNORE_INDEX
        if not labelled.any():
            # Every weight takes part in every pass, as DDP's all-reduce expects: the output layer too.
            return self.policy.get_output_embeddings()(hidden[:, -1]).sum() * 0.0
        positions, targets = hidden[:, :-1][labelled], targets[labelled]
        *recomputed, kept = range(0, len(targets), self.chunk_tokens)
        chunk_losses = [
            # Nothing random runs in a chunk: no random state to keep for its recomputation.
            checkpoint(
                self._chunk_loss,
                positions[start : start + self.chunk_tokens],
                targets[start : start + self.chunk_tokens],
                use_reentrant=False,
                preserve_rng_state=False,
            )
            for start in recomputed
        ]
        return sum(chunk_losses, self._chunk_loss(positions[kept:], targets[kept:]))

    def _chunk_loss(self, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.policy.get_output_embeddings()(positions).float()
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def check_output_layer(policy: torch.nn.Module, device: torch.device) -> None:
    """`NextTokenLoss` takes the logits to be the output layer applied to the decoder's hidden
    states, as in Qwen2, Llama or CodeGen; a model that changes them further (Gemma 2 caps them)
    would train on a wrong loss. Leaves the policy in eval mode (no dropout, so nothing random)."""
    ids = torch.tensor([[0, 1]], device=device)
    policy.eval()
    with torch.no_grad():
        logits = policy(input_ids=ids).logits
        recomputed = policy.get_output_embeddings()(policy.get_decoder()(input_ids=ids).last_hidden_state)
    if not torch.allclose(logits.float(), recomputed.float(), rtol=1e-3, atol=1e-3):
        raise FinetuneError(
            f"{type(policy).__name__}: its logits are not its output layer applied to its decoder's "
            "hidden states, which the chunked loss assumes"
        )


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def _sort_target_modules(model: torch.nn.Module) -> None:
    """peft keeps the adapted modules as a set and writes them in its iteration order, which changes
    with every process's string hashing: sorted, adapter_config.json is the same file every run."""
    for config in getattr(model, "peft_config", {}).values():
        if isinstance(config.target_modules, set):
            config.target_modules = sorted(config.target_modules)


# --- checkpoints


def fingerprint(settings: FinetuneSettings, processes: int, *paths: str | os.PathLike[str] | None) -> str:
    """Identifies a training run: a checkpoint of another run is never resumed, nor one written by
    another number of processes (each keeps its own random state)."""
    digest = hashlib.sha256(settings.model_dump_json().encode())
    digest.update(f"format {CHECKPOINT_FORMAT}, {processes} processes".encode())
    for path in paths:
        if path is None:
            digest.update(b"-")
            continue
        files = (
            sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        )
        for file in files:
            digest.update(f"{file.name}:{file_sha256(file)}".encode())
    return digest.hexdigest()


def save_checkpoint(directory: Path, state: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)


def load_checkpoint(directory: Path | None, run_id: str) -> dict | None:
    if directory is None or not (directory / CHECKPOINT_FILE).is_file():
        return None
    # On the CPU whatever device wrote it: random states must be CPU tensors, and every process
    # of a data-parallel run loads it.
    state = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    return state if state.get("run_id") == run_id else None


def random_state() -> dict:
    """This process's random state. The CUDA generators only once CUDA is in use: LoRA dropout on a
    GPU draws from them, and querying them would otherwise start CUDA for nothing."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the loop

StepCallback = Callable[[TrainStep], None]


def accumulate_gradients(
    model, accelerator, passes: Sequence[WeightedPass | None], pad_id: int
) -> tuple[float, int]:
    """Forward and backward over this process's passes of one optimizer step (`step_passes`):
    (its part of the step's loss, its tokens)."""
    step_loss, step_tokens = 0.0, 0
    stand_in = WeightedPass([TokenizedText([pad_id], [IGNORE_INDEX])], 0.0)
    for index, weighted in enumerate(passes):
        sequences, weight = (weighted or stand_in).sequences, (weighted or stand_in).weight
        batch = {k: v.to(accelerator.device) for k, v in collate(sequences, pad_id).items()}
        # Gradients are averaged across processes once per step, on the last pass.
        with contextlib.nullcontext() if index == len(passes) - 1 else accelerator.no_sync(model):
            loss = model(**batch) * weight
            # DDP averages the processes' gradients, and the weights already divide by the whole step's tokens.
            accelerator.backward(loss * accelerator.num_processes)
        step_loss += loss.item()
        if weighted is not None:
            step_tokens += int(batch["attention_mask"].sum())
    return step_loss, step_tokens


def finetune(
    model_dir: str | os.PathLike[str],
    feedback_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    log_path: str | os.PathLike[str],
    settings: FinetuneSettings,
    previous_adapter: str | os.PathLike[str] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    on_step: StepCallback | None = None,
) -> list[TrainStep]:
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import AutoTokenizer, get_scheduler

    from leti.progress import StageProgress

    if launched():
        die_with_launcher()
    # device: cuda without a visible GPU fails here, before any work.
    accelerator = Accelerator(cpu=resolve_device(settings.device).type == "cpu")
    # `threads` are the job's: each of its processes takes its share.
    set_cpu_threads(max(1, threads // accelerator.num_processes) if threads else None)
    checkpoints = Path(checkpoint_dir) if checkpoint_dir else None
    run_id = fingerprint(settings, accelerator.num_processes, model_dir, feedback_path, previous_adapter)

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    pad_id = padding_id(tokenizer)
    examples = read_jsonl(feedback_path, FeedbackExample)
    if not examples:
        raise ArtifactError(f"{feedback_path}: no training examples")
    plan = plan_training(
        tokenize_examples(examples, tokenizer, settings.max_length, settings.loss_on), settings, tokenizer
    )
    # One optimizer step takes `gradient_accumulation_steps` batches, however many processes share them.
    per_step = settings.gradient_accumulation_steps
    step_starts = list(range(0, plan.total_batches, per_step))

    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    dtype = training_dtype(settings.dtype, accelerator.device)
    policy = load_policy(model_dir, previous_adapter, settings, dtype, tokenizer).to(accelerator.device)
    check_output_layer(policy, accelerator.device)
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    # Trainable weights and optimizer state in float32 even over bfloat16 weights: small updates vanish in bfloat16.
    for parameter in policy.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    policy.train()
    if accelerator.process_index:
        # Each process draws its own dropout masks; the first keeps the one-process random stream.
        # (The weights are the same everywhere: DDP copies the first process's.)
        torch.manual_seed(settings.seed + accelerator.process_index)
    optimizer = torch.optim.AdamW(
        [parameter for parameter in policy.parameters() if parameter.requires_grad],
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
    )
    scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=settings.warmup_steps,
        num_training_steps=len(step_starts),
    )
    model, optimizer = accelerator.prepare(NextTokenLoss(policy, settings.loss_chunk_tokens), optimizer)

    log: list[TrainStep] = []
    resumed = load_checkpoint(checkpoints, run_id)
    if resumed is not None:
        policy.load_state_dict(resumed["trainable"], strict=False)
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        restore_random_state(resumed["random"][accelerator.process_index])
        log = [TrainStep.model_validate(step) for step in resumed["log"]]
        accelerator.print(
            f"resuming after step {len(log)} of {len(step_starts)} ({checkpoints / CHECKPOINT_FILE})"
        )

    progress = StageProgress(
        TextColumn("finetune"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tokens_per_s]:.1f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not accelerator.is_main_process,
    )
    with progress, half_precision_compute(policy, dtype, accelerator.device):
        bar = progress.add_task(
            "finetune", total=len(step_starts), completed=len(log), loss=float("nan"), tokens_per_s=0.0
        )
        for start in step_starts[len(log) :]:
            started = time.perf_counter()
            group = range(start, min(start + per_step, plan.total_batches))
            passes = step_passes(
                [plan.batches[index] for index in group],
                accelerator.process_index,
                accelerator.num_processes,
                settings.forward_tokens,
            )
            own_loss, own_tokens = accumulate_gradients(model, accelerator, passes, pad_id)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step_loss, step_tokens = accelerator.reduce(
                torch.tensor([own_loss, own_tokens], dtype=torch.float64, device=accelerator.device), "sum"
            ).tolist()
            elapsed = time.perf_counter() - started
            step = TrainStep(
                step=len(log) + 1,
                epoch=plan.epoch_of_batch[group[0]],
                loss=step_loss,
                learning_rate=scheduler.get_last_lr()[0],
                tokens=int(step_tokens),
                tokens_per_s=step_tokens / elapsed if elapsed > 0 else 0.0,
            )
            log.append(step)
            progress.update(bar, completed=step.step, loss=step.loss, tokens_per_s=step.tokens_per_s)
            if (
                checkpoints is not None
                and settings.checkpoint_every
                and step.step % settings.checkpoint_every == 0
            ):
                # Every process's random state (a collective: all of them take part), one writer.
                random_states = gather_object([random_state()])
                if accelerator.is_main_process:
                    save_checkpoint(
                        checkpoints,
                        {
                            "run_id": run_id,
                            "trainable": trainable_state(policy),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "random": random_states,
                            "log": [entry.model_dump() for entry in log],
                        },
                    )
            if on_step is not None:
                on_step(step)

    if accelerator.is_main_process:
        with atomic_directory(output) as staging:
            _sort_target_modules(policy)
            policy.save_pretrained(staging)
        write_jsonl(log_path, log)
        if checkpoints is not None:
            (checkpoints / CHECKPOINT_FILE).unlink(missing_ok=True)
    return log
