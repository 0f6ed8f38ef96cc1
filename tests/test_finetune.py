from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from leti.config import ExperimentConfig, FeedbackSettings, FinetuneSettings, RegularizerConfig
from leti.feedback import TextTokenizer, build_feedback, text_tokenizer, training_text
from leti.finetune import (
    IGNORE_INDEX,
    TokenizedText,
    finetune,
    forward_passes,
    interleave,
    plan_epoch,
    tokenize_examples,
)
from leti.io import ArtifactError, read_jsonl, write_jsonl
from leti.records import Execution, ExecutionStatus, FeedbackExample, Problem, Sample, TrainStep

# --- feedback texts


PROBLEM = Problem(
    task_id="MBPP/2",
    dataset="mbpp",
    split="train",
    prompt='"""\nAdd two numbers.\nassert add(1, 2) == 3\n"""',
    test_code="assert add(1, 2) == 3",
    reference_solution="def add(a, b):\n    return a + b",
)
PASSING = "\ndef add(a, b):\n    return a + b\n"
FAILING = "\ndef add(a, b):\n    return a - b\n"
ASSERTION_FEEDBACK = 'Traceback (most recent call last):\n  File "program.py", line 7, in <module>\n    assert add(1, 2) == 3\nAssertionError'


def sample(index: int, completion: str) -> Sample:
    return Sample(
        task_id="MBPP/2",
        completion=completion,
        policy_iteration=0,
        sample_index=index,
        seed=0,
        prompt_tokens=9,
        completion_tokens=12,
        finish_reason="stop",
    )


def execution(index: int, status: str, feedback: str = "") -> Execution:
    return Execution(
        task_id="MBPP/2",
        sample_index=index,
        status=ExecutionStatus(status),
        exception_type="AssertionError" if status == "failed" else None,
        feedback=feedback,
        duration_s=0.01,
    )


@pytest.fixture
def rollouts(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / f"{name}.jsonl" for name in ("tasks", "samples", "executions")}
    write_jsonl(paths["tasks"], [PROBLEM])
    write_jsonl(paths["samples"], [sample(0, PASSING), sample(1, FAILING), sample(2, FAILING)])
    write_jsonl(
        paths["executions"],
        [
            execution(0, "passed"),
            execution(1, "failed", ASSERTION_FEEDBACK),
            execution(2, "sandbox_error", "docker went away"),
        ],
    )
    return paths


CHARACTERS = TextTokenizer(count_tokens=len, end_of_text="<|endoftext|>")


def feedback_texts(
    rollouts: dict[str, Path],
    mode: str,
    tmp_path: Path,
    tokenizer: TextTokenizer = CHARACTERS,
    train_on: str = "all",
) -> list[FeedbackExample]:
    output = tmp_path / f"feedback-{mode}.jsonl"
    build_feedback(
        rollouts["tasks"],
        output,
        FeedbackSettings(mode=mode, train_on=train_on),
        tokenizer,
        samples=rollouts["samples"],
        executions=rollouts["executions"],
    )
    return read_jsonl(output, FeedbackExample)


@pytest.mark.parametrize("mode", ["textual", "binary"])
def test_train_on_passed_keeps_only_the_passing_rollouts(rollouts, tmp_path: Path, mode: str) -> None:
    everything = feedback_texts(rollouts, mode, tmp_path)
    passing = feedback_texts(rollouts, mode, tmp_path, train_on="passed")
    assert [example.reward for example in everything] == ["good", "bad"]
    assert passing == everything[:1]


def test_feedback_settings_name_train_on_only_when_it_departs() -> None:
    assert json.loads(FeedbackSettings(mode="binary").as_param()) == {"mode": "binary"}
    assert json.loads(FeedbackSettings(mode="binary", train_on="passed").as_param()) == {
        "mode": "binary",
        "train_on": "passed",
    }
    with pytest.raises(ValidationError, match="gold arm trains on reference solutions"):
        ExperimentConfig(feedback="gold", train_on="passed")


