"""Fine-tuning throughput: `leti finetune` against TRL's SFTTrainer on the same model, data and LoRA.

    .venv/bin/python bench/train.py --model resources/models/base --mbpp ../shared/data/mbpp/mbpp.jsonl

Both train one epoch over the same MBPP training texts (the gold-solution texts of the
first N train problems), LoRA r=16 on all linear layers, batch 4, learning rate 2e-4.
Each trainer runs in its own process, so peak RSS is that process's alone. TRL gets
its fastest CPU setting that this machine supports (bf16 autocast, as in BENCHMARKS.md);
leti uses its default dtype ("auto": bfloat16 weights on a CPU with AVX-512 BF16).
TRL appends an end-of-sequence token to every text (one token each, ~1% here); the
tokens/s of both are computed from the texts' own token counts. Wall times include
loading the model, as a pipeline job pays for it.
TRL is a bench-only dependency: `pip install trl`.

    .venv/bin/python bench/train.py --memory --model resources/models/base

instead measures the peak memory of one optimizer step at `forward_tokens` 4096 (16 texts of 256
tokens in one forward pass), with LoRA and with full fine-tuning, each in its own process: the
peak RSS on a CPU (the process's high-water mark, reset after a first step, read after the second),
torch.cuda.max_memory_allocated on a GPU; beside it the RSS between the two steps (weights and
optimizer state). `--setting gradient_checkpointing=true` sets another
finetune key; `--max-memory-gb` keeps a child from taking a shared machine's memory. To measure a
commit from before the chunked loss, put its sources first on the path: `PYTHONPATH=<checkout>/src`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BATCH_SIZE = 4
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def training_texts(model: str, mbpp: str, problems: int, output: Path) -> int:
    from leti.feedback import gold_examples, text_tokenizer
    from leti.io import write_jsonl
    from leti.tasks.sources import load_task_set

    tokenizer = text_tokenizer(model)
    problem_set = load_task_set("mbpp", "train", mbpp, problems)
    examples = list(gold_examples(problem_set, tokenizer.count_tokens, tokenizer.end_of_text))
    write_jsonl(output, examples)
    return sum(example.num_tokens for example in examples)


def run_leti(model: str, feedback: str, threads: int) -> float:
    from leti.config import FinetuneSettings
    from leti.finetune import finetune

    settings = FinetuneSettings(
        learning_rate=2e-4,
        batch_size=BATCH_SIZE,
        lora_r=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"],
        checkpoint_every=0,
    )
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        finetune(
            model, feedback, Path(scratch) / "adapter", Path(scratch) / "log.jsonl", settings, threads=threads
        )
        return time.perf_counter() - started


def run_trl(model: str, feedback: str, threads: int) -> float:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from leti.io import read_jsonl
    from leti.model.device import set_cpu_threads
    from leti.records import FeedbackExample

    set_cpu_threads(threads)
    texts = [example.text for example in read_jsonl(feedback, FeedbackExample)]
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(model, local_files_only=True),
            processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"text": texts}),
            peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
            args=SFTConfig(
                output_dir=scratch,
                per_device_train_batch_size=BATCH_SIZE,
                num_train_epochs=1,
                learning_rate=2e-4,
                max_length=1024,
                bf16=torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                use_cpu=not torch.cuda.is_available(),
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                dataset_num_proc=1,
                packing=False,
            ),
        )
        trainer.train()
        return time.perf_counter() - started


MEMORY_TEXTS = 16


def memory_texts(model: str, mbpp: str, tokens: int, output: Path) -> None:
    """MEMORY_TEXTS training texts of more than `tokens` tokens (MBPP gold texts run together),
    which `max_length` cuts to exactly that: one forward pass of MEMORY_TEXTS x `tokens` tokens."""
    from leti.feedback import gold_examples, text_tokenizer
    from leti.io import write_jsonl
    from leti.tasks.sources import load_task_set

    tokenizer = text_tokenizer(model)
    problems = load_task_set("mbpp", "train", mbpp)
    texts, current = [], ""
    for example in gold_examples(problems, tokenizer.count_tokens, tokenizer.end_of_text):
        current += example.text
        if tokenizer.count_tokens(current) > tokens:
            texts.append(example.model_copy(update={"text": current, "program_offset": 0}))
            current = ""
        if len(texts) == MEMORY_TEXTS:
            break
    write_jsonl(output, texts)


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MB."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def stop_above(limit_mb: float) -> None:
    """Ends this process once its RSS passes `limit_mb`, before the kernel's OOM killer would choose
    a process of a shared machine (an address-space limit would not do: torch and the mapped weights
    reserve far more than they touch)."""

    def watch() -> None:
        while status_mb("VmRSS") < limit_mb:
            time.sleep(0.02)
        print(f"RSS above {limit_mb:.0f} MB", file=sys.stderr, flush=True)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def step_memory(model: str, feedback: str, threads: int, settings_json: str, max_memory_gb: float) -> dict:
    """Two identical optimizer steps; the peak of the second, so that loading the model and the
    optimizer's first allocation do not count."""
    import torch

    from leti.config import FinetuneSettings
    from leti.finetune import finetune

    if max_memory_gb:
        stop_above(max_memory_gb * 1024)
    on_gpu = torch.cuda.is_available()
    peak: dict = {}

    def on_step(step) -> None:
        if step.step == 1 and on_gpu:
            torch.cuda.reset_peak_memory_stats()
        elif step.step == 1:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            peak.update(resident_mb=status_mb("VmRSS"))
        else:
            peak.update(
                peak_mb=torch.cuda.max_memory_allocated() / 2**20 if on_gpu else status_mb("VmHWM"),
                kind="cuda max_memory_allocated" if on_gpu else "peak RSS",
                tokens_per_s=step.tokens_per_s,
            )

    with tempfile.TemporaryDirectory() as scratch:
        finetune(
            model,
            feedback,
            Path(scratch) / "out",
            Path(scratch) / "log.jsonl",
            FinetuneSettings.model_validate_json(settings_json),
            threads=threads,
            on_step=on_step,
        )
    return peak


