"""The GPU smoke check: what a GPU node must do before `configs/paper.yaml` runs there, as one table.

    bash bench/gpu_smoke.sh            # on a CUDA GPU: real sizes, about 10 minutes on one H100
    bash bench/gpu_smoke.sh --cpu      # anywhere: the same checks on a tiny model (CI runs this)

Every check runs in a process of its own (peak memory is per process, and a crash or a hang stays in
its row), and the table is printed at the end; the exit status is 1 when a check failed. Models are
random weights in the shapes of Qwen2.5-Coder-0.5B and CodeGen-350M-mono with a small byte-level
tokenizer (token ids past it decode to nothing), so nothing is downloaded: speed and memory depend on
the shapes, not on the weights.

Checks: the device (torch, CUDA, the GPU, native bfloat16); the device-touching tests; decoder
tokens/s at several batch sizes for both shapes; step time and peak memory of full fine-tuning; a
fine-tuning job killed and resumed against one that ran through; the probe twice, byte for byte; and
a reduced `configs/paper.yaml` DAG (8 problems x 8 samples, 1 iteration) through Snakemake.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_MBPP = REPO.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"
CHECK_TIMEOUT_S = 900

TOKENIZER_CORPUS = '''"""Write a function to find the shared elements of two lists."""
def similar_elements(first, second):
    return tuple(set(first) & set(second))
assert similar_elements((3, 4, 5, 6), (5, 7, 4, 10)) == (4, 5)
Traceback (most recent call last):
  File "program.py", line 3, in <module>
AssertionError
'''


@dataclass(frozen=True)
class Scale:
    """How big each check is: real sizes on a GPU, tiny ones on a CPU."""

    device: str
    shapes: tuple[str, ...]
    batches: tuple[int, ...]
    new_tokens: int
    forward_tokens: int
    train_texts: int
    text_tokens: int
    tests: tuple[str, ...]
    # The reduced paper DAG's task sets: on a CPU, fewer jobs keep it to a few minutes.
    evaluated: tuple[str, ...]
    probed: tuple[str, ...]


GPU = Scale(
    device="cuda",
    shapes=("qwen-0.5b", "codegen-350m"),
    batches=(64, 128, 256, 512),
    new_tokens=128,
    forward_tokens=4096,
    train_texts=64,
    text_tokens=512,
    tests=(
        "tests/test_generate.py",
        "tests/test_finetune.py",
        "tests/test_probe.py",
        "tests/test_resources.py",
    ),
    evaluated=("mbpp/test", "humaneval/test"),
    probed=("mbpp/test",),
)
CPU = Scale(
    device="cpu",
    shapes=("tiny", "tiny-codegen"),
    batches=(2, 4),
    new_tokens=8,
    forward_tokens=256,
    train_texts=16,
    text_tokens=48,
    tests=("tests/test_resources.py::test_devices_resolve",),
    evaluated=("mbpp/test",),
    probed=(),
)


def write_model(folder: Path, shape: str) -> Path:
    """A random model of `shape` with a small byte-level tokenizer, as a plain Hugging Face folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CodeGenConfig,
        CodeGenForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([TOKENIZER_CORPUS] * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    configs = {
        "qwen-0.5b": lambda: Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
            rope_theta=1e6, tie_word_embeddings=True, eos_token_id=eos,
        ),
        "codegen-350m": lambda: CodeGenConfig(
            vocab_size=51200, n_embd=1024, n_layer=20, n_head=16, rotary_dim=32, n_positions=2048,
            n_ctx=2048, tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos,
        ),
        "tiny": lambda: Qwen2Config(
            vocab_size=len(tokenizer) + 64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            tie_word_embeddings=True, eos_token_id=eos,
        ),
        "tiny-codegen": lambda: CodeGenConfig(
            vocab_size=len(tokenizer) + 64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=1024,
            n_ctx=1024, tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos,
        ),
    }  # fmt: skip
    config = configs[shape]()
    torch.manual_seed(0)
    model_class = CodeGenForCausalLM if config.model_type == "codegen" else Qwen2ForCausalLM
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prepared_model(workdir: Path, shape: str) -> Path:
    """The shaped model as `leti model prepare` leaves it (LETI tokens added), made once per run."""
    from leti.model.sources import prepare_model

    prepared = workdir / "models" / shape
    if not prepared.exists():
        raw = write_model(workdir / "models" / f"{shape}-raw", shape)
        prepare_model(str(raw), prepared)
    return prepared


def synthetic_problems(count: int):
    from leti.records import Problem

    return [
        Problem(
            task_id=f"smoke/{index}",
            dataset="smoke",
            split="test",
            prompt=f'"""Write a function number {index} that returns the shared elements of two lists."""\n',
            test_code="assert f([1], [1]) == {1}",
            reference_solution="def f(a, b):\n    return set(a) & set(b)\n",
        )
        for index in range(count)
    ]


def peak_memory_gb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


# --- the checks; each returns the text of its result cell and raises when it fails