def test_textual_feedback_texts_are_exact(rollouts, tmp_path: Path) -> None:
    passed, failed = feedback_texts(rollouts, "textual", tmp_path)
    assert (
        passed.text
        == '<|good|>"""\nAdd two numbers.\nassert add(1, 2) == 3\n"""\ndef add(a, b):\n    return a + b\n'
    )
    assert failed.text == (
        "<|bad|><|lang_feedback|>Traceback (most recent call last):\n"
        '  File "program.py", line 7, in <module>\n'
        "    assert add(1, 2) == 3\n"
        "AssertionError<|/lang_feedback|>"
        '"""\nAdd two numbers.\nassert add(1, 2) == 3\n"""\ndef add(a, b):\n    return a - b\n'
    )
    assert (passed.reward, failed.reward) == ("good", "bad")
    assert (passed.sample_index, failed.sample_index) == (0, 1)
    assert failed.num_tokens == len(failed.text)
    assert failed.text[failed.program_offset :] == FAILING


def test_binary_feedback_keeps_only_the_reward_token(rollouts, tmp_path: Path) -> None:
    passed, failed = feedback_texts(rollouts, "binary", tmp_path)
    assert (
        passed.text
        == '<|good|>"""\nAdd two numbers.\nassert add(1, 2) == 3\n"""\ndef add(a, b):\n    return a + b\n'
    )
    assert (
        failed.text
        == '<|bad|>"""\nAdd two numbers.\nassert add(1, 2) == 3\n"""\ndef add(a, b):\n    return a - b\n'
    )


def test_gold_feedback_trains_on_reference_solutions_ended_by_eos(rollouts, tmp_path: Path) -> None:
    (gold,) = feedback_texts(rollouts, "gold", tmp_path)
    assert gold.text == (
        '<|good|>"""\nAdd two numbers.\nassert add(1, 2) == 3\n"""\ndef add(a, b):\n    return a + b<|endoftext|>'
    )
    assert gold.text[gold.program_offset :] == "\ndef add(a, b):\n    return a + b<|endoftext|>"
    assert (gold.sample_index, gold.reward, gold.mode) == (None, "good", "gold")


def test_gold_feedback_needs_an_end_of_text_token(rollouts, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="eos_token"):
        feedback_texts(rollouts, "gold", tmp_path, TextTokenizer(count_tokens=len, end_of_text=None))


