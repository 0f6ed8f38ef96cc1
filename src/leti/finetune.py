"""Fine-tuning of a policy on LETI training texts (LETI.md, step 4).

`method: lora` (the default here): iteration i starts from the adapter of iteration i-1, or from a
fresh LoRA on the base model, and the LETI special tokens' embedding rows train with it.
`method: full` (the reference's): every weight trains, and iteration i starts from the whole model
that iteration i-1 saved. Every optimizer
step is logged; every `checkpoint_every` steps the trainable weights, optimizer,
scheduler, random state and position in the data are saved, so a killed job that
is rerun continues where it stopped and ends with the same adapter.

The loop runs through `accelerate`, so `accelerate launch -m leti.cli finetune ...`
trains data-parallel on several GPUs with no change here.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
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


def fingerprint(settings: FinetuneSettings, *paths: str | os.PathLike[str] | None) -> str:
    """Identifies a training run: a checkpoint of another run is never resumed."""
    digest = hashlib.sha256(settings.model_dump_json().encode())
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
    model, accelerator, batches: Sequence[Sequence[TokenizedText]], forward_tokens: int, pad_id: int
) -> tuple[float, int]:
    """Forward and backward over this process's batches of one optimizer step: (mean loss, tokens)."""
    step_loss, step_tokens = 0.0, 0
    for position, sequences in enumerate(batches):
        labelled = sum(predicted_tokens(sequence) for sequence in sequences)
        passes = forward_passes(sequences, forward_tokens)
        for pass_index, part in enumerate(passes):
            batch = {k: v.to(accelerator.device) for k, v in collate(part, pad_id).items()}
            # Gradients are averaged across processes once per step, on the last pass.
            last = position == len(batches) - 1 and pass_index == len(passes) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                # A sum over the pass's tokens divided by the whole batch's: the passes
                # add up to the batch's mean loss, whatever the split.
                loss = model(**batch, num_items_in_batch=labelled).loss
                accelerator.backward(loss / len(batches))
            step_loss += loss.item() / len(batches)
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
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import AutoTokenizer, get_scheduler

    from leti.progress import StageProgress

    set_cpu_threads(threads)
    # device: cuda without a visible GPU fails here, before any work.
    accelerator = Accelerator(cpu=resolve_device(settings.device).type == "cpu")
    checkpoints = Path(checkpoint_dir) if checkpoint_dir else None
    run_id = fingerprint(settings, model_dir, feedback_path, previous_adapter)

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    pad_id = padding_id(tokenizer)
    examples = read_jsonl(feedback_path, FeedbackExample)
    if not examples:
        raise ArtifactError(f"{feedback_path}: no training examples")
    plan = plan_training(
        tokenize_examples(examples, tokenizer, settings.max_length, settings.loss_on), settings, tokenizer
    )
    # One optimizer step takes `gradient_accumulation_steps` batches on each of the processes.
    per_step = settings.gradient_accumulation_steps * accelerator.num_processes
    step_starts = list(range(0, plan.total_batches, per_step))

    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    dtype = training_dtype(settings.dtype, accelerator.device)
    model = load_policy(model_dir, previous_adapter, settings, dtype, tokenizer)
    # Trainable weights and optimizer state in float32 even over bfloat16 weights: small updates vanish in bfloat16.
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    model.train()
    optimizer = torch.optim.AdamW(
        [parameter for parameter in model.parameters() if parameter.requires_grad],
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
    )
    scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=settings.warmup_steps,
        num_training_steps=len(step_starts),
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    log: list[TrainStep] = []
    resumed = load_checkpoint(checkpoints, run_id)
    if resumed is not None:
        accelerator.unwrap_model(model).load_state_dict(resumed["trainable"], strict=False)
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        restore_random_state(resumed["random"])
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
    with progress, half_precision_compute(accelerator.unwrap_model(model), dtype, accelerator.device):
        bar = progress.add_task(
            "finetune", total=len(step_starts), completed=len(log), loss=float("nan"), tokens_per_s=0.0
        )
        for start in step_starts[len(log) :]:
            started = time.perf_counter()
            group = range(start, min(start + per_step, plan.total_batches))
            mine = [plan.batches[index] for index in group][
                accelerator.process_index :: accelerator.num_processes
            ]
            step_loss, step_tokens = accumulate_gradients(
                model, accelerator, mine, settings.forward_tokens, pad_id
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            elapsed = time.perf_counter() - started
            step = TrainStep(
                step=len(log) + 1,
                epoch=plan.epoch_of_batch[group[0]],
                loss=step_loss,
                learning_rate=scheduler.get_last_lr()[0],
                tokens=step_tokens,
                tokens_per_s=step_tokens / elapsed if elapsed > 0 else 0.0,
            )
            log.append(step)
            progress.update(bar, completed=step.step, loss=step.loss, tokens_per_s=step.tokens_per_s)
            if (
                checkpoints is not None
                and settings.checkpoint_every
                and step.step % settings.checkpoint_every == 0
            ):
                save_checkpoint(
                    checkpoints,
                    {
                        "run_id": run_id,
                        "trainable": trainable_state(accelerator.unwrap_model(model)),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "random": random_state(),
                        "log": [entry.model_dump() for entry in log],
                    },
                )
            if on_step is not None:
                on_step(step)

    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model)
        with atomic_directory(output) as staging:
            _sort_target_modules(trained)
            trained.save_pretrained(staging)
        write_jsonl(log_path, log)
        if checkpoints is not None:
            (checkpoints / CHECKPOINT_FILE).unlink(missing_ok=True)
    return log