def check_device(scale: Scale, workdir: Path) -> str:
    import peft
    import torch
    import transformers

    from leti.model.device import inference_dtype, native_bf16, resolve_device, training_dtype

    device = resolve_device(scale.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
        f"peft {peft.__version__}; {name}; native bf16 {native_bf16(device)}; "
        f"generate in {inference_dtype('auto', device)}, train in {training_dtype('auto', device)}"
    )


def check_tests(scale: Scale, workdir: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *scale.tests],
        cwd=REPO, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S,
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-300:]
    if result.returncode != 0:
        raise RuntimeError(f"{summary}\n{result.stdout[-3000:]}")
    return summary


def check_decode(scale: Scale, workdir: Path) -> str:
    from leti.config import GenerationSettings
    from leti.generate import Decoder, load_policy

    rates = []
    for shape in scale.shapes:
        model, tokenizer = load_policy(prepared_model(workdir, shape), None, "auto", scale.device)
        for batch in scale.batches:
            settings = GenerationSettings(
                n=batch, temperature=1.0, top_p=1.0, max_new_tokens=scale.new_tokens, batch_size=batch,
                seed=0, policy_iteration=0, reward_prefix="none", device=scale.device,
            )  # fmt: skip
            decoder = Decoder(model, tokenizer, settings)
            # Two rounds of a full batch: one prefill-heavy start, then steady decoding.
            requests = decoder.requests(synthetic_problems(2))
            started = time.perf_counter()
            samples = decoder.run(requests)
            seconds = time.perf_counter() - started
            tokens = sum(sample.completion_tokens for sample in samples)
            rates.append(f"{shape} b{batch}: {tokens / seconds:,.0f} tok/s")
        del model
    return "; ".join(rates)