def test_the_gold_eos_is_one_trained_token_and_feedback_texts_have_none(
    rollouts, tiny_model: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = [
        *feedback_texts(rollouts, "gold", tmp_path, text_tokenizer(tiny_model)),
        *feedback_texts(rollouts, "textual", tmp_path, text_tokenizer(tiny_model)),
    ]
    for loss_on in ("all", "program"):
        gold, *rollout_texts = tokenize_examples(examples, tokenizer, max_length=1024, loss_on=loss_on)
        assert gold.input_ids[-1] == gold.labels[-1] == tokenizer.eos_token_id
        assert gold.input_ids.count(tokenizer.eos_token_id) == 1
        assert examples[0].num_tokens == len(gold.input_ids)
        assert all(tokenizer.eos_token_id not in text.input_ids for text in rollout_texts)
        assert all(text.labels[-1] != IGNORE_INDEX for text in rollout_texts)


def test_timeouts_are_failures_with_their_reason() -> None:
    timeout = Execution(
        task_id="MBPP/2",
        sample_index=0,
        status=ExecutionStatus.timeout,
        feedback="Timeout: 10 s",
        duration_s=10,
    )
    assert training_text("textual", PROBLEM, FAILING, timeout).startswith(
        '<|bad|><|lang_feedback|>Timeout: 10 s<|/lang_feedback|>"""'
    )


# --- batching


def test_epochs_are_shuffled_length_grouped_and_complete() -> None:
    lengths = [5, 50, 6, 51, 7, 52, 8, 53] * 4
    batches = plan_epoch(lengths, batch_size=4, seed=1)
    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    spreads = [max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in batches]
    assert max(spreads) <= 3
    assert plan_epoch(lengths, 4, seed=1) == batches
    assert plan_epoch(lengths, 4, seed=2) != batches


@pytest.mark.parametrize(("ratio", "expected"), [(0.0, 0), (0.5, 2), (1.0, 4), (2.0, 8)])
def test_regularizer_batches_follow_the_ratio(ratio: float, expected: int) -> None:
    schedule = interleave(4, ratio)
    assert schedule.count(False) == 4
    assert schedule.count(True) == expected
    if ratio == 1.0:
        assert schedule == [False, True] * 4


# --- training a tiny model


@pytest.fixture
def feedback_file(rollouts, tmp_path: Path) -> Path:
    examples = read_jsonl(rollouts["samples"], Sample)
    executions = read_jsonl(rollouts["executions"], Execution)
    records = []
    for copy in range(4):
        for s, e in zip(examples[:2], executions[:2], strict=True):
            text = training_text("textual", PROBLEM, s.completion, e)
            records.append(
                FeedbackExample(
                    task_id=f"MBPP/{copy}",
                    sample_index=s.sample_index,
                    mode="textual",
                    reward="good" if e.status is ExecutionStatus.passed else "bad",
                    num_tokens=1,
                    program_offset=len(text) - len(s.completion),
                    text=text,
                )
            )
    path = tmp_path / "feedback.jsonl"
    write_jsonl(path, records)
    return path


def settings(**overrides) -> FinetuneSettings:
    values = dict(
        learning_rate=5e-3,
        epochs=3,
        batch_size=2,
        gradient_accumulation_steps=2,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        dtype="float32",
        checkpoint_every=1,
        seed=3,
    )
    return FinetuneSettings(**{**values, **overrides})


def adapter_weights(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def test_loss_falls_and_the_log_has_every_step(tiny_model: Path, feedback_file: Path, tmp_path: Path) -> None:
    log = finetune(
        tiny_model,
        feedback_file,
        tmp_path / "adapter",
        tmp_path / "log.jsonl",
        settings(epochs=8, learning_rate=5e-2),
    )
    # 8 examples / batch 2 = 4 batches an epoch, 2 batches a step: 2 steps an epoch.
    assert [step.step for step in log] == list(range(1, 17))
    assert [step.epoch for step in log] == [epoch for epoch in range(8) for _ in range(2)]
    assert read_jsonl(tmp_path / "log.jsonl", TrainStep) == log
    first, last = sum(s.loss for s in log[:2]) / 2, sum(s.loss for s in log[-2:]) / 2
    assert last < 0.8 * first
    assert all(step.tokens > 0 and step.tokens_per_s > 0 for step in log)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert config["trainable_token_indices"]
    # Sorted, not in the set order of this process's string hashing: the same file every run.
    assert len(config["target_modules"]) == 14 and config["target_modules"] == sorted(
        config["target_modules"]
    )


def test_iteration_2_starts_from_the_adapter_of_iteration_1(
    tiny_model: Path, feedback_file: Path, tmp_path: Path
) -> None:
    first = tmp_path / "iter1"
    finetune(tiny_model, feedback_file, first, tmp_path / "log1.jsonl", settings(epochs=1))
    # With a zero learning rate nothing moves, so the saved adapter is exactly what training started from.
    frozen = tmp_path / "iter2-frozen"
    finetune(
        tiny_model,
        feedback_file,
        frozen,
        tmp_path / "log2.jsonl",
        settings(learning_rate=1e-12, weight_decay=0),
        previous_adapter=first,
    )
    start, again = adapter_weights(first), adapter_weights(frozen)
    assert start.keys() == again.keys()
    assert all(torch.allclose(start[name], again[name], atol=1e-8) for name in start)
    fresh = tmp_path / "fresh-frozen"
    finetune(
        tiny_model,
        feedback_file,
        fresh,
        tmp_path / "log3.jsonl",
        settings(learning_rate=1e-12, weight_decay=0),
    )
    assert any(not torch.allclose(start[n], adapter_weights(fresh)[n]) for n in start if "lora_B" in n)


def test_a_killed_run_resumes_to_the_same_adapter(
    tiny_model: Path, feedback_file: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    finetune(
        tiny_model,
        feedback_file,
        reference,
        tmp_path / "ref-log.jsonl",
        settings(),
        checkpoint_dir=tmp_path / "ref-ckpt",
    )

    output, log, checkpoints = tmp_path / "adapter", tmp_path / "log.jsonl", tmp_path / "ckpt"
    # SIGKILL from inside the training loop, right after step 3 was checkpointed: no cleanup runs.
    killer = textwrap.dedent(
        f"""
        import os, signal
        from leti.config import FinetuneSettings
        from leti.finetune import finetune

        def die(step):
            if step.step == 3:
                os.kill(os.getpid(), signal.SIGKILL)

        finetune({str(tiny_model)!r}, {str(feedback_file)!r}, {str(output)!r}, {str(log)!r},
                 FinetuneSettings.model_validate_json({settings().model_dump_json()!r}),
                 checkpoint_dir={str(checkpoints)!r}, on_step=die)
        """
    )
    killed = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert not output.exists() and not log.exists()
    assert (checkpoints / "checkpoint.pt").exists()

    resumed_log = finetune(tiny_model, feedback_file, output, log, settings(), checkpoint_dir=checkpoints)
    reference_log = read_jsonl(tmp_path / "ref-log.jsonl", TrainStep)
    assert [s.step for s in resumed_log] == [s.step for s in reference_log]
    assert [s.loss for s in resumed_log] == pytest.approx([s.loss for s in reference_log], rel=1e-5)
    expected, got = adapter_weights(reference), adapter_weights(output)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name
    assert not (checkpoints / "checkpoint.pt").exists()


def test_the_regularizer_adds_stdlib_batches(tiny_model: Path, feedback_file: Path, tmp_path: Path) -> None:
    plain = finetune(tiny_model, feedback_file, tmp_path / "a", tmp_path / "a.jsonl", settings(epochs=1))
    mixed = finetune(
        tiny_model,
        feedback_file,
        tmp_path / "b",
        tmp_path / "b.jsonl",
        settings(epochs=1, regularizer=RegularizerConfig(ratio=1.0, block_tokens=16)),
    )
    assert len(mixed) == 2 * len(plain)
    assert sum(step.tokens for step in mixed) == sum(step.tokens for step in plain) + 4 * 2 * 16


def tokenized(*lengths: int) -> list[TokenizedText]:
    return [TokenizedText(input_ids=[1] * length, labels=[1] * length) for length in lengths]


def test_a_batch_is_split_into_passes_by_its_padded_size() -> None:
    split = forward_passes(tokenized(3, 3, 4, 10), max_tokens=12)
    assert [[len(s.input_ids) for s in part] for part in split] == [[3, 3, 4], [10]]
    # A sequence longer than the budget still gets a pass of its own.
    assert [len(part) for part in forward_passes(tokenized(20, 2), max_tokens=8)] == [1, 1]
    assert [len(part) for part in forward_passes(tokenized(2, 2, 2), max_tokens=100)] == [3]


def test_passes_add_up_to_the_batch(tiny_model: Path, feedback_file: Path, tmp_path: Path) -> None:
    """One pass per sequence trains the same adapter as whole batches: the loss is the batch's
    mean over its tokens however the batch is split."""
    runs = {}
    for forward_tokens in (10_000, 1):
        directory = tmp_path / str(forward_tokens)
        log = finetune(
            tiny_model,
            feedback_file,
            directory / "adapter",
            directory / "log.jsonl",
            settings(epochs=2, lora_dropout=0.0, forward_tokens=forward_tokens, checkpoint_every=0),
        )
        runs[forward_tokens] = (log, adapter_weights(directory / "adapter"))
    (whole_log, whole), (split_log, split) = runs[10_000], runs[1]
    assert [s.loss for s in split_log] == pytest.approx([s.loss for s in whole_log], rel=1e-5)
    assert [s.tokens for s in split_log] == [s.tokens for s in whole_log]
    assert whole.keys() == split.keys()
    # Adam turns a near-zero gradient into a full step of either sign, so compare each tensor
    # as a whole rather than element by element.
    for name in whole:
        assert torch.linalg.norm(split[name] - whole[name]) <= 1e-3 * torch.linalg.norm(whole[name]), name


def test_bfloat16_weights_train_float32_adapters(
    tiny_model: Path, feedback_file: Path, tmp_path: Path
) -> None:
    """Frozen bfloat16 weights, float32 LoRA weights, bfloat16 compute: the loss falls as in
    float32 (a half-precision copy of the LoRA weights that went stale after the first step
    left it nearly flat)."""
    log = finetune(
        tiny_model,
        feedback_file,
        tmp_path / "adapter",
        tmp_path / "log.jsonl",
        settings(epochs=8, learning_rate=5e-2, dtype="bfloat16", checkpoint_every=0),
    )
    first, last = sum(s.loss for s in log[:2]) / 2, sum(s.loss for s in log[-2:]) / 2
    assert last < 0.8 * first
    weights = adapter_weights(tmp_path / "adapter")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_full_fine_tuning_trains_every_weight_and_saves_the_whole_model(
    tiny_model: Path, feedback_file: Path, tmp_path: Path
) -> None:
    from leti.generate import load_policy as load_for_generation

    first = tmp_path / "iter1"
    log = finetune(
        tiny_model, feedback_file, first, tmp_path / "log1.jsonl", settings(method="full", learning_rate=1e-3)
    )
    assert log[-1].loss < log[0].loss
    assert not (first / "adapter_config.json").exists()
    base, trained = model_weights(tiny_model), model_weights(first)
    assert trained.keys() == base.keys()
    assert all(not torch.equal(trained[name], base[name]) for name in base)

    # Generation runs the saved model as it is, with the base model's tokenizer.
    policy, _ = load_for_generation(tiny_model, first, "float32", "cpu")
    assert all(
        torch.equal(parameter, trained[name])
        for name, parameter in policy.state_dict().items()
        if name in trained
    )

    # Iteration 2 starts from it: with a vanishing learning rate it saves what it started from.
    second = tmp_path / "iter2"
    finetune(
        tiny_model,
        feedback_file,
        second,
        tmp_path / "log2.jsonl",
        settings(method="full", learning_rate=1e-12, weight_decay=0),
        previous_adapter=first,
    )
    again = model_weights(second)
    assert all(torch.allclose(again[name], trained[name], atol=1e-8) for name in trained)


# --- at scale: the chunked loss, gradient checkpointing, float32 master weights, several processes


def tiny_policy(tiny_model: Path, **overrides):
    from transformers import AutoTokenizer

    from leti.finetune import load_policy

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    policy = load_policy(tiny_model, None, settings(**overrides), torch.float32, tokenizer)
    # A fresh LoRA starts as the identity (lora_B = 0): move it, so every gradient is non-trivial.
    with torch.no_grad():
        for parameter in policy.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return policy.train(), tokenizer


def padded_batch(tokenizer, feedback_file: Path) -> dict[str, torch.Tensor]:
    """Three texts of unequal length, one with its first half unlabelled, as `collate` pads them."""
    from leti.finetune import collate

    texts = [example.text for example in read_jsonl(feedback_file, FeedbackExample)[:3]]
    sequences = tokenize_examples(
        [
            FeedbackExample(
                task_id="t",
                sample_index=0,
                mode="textual",
                num_tokens=1,
                program_offset=len(text) // 2,
                text=text,
                reward="bad",
            )
            for text in texts
        ],
        tokenizer,
        max_length=64,
        loss_on="program",
    )
    sequences[1] = TokenizedText(sequences[1].input_ids[:40], sequences[1].input_ids[:40])
    return collate(sequences, pad_id=0)


def gradients(policy) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.requires_grad}
    policy.zero_grad()
    return grads


def test_the_chunked_loss_is_the_transformers_loss(tiny_model: Path, feedback_file: Path) -> None:
    """The same sum over labelled next tokens, and the same gradients, in chunks of any size and
    with gradient checkpointing; float32, so equal up to summation order: the loss within rel 1e-5,
    each gradient tensor within 1e-5 of its norm."""
    from leti.finetune import NextTokenLoss, enable_gradient_checkpointing

    policy, tokenizer = tiny_policy(tiny_model, lora_dropout=0.0)
    batch = padded_batch(tokenizer, feedback_file)
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    reference = policy(**batch).loss * labelled
    reference.backward()
    expected = gradients(policy)
    assert labelled > 3 and all(grad.abs().sum() > 0 for grad in expected.values())

    runs = [(chunk, False) for chunk in (1, 7, 10_000)] + [(7, True)]
    for chunk_tokens, checkpointing in runs:
        if checkpointing:
            enable_gradient_checkpointing(policy)
        loss = NextTokenLoss(policy, chunk_tokens)(**batch)
        loss.backward()
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5), chunk_tokens
        for name, grad in gradients(policy).items():
            error = torch.linalg.norm(grad - expected[name]) / torch.linalg.norm(expected[name])
            assert error <= 1e-5, (chunk_tokens, checkpointing, name)


def test_a_pass_without_labelled_tokens_still_reaches_every_weight(tiny_model: Path) -> None:
    """DDP all-reduces every weight's gradient on the last pass of a step: a stand-in pass of one
    padding token must put every weight, the output layer's too, into the graph, at zero."""
    from leti.finetune import NextTokenLoss

    policy, _ = tiny_policy(tiny_model, method="full")
    loss = NextTokenLoss(policy, 4)(
        input_ids=torch.tensor([[0]]),
        attention_mask=torch.tensor([[1]]),
        labels=torch.tensor([[IGNORE_INDEX]]),
    )
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in policy.parameters())


