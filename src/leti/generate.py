"""Sampling completions from a policy: the base model plus, from iteration 1 on, a LoRA adapter.

What the model continues is `reward token + prompt + "\\n"` (the newline only when the prompt does
not already end with one). MBPP prompts end with the closing `\"\"\"` of a docstring; ending the
input there would make the model produce the line break itself, splitting a token (`\"\"\"\\n`) the
tokenizer normally keeps whole. The stored completion begins with that newline, so that
`Problem.program(completion)` is exactly the text the model saw, without the reward token.

The decoder is a continuous batch over a KV cache: a sequence leaves the batch the step it ends
(end token, stop sequence or length) and the next prompts, sorted by length, take the free rows.
Plain batched `generate` instead computes every finished row until the longest one ends.

Sampling is per sample: each one draws its uniforms from its own generator, seeded from
(seed, task_id, sample_index), so its tokens depend only on its own logits, not on which other
samples share its batch. Rows are left-padded in the cache, so logits can still differ in their
last bits with the batch; reruns with the same settings and threads are identical.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from leti.config import Device, GenerationSettings, ModelDtype
from leti.errors import LetiError
from leti.io import read_jsonl, write_jsonl
from leti.model.device import inference_dtype, resolve_device, set_cpu_threads
from leti.model.tokens import RewardPrefix, padding_id, reward_token
from leti.progress import StageProgress
from leti.records import FinishReason, Problem, Sample
from leti.shards import WHOLE, Shard
from leti.tasks.own_tests import strip_own_tests

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

# What peft writes beside an adapter's weights; a folder without it holds a whole model.
ADAPTER_CONFIG = "adapter_config.json"
# A refill prefills its prompts in one forward pass; waiting for a few free rows amortises it.
REFILL_FRACTION = 4


class GenerationError(LetiError):
    """Generation that cannot run as asked."""


@dataclass(frozen=True)
class PolicyInput:
    """`text` is what the model continues; `lead`, the end of it after the prompt, starts every completion."""

    text: str
    lead: str


def policy_input(problem: Problem, prefix: RewardPrefix) -> PolicyInput:
    lead = "" if problem.prompt.endswith("\n") else "\n"
    return PolicyInput(reward_token(prefix) + problem.prompt + lead, lead)


def remove_prefix(text: str, prefix: str) -> str:
    """`text` without its leading `prefix`, which must be there: never a strip of characters."""
    if not text.startswith(prefix):
        raise GenerationError(f"expected text starting with {prefix!r}, got {text[: len(prefix) + 20]!r}")
    return text[len(prefix) :]


def stop_index(text: str, stop_sequences: Sequence[str]) -> int | None:
    """Where the earliest stop sequence in `text` begins, or None."""
    found = [index for stop in stop_sequences if stop and (index := text.find(stop)) >= 0]
    return min(found, default=None)


def without_own_tests(problem: Problem, completion: str) -> str:
    """The completion after the stop cut, without its own test code if the problem asks for that."""
    return strip_own_tests(problem.prompt, completion) if problem.strip_own_tests else completion


def sample_seed(seed: int, task_id: str, sample_index: int) -> int:
    """A per-sample seed, stable across runs, machines and batch layouts."""
    digest = hashlib.sha256(f"{seed}\0{task_id}\0{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class NonFiniteLogits(GenerationError):
    """Rows whose logits hold a NaN or +inf, or nothing but -inf (float16 overflows)."""

    def __init__(self, rows: list[int]):
        super().__init__(f"non-finite logits in rows {rows}")
        self.rows = rows


def choose_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else inverse-CDF sampling with each row's uniform.

    Drawing through a given uniform (not `torch.multinomial` on a shared generator) is what keeps
    a row's choice independent of the other rows. Non-finite logits raise NonFiniteLogits rather
    than turn into a silent choice: argmax takes a NaN, and the CDF of NaNs ends on the
    vocabulary's last token. The check reads values computed anyway (the row's maximum, the CDF's
    total), which are non-finite exactly then; a -inf beside finite logits is a token never chosen.
    """
    if temperature == 0:
        best, index = logits.max(dim=-1)
        _check_finite(best)
        return index
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        probs = probs * ((probs.cumsum(dim=-1, dtype=torch.float64) - probs) < top_p)
    # A float32 running sum over 150k entries drifts by more than the smallest probabilities.
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    _check_finite(cdf[:, -1])
    targets = uniforms.to(device=cdf.device, dtype=cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    index = torch.searchsorted(cdf, targets, right=True).clamp_max(cdf.shape[-1] - 1)
    return (order.gather(-1, index) if order is not None else index).squeeze(-1)


def _check_finite(per_row: torch.Tensor) -> None:
    bad = ~torch.isfinite(per_row)
    if bool(bad.any()):
        raise NonFiniteLogits(bad.nonzero().flatten().tolist())


def load_policy(
    model_dir: Path,
    adapter_dir: Path | None,
    dtype: ModelDtype = "auto",
    device: Device = "auto",
    merge_adapter: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The prepared base model with the adapter (merged in, or beside the weights), or the whole
    fine-tuned model that `adapter_dir` holds, in eval mode on `device` (leti.model.device).

    The base is loaded straight in the inference dtype, as fine-tuning loads it: a float32 copy
    first would double the peak memory (4 GB for Qwen-0.5B). Merged, the adapter costs nothing
    per token, but its update is rounded into the bfloat16 weights; unmerged, peft computes it in
    float32 beside them (docs/model-and-generation.md#merged-or-unmerged-adapter).
    """
    target = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    # An iteration fine-tuned with `method: full` saved the whole model in place of an adapter.
    whole_model = adapter_dir is not None and not (adapter_dir / ADAPTER_CONFIG).is_file()
    model = AutoModelForCausalLM.from_pretrained(
        adapter_dir if whole_model else model_dir, local_files_only=True, dtype=inference_dtype(dtype, target)
    )
    if adapter_dir is not None and not whole_model:
        from peft import PeftModel

        try:
            adapted = PeftModel.from_pretrained(model, adapter_dir)
            # Unmerged, the base model itself runs: peft injected its layers into it.
            model = adapted.merge_and_unload() if merge_adapter else _with_token_rows_merged(adapted)
        except (ValueError, RuntimeError) as error:
            raise GenerationError(
                f"adapter {adapter_dir} does not fit the model {model_dir}: {error}"
            ) from None
    # Prefill asks for the last position's logits only, a strided [batch, 1, hidden] slice.
    # torch.matmul folds such an input into a matrix when the weight requires grad; for a frozen
    # weight (as peft leaves them, merged or not) it broadcasts the 150k-row output embedding
    # over the batch instead: 8 GB for a prefill of 32 prompts.
    model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    model.to(target)
    model.eval()
    return model, tokenizer


def _with_token_rows_merged(adapted: PeftModel) -> PreTrainedModel:
    """The adapted base model, its LoRA layers unmerged and its trained embedding rows (the LETI
    tokens') written into the embedding.

    Unmerged, peft copies the whole embedding matrix to put those rows in at every forward pass
    (twice for a tied output layer: 270 MB each for Qwen-0.5B); it rounds them to the weights'
    dtype there too, so writing them in once computes the same.
    """
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    for module in adapted.modules():
        if isinstance(module, TrainableTokensLayer):
            module.merge()
    return adapted.get_base_model()


def _contiguous_input(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (args[0].contiguous(), *args[1:])


@dataclass(frozen=True)
class Request:
    """One sample to generate."""

    problem: Problem
    sample_index: int
    seed: int
    prompt_ids: tuple[int, ...]
    lead: str


@dataclass
class _Row:
    request: Request
    uniforms: torch.Tensor
    tokens: list[int] = field(default_factory=list)


@dataclass
class _Batch:
    """The running sequences: row i of every tensor and of every cache layer belongs to rows[i]."""

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor

    def take(self, index: list[int], rows: list[_Row]) -> _Batch:
        """The tensor rows `index` (a row may repeat) as a batch of `rows`; cache columns that
        no remaining row attends to are dropped."""
        select = torch.tensor(index, device=self.mask.device)
        mask = self.mask.index_select(0, select)
        first = int(mask.any(dim=0).int().argmax())
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, select)[:, :, first:]
            layer.values = layer.values.index_select(0, select)[:, :, first:]
        return _Batch(
            rows,
            self.cache,
            mask[:, first:],
            self.positions.index_select(0, select),
            self.logits.index_select(0, select),
        )


class SequenceEnd:
    """When a sequence ends (an end token, a stop sequence, `max_new_tokens`) and the Sample it leaves."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: GenerationSettings
    ):
        self.tokenizer = tokenizer
        self.settings = settings
        # A special token never belongs in a program: EOS, <|endoftext|>, the LETI tokens, FIM markers...
        self.end_ids = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
        eos = model.generation_config.eos_token_id
        self.end_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.end_ids.add(tokenizer.eos_token_id)

    def of(self, row: _Row) -> Sample | None:
        """The finished Sample when the row's last token ends it, else None."""
        if row.tokens[-1] in self.end_ids:
            return self._sample(row, self._text(row.request, row.tokens[:-1]), "eos")
        text = self._text(row.request, row.tokens)
        cut = stop_index(text, row.request.problem.stop_sequences)
        if cut is not None:
            return self._sample(row, text[:cut], "stop")
        if len(row.tokens) == self.settings.max_new_tokens:
            return self._sample(row, text, "length")
        return None

    def _text(self, request: Request, tokens: list[int]) -> str:
        """The completion so far: the lead plus the decoded tokens, exactly as they continue the input.

        Decoding after the last input token and removing that token's own text keeps word-initial
        spaces that some tokenizers (SentencePiece) drop at the start of a decode.
        """
        context = list(request.prompt_ids[-1:])
        before = self._decode(context)
        return request.lead + remove_prefix(self._decode(context + tokens), before)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _sample(self, row: _Row, completion: str, reason: FinishReason) -> Sample:
        request = row.request
        return Sample(
            task_id=request.problem.task_id,
            completion=without_own_tests(request.problem, completion),
            policy_iteration=self.settings.policy_iteration,
            sample_index=request.sample_index,
            seed=request.seed,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(row.tokens),
            finish_reason=reason,
        )


class CachedForward:
    """The model's side of decoding: new prompts into the KV cache, then one token per row a step."""

    def __init__(self, model: PreTrainedModel, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.device = model.device
        self.cache_argument = cache_argument(model)

    def prefill(self, rows: list[_Row]) -> _Batch:
        """Run the rows' prompts through the model; rows of one prompt share a single prefill row."""
        unique = list(dict.fromkeys(row.request.prompt_ids for row in rows))
        width = max(len(ids) for ids in unique)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in unique], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in unique], device=self.device)
        positions = (mask.cumsum(dim=-1) - 1).clamp_min(0)
        cache = DynamicCache()
        output = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_argument: cache},
        )
        prompts = _Batch([], cache, mask, positions[:, -1] + 1, output.logits[:, -1])
        where = {ids: i for i, ids in enumerate(unique)}
        return prompts.take([where[row.request.prompt_ids] for row in rows], rows)

    def step(self, batch: _Batch) -> _Batch:
        """Feed every row's last token; the batch with the logits of the next one."""
        tokens = [row.tokens[-1] for row in batch.rows]
        mask = F.pad(batch.mask, (0, 1), value=1)
        output = self.model(
            input_ids=torch.tensor(tokens, device=self.device).unsqueeze(-1),
            attention_mask=mask,
            position_ids=batch.positions.unsqueeze(-1),
            use_cache=True,
            **{self.cache_argument: batch.cache},
        )
        return _Batch(batch.rows, batch.cache, mask, batch.positions + 1, output.logits[:, -1])


