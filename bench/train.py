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
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
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


def measure(which: str, model: str, feedback: str, threads: int) -> dict:
    """Run one trainer in a child process; return its wall time and peak RSS."""
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            which,
            "--model",
            model,
            "--feedback",
            feedback,
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
    )
    if child.returncode != 0:
        raise SystemExit(f"{which} failed:\n{child.stderr[-3000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resources/models/base")
    parser.add_argument("--mbpp", default="../shared/data/mbpp/mbpp.jsonl")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["leti", "trl"])
    parser.add_argument("--feedback")
    args = parser.parse_args()

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