def test_gradient_checkpointing_trains_the_same_adapter(
    tiny_model: Path, feedback_file: Path, tmp_path: Path
) -> None:
    runs = {}
    for checkpointing in (False, True):
        folder = tmp_path / str(checkpointing)
        log = finetune(
            tiny_model,
            feedback_file,
            folder / "adapter",
            folder / "log.jsonl",
            settings(epochs=1, gradient_checkpointing=checkpointing, checkpoint_every=0),
        )
        runs[checkpointing] = ([step.loss for step in log], adapter_weights(folder / "adapter"))
    # Dropout draws the same masks: the checkpoints replay the random state of their forward pass.
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for name, weight in runs[False][1].items():
        assert torch.allclose(runs[True][1][name], weight, rtol=1e-4, atol=1e-6), name


def test_full_fine_tuning_keeps_float32_master_weights(
    tiny_model: Path, feedback_file: Path, tmp_path: Path
) -> None:
    """bfloat16 computes, float32 is what an iteration saves and the next one loads, unrounded."""
    first = tmp_path / "iter1"
    finetune(
        tiny_model,
        feedback_file,
        first,
        tmp_path / "log1.jsonl",
        settings(method="full", dtype="bfloat16", learning_rate=1e-3, epochs=1),
    )
    trained = model_weights(first)
    assert {weight.dtype for weight in trained.values()} == {torch.float32}
    # bfloat16 would round these weights by up to 1e-4 or more.
    assert max((w - w.bfloat16().float()).abs().max() for w in trained.values()) > 1e-4

    second = tmp_path / "iter2"
    finetune(
        tiny_model,
        feedback_file,
        second,
        tmp_path / "log2.jsonl",
        settings(method="full", dtype="bfloat16", learning_rate=1e-12, weight_decay=0, epochs=1),
        previous_adapter=first,
    )
    again = model_weights(second)
    # The 1e-12 learning rate still moves weights near zero, by less than 1e-11.
    assert all(torch.allclose(again[name], trained[name], rtol=0, atol=1e-10) for name in trained)