def cache_argument(model: PreTrainedModel) -> str:
    """The name under which the model's forward takes the KV cache: `cache` from transformers 5.24
    on, `past_key_values` before (5.24 still takes it, with a warning, until its removal in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def merged(batch: _Batch | None, new: _Batch) -> _Batch:
    """Both batches in one, left-padded to a common cache length."""
    if batch is None:
        return new
    width = max(batch.mask.shape[1], new.mask.shape[1])
    for old_layer, new_layer in zip(batch.cache.layers, new.cache.layers, strict=True):
        old_layer.keys = _cat_left_padded(old_layer.keys, new_layer.keys, width, dim=2)
        old_layer.values = _cat_left_padded(old_layer.values, new_layer.values, width, dim=2)
    return _Batch(
        batch.rows + new.rows,
        batch.cache,
        _cat_left_padded(batch.mask, new.mask, width, dim=1),
        torch.cat([batch.positions, new.positions]),
        torch.cat([batch.logits, new.logits]),
    )


class Decoder:
    """Continuous-batch sampling for one model and tokenizer: which requests run, and which token
    each row takes next. The model's forward passes are `CachedForward`'s, the ends `SequenceEnd`'s."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: GenerationSettings
    ):
        self.tokenizer = tokenizer
        self.settings = settings
        self.forward = CachedForward(model, padding_id(tokenizer))
        self.end = SequenceEnd(model, tokenizer, settings)

    def requests(self, problems: Sequence[Problem]) -> list[Request]:
        requests = []
        for problem in problems:
            model_input = policy_input(problem, self.settings.reward_prefix)
            ids = tuple(self.tokenizer(model_input.text)["input_ids"])
            for index in range(self.settings.n):
                seed = sample_seed(self.settings.seed, problem.task_id, index)
                requests.append(Request(problem, index, seed, ids, model_input.lead))
        return requests

    def run(
        self, requests: Sequence[Request], on_done: Callable[[Sample], None] = lambda _: None
    ) -> list[Sample]:
        """Generate every request; samples come back in request order."""
        # Longest first: similar lengths share a prefill, and the big prefills happen while the batch is full.
        queue = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids))
        results: dict[int, Sample] = {}
        index_of = {id(request): i for i, request in enumerate(requests)}
        batch: _Batch | None = None
        size = self.settings.batch_size
        refill_at = max(1, size // REFILL_FRACTION)
        with torch.inference_mode():
            while queue or batch is not None:
                free = size - (len(batch.rows) if batch else 0)
                if queue and (batch is None or free >= refill_at):
                    taken, queue = queue[:free], queue[free:]
                    batch = merged(batch, self.forward.prefill([self._row(requests[i]) for i in taken]))
                assert batch is not None
                keep = []
                for row_index, (row, token) in enumerate(zip(batch.rows, self._choose(batch), strict=True)):
                    row.tokens.append(token)
                    sample = self.end.of(row)
                    if sample is None:
                        keep.append(row_index)
                    else:
                        results[index_of[id(row.request)]] = sample
                        on_done(sample)
                if not keep:
                    batch = None
                    continue
                if len(keep) < len(batch.rows):
                    batch = batch.take(keep, [batch.rows[i] for i in keep])
                batch = self.forward.step(batch)
        return [results[i] for i in range(len(requests))]

    def _choose(self, batch: _Batch) -> list[int]:
        uniforms = torch.stack([row.uniforms[len(row.tokens)] for row in batch.rows])
        settings = self.settings
        try:
            return choose_tokens(batch.logits, uniforms, settings.temperature, settings.top_p).tolist()
        except NonFiniteLogits as error:
            row = batch.rows[error.rows[0]]
            raise GenerationError(
                f"non-finite logits (NaN or inf) for task {row.request.problem.task_id!r}, sample "
                f"{row.request.sample_index}, after {len(row.tokens)} generated tokens, in "
                f"{batch.logits.dtype}: the model overflowed. Set model.dtype to float32 (or bfloat16 "
                "where the hardware computes it)."
            ) from None

    def _row(self, request: Request) -> _Row:
        """A row for the request, with the uniforms its tokens are drawn with (its own generator)."""
        generator = torch.Generator().manual_seed(request.seed)
        uniforms = torch.rand(self.settings.max_new_tokens, generator=generator, dtype=torch.float64)
        return _Row(request, uniforms)


def _cat_left_padded(first: torch.Tensor, second: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    def pad(tensor: torch.Tensor) -> torch.Tensor:
        missing = width - tensor.shape[dim]
        if missing == 0:
            return tensor
        # F.pad lists (left, right) pairs from the last dimension backwards.
        spec = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
        return F.pad(tensor, spec)

    return torch.cat([pad(first), pad(second)], dim=0)


class _RateColumn(ProgressColumn):
    """Samples and tokens per second since the start: rich's own speed is a recent-window figure."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if not elapsed:
            return Text("")
        rate = f"{task.completed / elapsed:.2f} samples/s {task.fields['tokens'] / elapsed:.0f} tok/s"
        return Text(rate, style="progress.data.speed")


def generate_file(
    model_dir: Path,
    tasks: Path,
    output: Path,
    settings: GenerationSettings,
    adapter_dir: Path | None = None,
    threads: int = 1,
    console: Console | None = None,
    shard: Shard = WHOLE,
) -> list[Sample]:
    """Sample every problem of a task file, or one shard of its requests (leti.shards), and write
    `samples.jsonl` (ordered by task, then sample)."""
    set_cpu_threads(threads)
    torch.manual_seed(settings.seed)
    problems = read_jsonl(tasks, Problem)[: settings.max_problems]
    model, tokenizer = load_policy(
        model_dir, adapter_dir, settings.dtype, settings.device, settings.merge_adapter
    )
    decoder = Decoder(model, tokenizer, settings)
    requests = shard.of(decoder.requests(problems))
    log.info(
        "%d problems x %d samples, shard %s: %d samples, %s on %s, %d thread(s), batch %d",
        len(problems), settings.n, shard, len(requests), model.dtype, model.device, threads, settings.batch_size,
    )  # fmt: skip
    progress = StageProgress(
        TextColumn("generate"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
    )
    generated = 0
    with progress:
        task = progress.add_task("generate", total=len(requests), tokens=0)

        def done(sample: Sample) -> None:
            nonlocal generated
            generated += sample.completion_tokens
            progress.update(task, advance=1, tokens=generated)

        samples = decoder.run(requests, done)
    write_jsonl(output, samples)
    return samples


def postprocess_samples(problems: Sequence[Problem], samples: Sequence[Sample]) -> list[Sample]:
    """Samples as their problems' post-processing (stop sequences, `strip_own_tests`) would have left
    them: what a change of post-processing gives without generating again. Exact for the cut (the
    decoder stops at the first stop sequence, as `stop_index` finds it here); `completion_tokens`
    still counts the tokens the policy generated."""
    by_id = {problem.task_id: problem for problem in problems}
    processed = []
    for sample in samples:
        problem = by_id.get(sample.task_id)
        if problem is None:
            raise GenerationError(f"sample of task {sample.task_id!r}, which is not in the task set")
        cut = stop_index(sample.completion, problem.stop_sequences)
        reason = sample.finish_reason if cut is None else "stop"
        completion = without_own_tests(problem, sample.completion[:cut])
        processed.append(sample.model_copy(update={"completion": completion, "finish_reason": reason}))
    return processed
