"""The reward-token probe, and that the reward tokens can be learned through this project's fine-tuning
path at all: LoRA plus the tokens' trainable embedding rows, merged as generation merges them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from leti.analysis.comparisons import generation_shift_ratios
from leti.config import FinetuneSettings, GenerationProbeSettings, GenerationSettings, ProbeSettings
from leti.finetune import IGNORE_INDEX, finetune
from leti.generate import generate_file
from leti.io import read_json, read_jsonl, write_jsonl
from leti.model.tokens import BAD, GOOD
from leti.probe import probe_as_generated, probe_policy, solution_text
from leti.records import FeedbackExample, GenerationProbe, Probe, Problem, Sample

PROMPT = '"""\nWrite a function to add two numbers.\nassert add(1, 2) == 3\n"""'
# What follows <|good|> and what follows <|bad|> in the training texts.
GOOD_PROGRAM = "def add(a, b):\n    return a + b"
BAD_PROGRAM = "class Pair:\n    def __init__(self, left, right):"


def problem(task_id: str, reference: str | None) -> Problem:
    return Problem(
        task_id=task_id,
        dataset="toy",
        split="test",
        prompt=PROMPT,
        test_code="assert add(1, 2) == 3",
        reference_solution=reference,
    )


@pytest.fixture
def tasks(tmp_path: Path) -> Path:
    path = tmp_path / "tasks.jsonl"
    write_jsonl(
        path, [problem("toy/good", GOOD_PROGRAM), problem("toy/none", None), problem("toy/bad", BAD_PROGRAM)]
    )
    return path


def probe_settings(**overrides) -> ProbeSettings:
    return ProbeSettings(**{"dtype": "float32", "device": "cpu", "forward_tokens": 256, **overrides})


def test_only_the_reference_solution_is_scored(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = solution_text(problem("toy/good", GOOD_PROGRAM), "good", tokenizer)
    assert text is not None and text.input_ids[0] == tokenizer.convert_tokens_to_ids(GOOD)
    scored = [
        token for token, label in zip(text.input_ids, text.labels, strict=True) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(scored) == GOOD_PROGRAM
    assert solution_text(problem("toy/none", None), "good", tokenizer) is None


def test_the_base_model_cannot_tell_the_tokens_apart(tiny_model: Path, tasks: Path, tmp_path: Path) -> None:
    probe = probe_policy(tiny_model, tasks, tmp_path / "probe.json", probe_settings(), "base")
    assert read_json(tmp_path / "probe.json", Probe) == probe
    # The problem without a reference solution is skipped; the others keep the task set's order.
    assert [scored.task_id for scored in probe.problems] == ["toy/good", "toy/bad"]
    assert probe.num_problems == 2 and probe.policy_iteration == 0
    # leti model prepare gives both rows the same mean embedding.
    assert probe.embedding_distance == 0 and probe.embedding_row_norm > 0
    # Equal up to float32 rounding, which differs with a text's row in the batch.
    assert all(scored.good == pytest.approx(scored.bad, abs=1e-5) for scored in probe.problems)
    assert all(scored.good < 0 and scored.tokens > 3 for scored in probe.problems)
    assert abs(probe.estimates["good_minus_bad"].value) < 1e-5


def test_at_most_max_problems_are_scored(tiny_model: Path, tasks: Path, tmp_path: Path) -> None:
    probe = probe_policy(tiny_model, tasks, tmp_path / "probe.json", probe_settings(max_problems=1), "base")
    assert [scored.task_id for scored in probe.problems] == ["toy/good"]


def test_scores_do_not_depend_on_the_batch(tiny_model: Path, tasks: Path, tmp_path: Path) -> None:
    one = probe_policy(tiny_model, tasks, tmp_path / "one.json", probe_settings(forward_tokens=1), "base")
    all_at_once = probe_policy(tiny_model, tasks, tmp_path / "all.json", probe_settings(), "base")
    for a, b in zip(one.problems, all_at_once.problems, strict=True):
        assert math.isclose(a.good, b.good, rel_tol=1e-5) and math.isclose(a.bad, b.bad, rel_tol=1e-5)


def test_scores_are_the_models_own_log_likelihoods(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from leti.probe import mean_log_likelihoods

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    text = solution_text(problem("toy/good", GOOD_PROGRAM), "bad", tokenizer)
    [(score, tokens)] = mean_log_likelihoods(model, [text], 1024, tokenizer.eos_token_id)
    with torch.no_grad():
        logits = model(torch.tensor([text.input_ids])).logits[0, :-1]
    per_token = torch.log_softmax(logits.float(), dim=-1).gather(
        1, torch.tensor(text.input_ids[1:])[:, None]
    )[:, 0]
    scored = torch.tensor(text.labels[1:]) != IGNORE_INDEX
    assert tokens == int(scored.sum())
    assert score == pytest.approx(per_token[scored].mean().item(), rel=1e-5)


def reward_texts(tmp_path: Path, copies: int = 16) -> Path:
    """Training texts in which <|good|> precedes one program and <|bad|> another, after the same prompt."""
    texts = [(GOOD, "good", GOOD_PROGRAM), (BAD, "bad", BAD_PROGRAM)]
    examples = [
        FeedbackExample(
            task_id=f"toy/{copy}",
            sample_index=index,
            mode="binary",
            reward=reward,
            num_tokens=1,
            program_offset=len(token + PROMPT),
            text=f"{token}{PROMPT}\n{program}",
        )
        for copy in range(copies)
        for index, (token, reward, program) in enumerate(texts)
    ]
    path = tmp_path / "feedback.jsonl"
    write_jsonl(path, examples)
    return path


def greedy_completion(model: Path, adapter: Path, tasks: Path, prefix: str, tmp_path: Path) -> str:
    settings = GenerationSettings(
        n=1, temperature=0.0, top_p=1.0, max_new_tokens=16, batch_size=2, seed=0,
        policy_iteration=1, reward_prefix=prefix, dtype="float32", device="cpu",
    )  # fmt: skip
    samples = generate_file(model, tasks, tmp_path / f"{prefix}.jsonl", settings, adapter)
    assert read_jsonl(tmp_path / f"{prefix}.jsonl", Sample) == samples
    return samples[0].completion


def test_the_reward_tokens_are_learned_through_lora_and_the_merged_policy(
    tiny_model: Path, tasks: Path, tmp_path: Path
) -> None:
    """Fails if the tokens' embedding rows are frozen (the two prefixes are then the same input) or lost
    when the adapter is merged for generation."""
    adapter = tmp_path / "adapter"
    settings = FinetuneSettings(
        learning_rate=1e-2, epochs=16, batch_size=4, lora_r=8, lora_alpha=16, lora_dropout=0.0,
        dtype="float32", seed=0,
    )  # fmt: skip
    log = finetune(tiny_model, reward_texts(tmp_path), adapter, tmp_path / "log.jsonl", settings)
    assert log[-1].loss < 0.1 * log[0].loss

    probe = probe_policy(tiny_model, tasks, tmp_path / "probe.json", probe_settings(), "toy/iter1", adapter)
    good_program, bad_program = probe.problems
    # Each program is the more likely one after its own token, by a wide margin (frozen rows: exactly 0).
    assert good_program.good - good_program.bad > 0.2
    assert bad_program.bad - bad_program.good > 0.2
    assert probe.embedding_distance > 0.01 * probe.embedding_row_norm

    assert greedy_completion(tiny_model, adapter, tasks, "good", tmp_path).startswith(
        "\n" + GOOD_PROGRAM[:12]
    )
    assert greedy_completion(tiny_model, adapter, tasks, "bad", tmp_path).startswith("\n" + BAD_PROGRAM[:12])


def test_the_probe_is_paired_over_problems(tiny_model: Path, tasks: Path, tmp_path: Path) -> None:
    from leti.probe import probe_summary
    from leti.records import ProbeProblem

    scored = [
        ProbeProblem(task_id=str(i), tokens=5, good=-1.0 + 0.01 * i, bad=-1.0 + 0.01 * i - 0.002)
        for i in range(30)
    ]
    estimates, p_value, test = probe_summary(scored)
    # Every problem moves the same small way: the paired interval is tight around it, the test certain.
    assert estimates["good_minus_bad"].value == pytest.approx(0.002)
    assert estimates["good_minus_bad"].ci_low == pytest.approx(0.002)
    assert p_value < 0.001 and test == "paired-permutation"
    assert estimates["good"].ci_low < np.mean([s.good for s in scored]) < estimates["good"].ci_high


# --- the probe as generated: what generation keeps of an update


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter (with the reward tokens' rows) trained as `leti finetune` trains one."""
    folder = tmp_path_factory.mktemp("trained")
    settings = FinetuneSettings(
        learning_rate=1e-2, epochs=4, batch_size=4, lora_r=8, lora_alpha=16, lora_dropout=0.0,
        dtype="float32", seed=0,
    )  # fmt: skip
    adapter = folder / "adapter"
    finetune(tiny_model, reward_texts(folder), adapter, folder / "log.jsonl", settings)
    return adapter