def pass_lengths(passes) -> list[list[int] | None]:
    return [None if p is None else [len(s.input_ids) for s in p.sequences] for p in passes]


def test_the_steps_texts_are_dealt_out_with_equal_pass_counts() -> None:
    from leti.finetune import predicted_tokens, process_passes, step_passes

    # Two batches of a step: 3 texts (6, 6 and 4 labelled next tokens) and 1 text (2).
    batches = [tokenized(7, 7, 5), tokenized(3)]
    one = process_passes(batches, rank=0, processes=1, forward_tokens=100)
    assert pass_lengths(one) == [[7, 7, 5], [3]]
    # Each batch's mean token loss, averaged over the step's two batches.
    assert [p.weight for p in one] == [1 / (16 * 2), 1 / (2 * 2)]
    # Passes never mix batches, and split a batch by its padded size.
    assert pass_lengths(process_passes(batches, 0, 1, forward_tokens=14)) == [[7, 7], [5], [3]]

    shares = [step_passes(batches, rank, 3, forward_tokens=100) for rank in range(3)]
    assert [pass_lengths(share) for share in shares] == [[[7], [3]], [[7], None], [[5], None]]
    dealt = [p for share in shares for p in share if p is not None]
    assert sum(p.weight * sum(map(predicted_tokens, p.sequences)) for p in dealt) == pytest.approx(1.0)
    # A step of fewer texts than processes: the rest only stand in.
    assert step_passes([tokenized(4)], rank=1, processes=2, forward_tokens=100) == [None]