def report_memory(args: argparse.Namespace) -> None:
    import leti

    tokens = args.forward_tokens // MEMORY_TEXTS
    # Only the keys given: a commit from before a key does not know it.
    extra = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.setting)}
    print(
        f"one optimizer step, {MEMORY_TEXTS} texts x {tokens} tokens in one forward pass, {args.threads} "
        f"threads, leti from {Path(leti.__file__).parent}, settings {extra or 'default'}"
    )
    print(f"{'method':<8}{'peak MB':>10}{'between steps MB':>18}{'tokens/s':>10}  measured as")
    with tempfile.TemporaryDirectory() as scratch:
        feedback = str(Path(scratch) / "feedback.jsonl")
        memory_texts(args.model, args.mbpp, tokens, Path(feedback))
        for method in args.methods:
            settings = dict(
                method=method,
                batch_size=MEMORY_TEXTS,
                forward_tokens=MEMORY_TEXTS * tokens,
                max_length=tokens,
                epochs=2,
                checkpoint_every=0,
                **extra,
            )
            arguments = ["--child", "memory", "--model", args.model, "--feedback", feedback]
            arguments += ["--threads", str(args.threads), "--settings", json.dumps(settings)]
            arguments += ["--max-memory-gb", str(args.max_memory_gb)]
            try:
                # glibc's malloc maps every allocation of 64 KB or more on its own, so that freed
                # tensors leave the RSS and its high-water mark follows live memory, not the heap's
                # fragments from the first step.
                result = child_result(arguments, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
            except SystemExit as failure:
                print(f"{method:<8}{'failed':>10}  {str(failure).splitlines()[-1][:200]}")
                continue
            resident = f"{result['resident_mb']:.0f}" if "resident_mb" in result else "-"
            print(
                f"{method:<8}{result['peak_mb']:>10.0f}{resident:>18}{result['tokens_per_s']:>10.1f}  {result['kind']}"
            )


def child_result(arguments: list[str], env: dict[str, str] | None = None) -> dict:
    """Run this script as a child with `arguments`; its last line of output is its JSON result."""
    child = subprocess.run(
        [sys.executable, __file__, *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if child.returncode != 0:
        raise SystemExit(f"{arguments} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def measure(which: str, model: str, feedback: str, threads: int) -> dict:
    """Run one trainer in a child process; return its wall time and peak RSS."""
    return child_result(
        ["--child", which, "--model", model, "--feedback", feedback, "--threads", str(threads)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resources/models/base")
    parser.add_argument("--mbpp", default="../shared/data/mbpp/mbpp.jsonl")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["leti", "trl", "memory"])
    parser.add_argument("--feedback")
    parser.add_argument("--settings", help="A memory child's FinetuneSettings as JSON.")
    parser.add_argument("--memory", action="store_true", help="The peak memory of one optimizer step.")
    parser.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--forward-tokens", type=int, default=4096, help="Tokens of the step's one pass.")
    parser.add_argument(
        "--setting", action="append", default=[], help="KEY=JSON, another finetune key (repeatable)."
    )
    parser.add_argument(
        "--max-memory-gb", type=float, default=0, help="Each child stops above this RSS; 0: never."
    )
    args = parser.parse_args()

    if args.child == "memory":
        print(
            json.dumps(
                step_memory(args.model, args.feedback, args.threads, args.settings, args.max_memory_gb)
            )
        )
        return
    if args.memory:
        report_memory(args)
        return
    if args.child:
        seconds = (run_leti if args.child == "leti" else run_trl)(args.model, args.feedback, args.threads)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))
        return

    with tempfile.TemporaryDirectory() as scratch:
        feedback = str(Path(scratch) / "feedback.jsonl")
        tokens = training_texts(args.model, args.mbpp, args.problems, Path(feedback))
        print(
            f"{args.problems} MBPP train texts, {tokens} tokens, batch {BATCH_SIZE}, 1 epoch, {args.threads} threads"
        )
        results = {which: measure(which, args.model, feedback, args.threads) for which in ("leti", "trl")}
    print(f"{'trainer':<18}{'wall s':>10}{'tokens/s':>12}{'peak RSS MB':>14}")
    for which, result in results.items():
        rate = tokens / result["seconds"]
        print(f"{which:<18}{result['seconds']:>10.1f}{rate:>12.1f}{result['peak_rss_mb']:>14.0f}")
    speedup = results["trl"]["seconds"] / results["leti"]["seconds"]
    memory = results["leti"]["peak_rss_mb"] / results["trl"]["peak_rss_mb"]
    print(f"leti / TRL: {speedup:.2f}x tokens/s, {memory:.2f}x peak memory")


if __name__ == "__main__":
    main()