def feedback_file(workdir: Path, scale: Scale) -> Path:
    from leti.io import write_jsonl
    from leti.records import FeedbackExample

    path = workdir / "feedback.jsonl"
    line = "def f(a, b):\n    return set(a) & set(b)\n"
    text = line * (scale.text_tokens // 12 + 1)
    write_jsonl(
        path,
        [
            FeedbackExample(task_id=f"smoke/{index}", sample_index=0, mode="textual", reward="good",
                            num_tokens=scale.text_tokens, program_offset=9, text=f"<|good|>{index}\n{text}")
            for index in range(scale.train_texts)
        ],
    )  # fmt: skip
    return path


def finetune_settings(scale: Scale, **changes):
    from leti.config import FinetuneSettings

    values = {
        "method": "full", "learning_rate": 1e-5, "batch_size": 8, "gradient_accumulation_steps": 1,
        "forward_tokens": scale.forward_tokens, "max_length": scale.text_tokens, "device": scale.device,
        "checkpoint_every": 1,
    }  # fmt: skip
    return FinetuneSettings(**{**values, **changes})


def check_full_finetune(scale: Scale, workdir: Path) -> str:
    from leti.finetune import finetune

    model = prepared_model(workdir, scale.shapes[0])
    started = time.perf_counter()
    log = finetune(
        model,
        feedback_file(workdir, scale),
        workdir / "full",
        workdir / "full.jsonl",
        finetune_settings(scale),
    )
    seconds = time.perf_counter() - started
    step = sorted(entry.tokens / entry.tokens_per_s for entry in log)[len(log) // 2]
    return (
        f"{scale.shapes[0]}, {len(log)} steps of 8 x {scale.text_tokens} tokens: median step {step:.2f} s, "
        f"{seconds:.0f} s in all with loading, peak {peak_memory_gb(scale.device):.1f} GB"
    )


class Killed(Exception):
    pass


def check_resume(scale: Scale, workdir: Path) -> str:
    """LoRA with dropout, so the resumed run must also continue the device's random stream."""
    from leti.finetune import finetune
    from leti.io import read_jsonl
    from leti.records import TrainStep

    model = prepared_model(workdir, scale.shapes[0])
    feedback = feedback_file(workdir, scale)
    settings = finetune_settings(scale, method="lora", learning_rate=1e-3, batch_size=2, lora_dropout=0.1)
    finetune(model, feedback, workdir / "through", workdir / "through.jsonl", settings)

    def kill_after_two(step) -> None:
        if step.step == 2:
            raise Killed

    checkpoints = workdir / "checkpoints"
    try:
        finetune(model, feedback, workdir / "resumed", workdir / "resumed.jsonl", settings,
                 checkpoint_dir=checkpoints, on_step=kill_after_two)  # fmt: skip
        raise RuntimeError("the kill never came")
    except Killed:
        pass
    finetune(
        model, feedback, workdir / "resumed", workdir / "resumed.jsonl", settings, checkpoint_dir=checkpoints
    )
    through = [step.loss for step in read_jsonl(workdir / "through.jsonl", TrainStep)]
    resumed = [step.loss for step in read_jsonl(workdir / "resumed.jsonl", TrainStep)]
    if through != resumed:
        raise RuntimeError(f"loss curves differ: {through} against {resumed}")
    weights = "adapter_model.safetensors"
    if not filecmp.cmp(workdir / "through" / weights, workdir / "resumed" / weights, shallow=False):
        raise RuntimeError("the resumed adapter differs from the uninterrupted one")
    return f"killed after step 2 of {len(through)}, resumed: same losses, adapter byte-identical"


def check_probe(scale: Scale, workdir: Path) -> str:
    from leti.io import write_jsonl

    model = prepared_model(workdir, scale.shapes[0])
    tasks = workdir / "probe-tasks.jsonl"
    write_jsonl(tasks, synthetic_problems(16))
    settings = json.dumps({"max_problems": 16, "forward_tokens": scale.forward_tokens, "dtype": "float32",
                           "device": scale.device})  # fmt: skip
    outputs = []
    for run in (1, 2):
        output = workdir / f"probe-{run}.json"
        subprocess.run(
            ["leti", "probe", "--model", str(model), "--tasks", str(tasks), "--policy", "base",
             "--output", str(output), "--settings", settings],
            check=True, capture_output=True, timeout=CHECK_TIMEOUT_S,
        )  # fmt: skip
        outputs.append(output.read_bytes())
    if outputs[0] != outputs[1]:
        raise RuntimeError("two runs of the probe wrote different bytes")
    return f"two runs, {len(outputs[0])} bytes each, identical"


def check_paper_dag(scale: Scale, workdir: Path) -> str:
    """configs/paper.yaml cut to 8 problems x 8 samples and 1 iteration, on the CodeGen-shaped model."""
    import yaml

    mbpp = os.environ.get("LETI_MBPP_PATH") or (str(SHARED_MBPP) if SHARED_MBPP.is_file() else None)
    run = workdir / "paper"
    run.mkdir()
    shutil.copy(REPO / "config.yaml", run / "config.yaml")
    reduced = {
        "iterations": 1,
        "device": scale.device,
        "model": {"source": str(workdir / "models" / f"{scale.shapes[-1]}-raw")},
        "data": {"mbpp_path": mbpp, "limits": {"mbpp/train": 8, "mbpp/test": 8, "humaneval/test": 8}},
        "generate": {"n": 8, "max_new_tokens": scale.new_tokens * 2},
        "evaluate": {
            "n": 2,
            "max_new_tokens": scale.new_tokens * 2,
            "k": [1, 2],
            "tasks": list(scale.evaluated),
        },
        "finetune": {"epochs": 1, "max_length": scale.text_tokens * 4},
        "probe": {"max_problems": 8, "tasks": list(scale.probed)},
        "experiments": {"gold": None},
    }
    (run / "reduced.yaml").write_text(yaml.safe_dump(reduced))
    prepared_model(workdir, scale.shapes[-1])  # writes the raw folder the config names
    command = [
        "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(run), "--cores", str(os.cpu_count()),
        "--resources", "gpu=1", "--configfile", str(REPO / "configs" / "paper.yaml"), str(run / "reduced.yaml"),
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-4000:])
    jobs = result.stderr.count("Finished jobid")
    summary = next((run / "results").glob("**/summary.csv"), None)
    if summary is None:
        raise RuntimeError("the DAG finished without results/summary.csv")
    return f"{jobs} jobs in {time.perf_counter() - started:.0f} s; {summary.relative_to(run)} written"


CHECKS: dict[str, Callable[[Scale, Path], str]] = {
    "device": check_device,
    "tests on the device": check_tests,
    "decoder tokens/s": check_decode,
    "full fine-tuning": check_full_finetune,
    "kill and resume": check_resume,
    "probe twice": check_probe,
    "paper DAG, reduced": check_paper_dag,
}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def run_check(name: str, scale: Scale, workdir: Path) -> tuple[bool, str, float]:
    """One check in a process of its own: (passed, result, seconds)."""
    started = time.perf_counter()
    command = [sys.executable, __file__, "--check", name, "--workdir", str(workdir)]
    command += ["--cpu"] if scale is CPU else []
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"no result after {CHECK_TIMEOUT_S} s", time.perf_counter() - started
    seconds = time.perf_counter() - started
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0 and lines:
        return True, lines[-1], seconds
    return False, (result.stderr.strip() or result.stdout.strip())[-1500:], seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    parser.add_argument("--check", choices=list(CHECKS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--only", action="append", choices=list(CHECKS), help="run only these checks")
    args = parser.parse_args()
    scale = CPU if args.cpu else GPU
    if args.check:
        print(CHECKS[args.check](scale, args.workdir / slug(args.check)))
        return

    failed = False
    with tempfile.TemporaryDirectory(prefix="leti-gpu-smoke-") as folder:
        workdir = Path(folder)
        for name in CHECKS:
            (workdir / slug(name)).mkdir()
        rows = []
        for name in args.only or CHECKS:
            passed, result, seconds = run_check(name, scale, workdir)
            failed |= not passed
            rows.append((name, "ok" if passed else "FAILED", f"{seconds:.0f}", result.replace("\n", " / ")))
            print(f"{name}: {rows[-1][1]} ({rows[-1][2]} s)", file=sys.stderr, flush=True)
    print("| check | status | s | result |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