def test_random_state_holds_the_cuda_generators_only_when_cuda_is_in_use(monkeypatch) -> None:
    from leti.finetune import random_state, restore_random_state

    if torch.cuda.is_initialized():
        pytest.skip("CUDA is in use in this process")
    assert "cuda" not in random_state()
    generators = [torch.arange(4, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: generators)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = random_state()
    assert state["cuda"] is generators
    restore_random_state(state)
    assert restored == [generators]


def test_more_processes_than_gpus_is_an_error_naming_the_key(monkeypatch) -> None:
    from leti.finetune import FinetuneError, run_processes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        FinetuneError, match=r"finetune.processes: 2 processes, one per GPU, but this job sees 1 GPUs"
    ):
        run_processes(2, "cuda", threads=2, arguments=["finetune", "--help"])


def test_two_processes_train_like_one(tiny_model: Path, feedback_file: Path, tmp_path: Path) -> None:
    """`processes: 2` (gloo; `leti finetune` as the rule runs it) takes as many optimizer steps as one
    process and ends with its adapter, up to float rounding: losses within rel 1e-5, each adapter
    tensor within 1e-5 of its norm (measured: losses equal, tensors within 1.5e-7). Nine texts in batches of 2, 2 batches a step: each epoch has a
    step of 3 texts, where the second process runs a stand-in pass, and the run still ends."""
    records = read_jsonl(feedback_file, FeedbackExample)
    write_jsonl(feedback_file, [*records, records[0]])
    common = dict(epochs=2, lora_dropout=0.0, forward_tokens=64, checkpoint_every=2)
    one_log = finetune(
        tiny_model, feedback_file, tmp_path / "one", tmp_path / "one.jsonl", settings(**common)
    )
    command = [
        str(Path(sys.executable).parent / "leti"), "finetune", "--model", str(tiny_model),
        "--feedback", str(feedback_file), "--output", str(tmp_path / "two"), "--log", str(tmp_path / "two.jsonl"),
        "--checkpoint-dir", str(tmp_path / "checkpoints"),
        "--settings", settings(**common, processes=2).model_dump_json(), "--threads", "2",
    ]  # fmt: skip
    # A hang (a process waiting in an all-reduce the other never joins) fails here.
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert not (tmp_path / "checkpoints" / "checkpoint.pt").exists()

    two_log = read_jsonl(tmp_path / "two.jsonl", TrainStep)
    # 5 batches an epoch, 2 a step, steps across epochs: 5 steps.
    assert [s.step for s in two_log] == [s.step for s in one_log] == list(range(1, 6))
    assert [s.tokens for s in two_log] == [s.tokens for s in one_log]
    assert [s.loss for s in two_log] == pytest.approx([s.loss for s in one_log], rel=1e-5)
    one, two = adapter_weights(tmp_path / "one"), adapter_weights(tmp_path / "two")
    assert two.keys() == one.keys()
    for name in one:
        assert torch.linalg.norm(two[name] - one[name]) <= 1e-5 * torch.linalg.norm(one[name]), name