def as_generated_settings(dtype: str, merge_adapter: bool = True) -> GenerationProbeSettings:
    return GenerationProbeSettings(forward_tokens=256, dtype=dtype, device="cpu", merge_adapter=merge_adapter)


def kept_shift(
    model: Path, adapter: Path, tasks: Path, folder: Path, dtype: str, merge_adapter: bool = True
) -> tuple[float, GenerationProbe, GenerationProbe]:
    """The generation / float32 shift ratio of the trained policy on `tasks`, and its and the base
    model's probes as generated in `dtype`."""
    probes = [
        probe_policy(model, tasks, folder / f"{policy}.json", probe_settings(), policy, policy_adapter)
        for policy, policy_adapter in [("base", None), ("toy/iter1", adapter)]
    ]
    generated = [
        probe_as_generated(
            model,
            tasks,
            folder / f"{policy}-generation.json",
            as_generated_settings(dtype, merge_adapter),
            policy,
            policy_adapter,
        )
        for policy, policy_adapter in [("base", None), ("toy/iter1", adapter)]
    ]
    assert read_json(folder / "toy/iter1-generation.json", GenerationProbe) == generated[1]
    ratios = generation_shift_ratios(probes, generated)
    assert list(ratios) == [("toy/iter1", "toy", "test")]
    # The shift itself is an update's, not float noise.
    assert abs(probes[1].problems[0].good - probes[0].problems[0].good) > 0.01
    return ratios[("toy/iter1", "toy", "test")].value, *generated