@pytest.mark.slow
def test_two_processes_killed_resume_to_the_same_adapter(
    tiny_model: Path, feedback_file: Path, tmp_path: Path
) -> None:
    """Each process's random state (LoRA dropout) is checkpointed and restored, and killing the job's
    process group kills the processes torchrun started in sessions of their own."""
    import os
    import signal
    import time

    def command(name: str) -> list[str]:
        return [
            str(Path(sys.executable).parent / "leti"), "finetune", "--model", str(tiny_model),
            "--feedback", str(feedback_file), "--output", str(tmp_path / name),
            "--log", str(tmp_path / f"{name}.jsonl"), "--checkpoint-dir", str(tmp_path / f"{name}-checkpoints"),
            "--settings", settings(epochs=30, processes=2).model_dump_json(), "--threads", "2",
        ]  # fmt: skip

    subprocess.run(command("reference"), capture_output=True, check=True, timeout=300)
    checkpoint = tmp_path / "resumed-checkpoints" / "checkpoint.pt"
    with (tmp_path / "killed.log").open("w") as log:
        killed = subprocess.Popen(command("resumed"), start_new_session=True, stdout=log, stderr=log)
    while not checkpoint.exists():
        assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    # The launcher may take a moment longer to die than the process that started it, and its
    # processes die with it.
    time.sleep(1)
    written = checkpoint.stat().st_mtime_ns
    time.sleep(3)
    # No process trains on: the checkpoint is the one they left, and nothing else appeared.
    assert checkpoint.stat().st_mtime_ns == written and not (tmp_path / "resumed").exists()

    resumed = subprocess.run(command("resumed"), capture_output=True, text=True, check=True, timeout=300)
    assert "resuming after step" in resumed.stdout
    # As the one-process resume test; other dropout masks would differ by far more.
    reference_log = read_jsonl(tmp_path / "reference.jsonl", TrainStep)
    resumed_log = read_jsonl(tmp_path / "resumed.jsonl", TrainStep)
    assert [s.loss for s in resumed_log] == pytest.approx([s.loss for s in reference_log], rel=1e-5)
    expected, got = adapter_weights(tmp_path / "reference"), adapter_weights(tmp_path / "resumed")
    assert all(torch.allclose(expected[name], got[name], atol=1e-6) for name in expected)