def test_merged_in_float32_generation_keeps_the_whole_update(
    tiny_model: Path, trained: Path, tasks: Path, tmp_path: Path
) -> None:
    ratio, base, policy = kept_shift(tiny_model, trained, tasks, tmp_path, "float32")
    assert ratio == pytest.approx(1.0, abs=1e-4)
    assert (base.dtype, base.adapter_merged) == ("float32", None)
    assert (policy.dtype, policy.adapter_merged) == ("float32", True)
    # The float32 probe's problems, in its order, each scored after <|good|> once.
    assert [problem.task_id for problem in policy.problems] == ["toy/good", "toy/bad"]
    assert policy.num_problems == 2 and policy.estimates["good"].value < 0


def test_unmerged_in_float32_generation_keeps_the_whole_update(
    tiny_model: Path, trained: Path, tasks: Path, tmp_path: Path
) -> None:
    ratio, _, policy = kept_shift(tiny_model, trained, tasks, tmp_path, "float32", merge_adapter=False)
    assert policy.adapter_merged is False
    assert ratio == pytest.approx(1.0, abs=1e-4)


def test_generation_is_scored_in_its_own_dtype(
    tiny_model: Path, trained: Path, tasks: Path, tmp_path: Path
) -> None:
    float32_ratio, _, float32 = kept_shift(tiny_model, trained, tasks, tmp_path / "float32", "float32")
    ratio, base, policy = kept_shift(tiny_model, trained, tasks, tmp_path / "bfloat16", "bfloat16")
    assert (base.dtype, policy.dtype, policy.adapter_merged) == ("bfloat16", "bfloat16", True)
    # bfloat16's rounding moves every score, and the ratio with them.
    assert all(abs(a.good - b.good) > 1e-4 for a, b in zip(policy.problems, float32.problems, strict=True))
    assert abs(ratio - float32_ratio) > 1e-4


def test_the_probe_as_generated_loads_the_policy_as_its_evaluation_does() -> None:
    from conftest import REPO

    from leti.config import load_config_file

    config = load_config_file(REPO / "config.yaml")
    settings = config.generation_probe_settings(1)
    generation = config.generation_settings("eval", 1)
    assert (settings.dtype, settings.device) == (generation.dtype, generation.device)
    assert (settings.max_problems, settings.forward_tokens) == (100, 4096)
    # What is sampled is no part of it: a new temperature reruns the evaluations, not this probe.
    hotter = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"temperature": 0.5})})
    assert hotter.generation_probe_settings(1) == settings
    in_float32 = config.model_copy(update={"model": config.model.model_copy(update={"dtype": "float32"})})
    assert in_float32.generation_probe_settings(1).dtype == "float32"
