"""Generation on a tiny random model: exact prefixes and stops, batching, seeds and LoRA policies."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, write_tiny_qwen
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
)

from leti.config import GenerationSettings, load_config
from leti.generate import (
    Decoder,
    GenerationError,
    NonFiniteLogits,
    choose_tokens,
    generate_file,
    load_policy,
    policy_input,
    postprocess_samples,
    remove_prefix,
    sample_seed,
    stop_index,
)
from leti.io import read_jsonl, write_jsonl
from leti.model.sources import prepare_model
from leti.model.tokens import GOOD
from leti.records import Problem, Sample

CORPUS = '''"""
Write a function to add two numbers.
assert add(1, 2) == 3
"""
def add(a, b):
    return a + b

class Pair:
    def __init__(self, left, right):
        self.left = left
        self.right = right
print("<html>", "|", "good", "done")
'''

# Prompts that `str.lstrip("<|good|>")` would eat into: they start with d, <, g and |.
PROMPTS = ['def double(x):\n    """Double x."""', "<html> to text", "good = 1\n", "|pipe| table"]


def settings(**changes: object) -> GenerationSettings:
    base = dict(
        n=3,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=12,
        batch_size=4,
        seed=7,
        policy_iteration=0,
        reward_prefix="good",
        dtype="float32",
    )
    return GenerationSettings.model_validate({**base, **changes})


def problem(index: int, prompt: str, stops: list[str] | None = None) -> Problem:
    return Problem(
        task_id=f"T/{index}",
        dataset="t",
        split="test",
        prompt=prompt,
        test_code="pass",
        stop_sequences=stops or [],
    )


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Qwen2 with a byte-level BPE tokenizer, prepared by `leti model prepare`'s code."""
    root = tmp_path_factory.mktemp("tiny")
    # Untied, and sharp logits: greedy choices are far from ties, and an end token is a real possibility.
    write_tiny_qwen(root / "raw", CORPUS, tied=False)
    prepare_model(str(root / "raw"), root / "base")
    return root / "base"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tasks") / "tasks.jsonl"
    write_jsonl(path, [problem(i, prompt) for i, prompt in enumerate(PROMPTS)])
    return path


def run(
    base_model: Path, problems: list[Problem], adapter: Path | None = None, **changes: object
) -> list[Sample]:
    model, tokenizer = load_policy(base_model, adapter, "float32")
    decoder = Decoder(model, tokenizer, settings(**changes))
    return decoder.run(decoder.requests(problems))


# --- exact prefixes and stops


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize(("prefix", "token"), [("good", GOOD), ("bad", "<|bad|>"), ("none", "")])
def test_policy_input_prefixes_exactly(prompt: str, prefix: str, token: str) -> None:
    model_input = policy_input(problem(0, prompt), prefix)
    lead = "" if prompt.endswith("\n") else "\n"
    assert model_input.text == token + prompt + lead
    assert model_input.lead == lead
    assert remove_prefix(model_input.text, token) == prompt + lead


def test_remove_prefix_removes_the_prefix_not_its_characters() -> None:
    assert remove_prefix("<|good|>good|<d", GOOD) == "good|<d"
    assert remove_prefix("<|good|>", GOOD) == ""
    with pytest.raises(GenerationError):
        remove_prefix("good|<d", GOOD)


def test_stop_index_finds_the_earliest_stop() -> None:
    text = "\n    return x\nprint(f(1))\nassert f(1) == 1"
    assert stop_index(text, ["\nassert", "\nprint"]) == text.index("\nprint")
    assert stop_index(text, ["\nclass", ""]) is None
    assert stop_index('\n"""more', ['\n"""']) == 0


def test_choose_tokens_inverse_cdf() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]] * 3))
    uniforms = torch.tensor([0.05, 0.15, 0.95], dtype=torch.float64)
    assert choose_tokens(logits, uniforms, 1.0, 1.0).tolist() == [0, 1, 2]
    assert choose_tokens(logits, uniforms, 0.0, 1.0).tolist() == [2, 2, 2]
    # top_p 0.65 keeps only the most likely token; 0.75 keeps two, renormalised to 0.7 : 0.2.
    assert choose_tokens(logits, uniforms, 1.0, 0.65).tolist() == [2, 2, 2]
    assert choose_tokens(logits, torch.tensor([0.1, 0.77, 0.8], dtype=torch.float64), 1.0, 0.75).tolist() == [
        2,
        2,
        1,
    ]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("top_p", [1.0, 0.75])
def test_choose_tokens_refuses_non_finite_rows_and_allows_minus_infinity(
    temperature: float, top_p: float
) -> None:
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]] * 5))
    logits[0, 0] = float("-inf")  # a token that is never chosen
    logits[1, 1] = float("nan")
    logits[3, 2] = float("inf")
    logits[4] = float("-inf")
    uniforms = torch.full((5,), 0.5, dtype=torch.float64)
    with pytest.raises(NonFiniteLogits) as raised:
        choose_tokens(logits, uniforms, temperature, top_p)
    assert raised.value.rows == [1, 3, 4]
    assert choose_tokens(logits[[0, 2]], uniforms[:2], temperature, top_p).tolist() == [2, 2]


def test_sample_seeds_are_stable_and_distinct() -> None:
    seeds = {sample_seed(0, f"MBPP/{t}", i) for t in range(20) for i in range(8)}
    assert len(seeds) == 160
    assert sample_seed(0, "MBPP/1", 0) == sample_seed(0, "MBPP/1", 0) != sample_seed(1, "MBPP/1", 0)


def test_greedy_matches_plain_generate(base_model: Path) -> None:
    """Batched, left-padded, refilled decoding gives what HF `generate` gives one prompt at a time."""
    problems = [problem(i, prompt) for i, prompt in enumerate(PROMPTS)]
    samples = run(base_model, problems, temperature=0.0, n=1, batch_size=3, max_new_tokens=16)
    model, tokenizer = load_policy(base_model, None, "float32")
    end_ids = sorted(Decoder(model, tokenizer, settings()).end.end_ids)
    for item, sample in zip(problems, samples, strict=True):
        model_input = policy_input(item, "good")
        ids = tokenizer(model_input.text, return_tensors="pt")["input_ids"]
        config = GenerationConfig(
            do_sample=False, max_new_tokens=16, eos_token_id=end_ids, pad_token_id=end_ids[0]
        )
        new = model.generate(ids, generation_config=config)[0, ids.shape[1] :].tolist()
        if new[-1] in end_ids:
            new = new[:-1]
        text = tokenizer.decode(new, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert sample.completion == model_input.lead + text
        assert sample.prompt_tokens == ids.shape[1]
        assert item.program(sample.completion) == model_input.text.removeprefix(GOOD) + text + "\npass"


def test_stop_sequences_end_and_cut_exactly(base_model: Path) -> None:
    free = run(base_model, [problem(0, PROMPTS[0])], temperature=0.0, n=1, max_new_tokens=16)[0]
    assert free.finish_reason == "length"
    text = free.completion
    stop = text[5:8]
    cut = run(base_model, [problem(0, PROMPTS[0], [stop])], temperature=0.0, n=1, max_new_tokens=16)[0]
    assert cut.finish_reason == "stop"
    assert cut.completion == text[: text.index(stop)]
    assert cut.completion_tokens < free.completion_tokens
    # A stop right at the start, across the newline the input ends with, leaves nothing.
    at_once = run(base_model, [problem(0, PROMPTS[0], [text[:2]])], temperature=0.0, n=1)[0]
    assert (at_once.completion, at_once.finish_reason, at_once.completion_tokens) == ("", "stop", 1)


def test_a_problem_asking_for_it_has_its_own_tests_stripped_after_the_stop_cut(
    base_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = run(base_model, [problem(0, PROMPTS[0])], temperature=0.0, n=1, max_new_tokens=16)[0]
    seen: list[tuple[str, str]] = []

    def fake_strip(prompt: str, completion: str) -> str:
        seen.append((prompt, completion))
        return completion[:3]

    monkeypatch.setattr("leti.generate.strip_own_tests", fake_strip)
    stripping = problem(0, PROMPTS[0]).model_copy(update={"strip_own_tests": True})
    (stripped,) = run(base_model, [stripping], temperature=0.0, n=1, max_new_tokens=16)
    assert seen == [(PROMPTS[0], free.completion)]
    assert stripped.completion == free.completion[:3]
    assert stripped.model_copy(update={"completion": free.completion}) == free
    assert run(base_model, [problem(0, PROMPTS[0])], temperature=0.0, n=1, max_new_tokens=16)[0] == free
    assert len(seen) == 1


def test_postprocessing_stored_samples_gives_what_generating_with_it_gives(
    base_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (free,) = run(base_model, [problem(0, PROMPTS[0])], temperature=0.0, n=1, max_new_tokens=16)
    stopping = problem(0, PROMPTS[0], [free.completion[5:8]])
    (cut,) = run(base_model, [stopping], temperature=0.0, n=1, max_new_tokens=16)
    (processed,) = postprocess_samples([stopping], [free])
    assert (processed.completion, processed.finish_reason) == (cut.completion, "stop")
    assert processed.completion_tokens == free.completion_tokens
    assert postprocess_samples([problem(0, PROMPTS[0])], [free]) == [free]

    monkeypatch.setattr("leti.generate.strip_own_tests", lambda prompt, completion: completion[:2])
    stripping = stopping.model_copy(update={"strip_own_tests": True})
    assert postprocess_samples([stripping], [free])[0].completion == cut.completion[:2]
    with pytest.raises(GenerationError, match="'T/0', which is not in the task set"):
        postprocess_samples([problem(1, PROMPTS[1])], [free])


def test_an_end_token_ends_the_sample_and_is_not_text(base_model: Path) -> None:
    model, tokenizer = load_policy(base_model, None, "float32")
    decoder = Decoder(model, tokenizer, settings(temperature=0.0, n=1, max_new_tokens=16))
    requests = decoder.requests([problem(0, PROMPTS[0])])
    ids = torch.tensor([requests[0].prompt_ids])
    config = GenerationConfig(do_sample=False, max_new_tokens=4, eos_token_id=sorted(decoder.end.end_ids))
    tokens = model.generate(ids, generation_config=config)[0, ids.shape[1] :].tolist()
    decoder.end.end_ids.add(tokens[3])
    ended = decoder.run(requests)[0]
    assert ended.finish_reason == "eos"
    assert ended.completion == "\n" + tokenizer.decode(tokens[: tokens.index(tokens[3])])
    assert ended.completion_tokens == tokens.index(tokens[3]) + 1


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_non_finite_logits_stop_generation_naming_the_sample(base_model: Path, temperature: float) -> None:
    """float16 can overflow into NaN or inf logits; neither greedy nor sampled decoding may turn
    them into a token."""
    model, tokenizer = load_policy(base_model, None, "float32")
    decoder = Decoder(model, tokenizer, settings(n=2, temperature=temperature))
    requests = decoder.requests([problem(i, prompt) for i, prompt in enumerate(PROMPTS[:2])])
    overflowing_prompt = list(requests[-1].prompt_ids)

    def overflowing(**inputs: torch.Tensor) -> object:
        """The model, with NaN logits for the prefill row of the second problem's prompt."""
        output = model(**inputs)
        for row, ids in enumerate(inputs["input_ids"].tolist()):
            if ids[-len(overflowing_prompt) :] == overflowing_prompt:
                output.logits[row] = float("nan")
        return output

    decoder.forward.model = overflowing
    with pytest.raises(GenerationError, match=r"task 'T/1', sample 0, .*model\.dtype to float32"):
        decoder.run(requests)


def test_the_cache_goes_under_the_name_the_installed_transformers_expects(base_model: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(base_model, [problem(0, PROMPTS[0])], n=2, max_new_tokens=4)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


# --- determinism and batching


def test_same_seed_same_file_byte_for_byte(base_model: Path, tasks: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    generate_file(base_model, tasks, first, settings())
    generate_file(base_model, tasks, second, settings())
    assert first.read_bytes() == second.read_bytes()
    other = tmp_path / "other.jsonl"
    generate_file(base_model, tasks, other, settings(seed=8))
    assert other.read_bytes() != first.read_bytes()


def test_samples_do_not_depend_on_the_batch(base_model: Path) -> None:
    problems = [problem(i, prompt) for i, prompt in enumerate(PROMPTS)]
    alone = run(base_model, problems, batch_size=1)
    together = run(base_model, problems, batch_size=5)
    assert [s.completion for s in alone] == [s.completion for s in together]


def test_samples_file_fields(base_model: Path, tasks: Path, tmp_path: Path) -> None:
    output = tmp_path / "samples.jsonl"
    generate_file(base_model, tasks, output, settings(policy_iteration=2, max_new_tokens=6))
    samples = read_jsonl(output, Sample)
    assert [(s.task_id, s.sample_index) for s in samples] == [
        (f"T/{t}", i) for t in range(4) for i in range(3)
    ]
    for sample in samples:
        assert sample.policy_iteration == 2
        assert sample.seed == sample_seed(7, sample.task_id, sample.sample_index)
        assert 1 <= sample.completion_tokens <= 6
        assert sample.completion_tokens < 6 or sample.finish_reason == "length"
        prompt = PROMPTS[int(sample.task_id.removeprefix("T/"))]
        assert sample.completion.startswith("" if prompt.endswith("\n") else "\n")
    first = json.loads(output.read_text().splitlines()[0])
    assert {"task_id", "completion"} <= set(first)


# --- LoRA policies


def lora_adapter(base_model: Path, folder: Path, train_steps: int, token_rows: bool = False) -> Path:
    """A LoRA adapter trained for a few steps; `token_rows` also trains the <|good|> embedding row,
    as `leti finetune` trains the LETI tokens' rows."""
    model = AutoModelForCausalLM.from_pretrained(base_model, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(base_model, local_files_only=True)
    rows = {"trainable_token_indices": tokenizer.convert_tokens_to_ids([GOOD])} if token_rows else {}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **rows))
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=1e-2)
    text = tokenizer(GOOD + CORPUS, return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    for _ in range(train_steps):
        loss = peft_model(input_ids=text, labels=text).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(folder)
    return folder


def test_zero_lora_is_the_base_model_and_a_trained_one_is_not(
    base_model: Path, tasks: Path, tmp_path: Path
) -> None:
    base, zero, trained = (tmp_path / f"{name}.jsonl" for name in ("base", "zero", "trained"))
    generate_file(base_model, tasks, base, settings())
    generate_file(
        base_model, tasks, zero, settings(), adapter_dir=lora_adapter(base_model, tmp_path / "z", 0)
    )
    assert zero.read_bytes() == base.read_bytes()
    generate_file(
        base_model, tasks, trained, settings(), adapter_dir=lora_adapter(base_model, tmp_path / "t", 5)
    )
    changed = [
        a.completion != b.completion
        for a, b in zip(read_jsonl(base, Sample), read_jsonl(trained, Sample), strict=True)
    ]
    assert sum(changed) >= len(changed) // 2


def test_an_unmerged_adapter_runs_beside_the_weights_and_generates_as_merged(
    base_model: Path, tasks: Path, tmp_path: Path
) -> None:
    adapter = lora_adapter(base_model, tmp_path / "adapter", 5)
    merged_model, _ = load_policy(base_model, adapter, "float32")
    unmerged_model, _ = load_policy(base_model, adapter, "float32", merge_adapter=False)
    assert not any(isinstance(module, LoraLayer) for module in merged_model.modules())
    assert any(isinstance(module, LoraLayer) for module in unmerged_model.modules())
    assert not any(parameter.requires_grad for parameter in unmerged_model.parameters())

    base, merged, unmerged = (tmp_path / f"{name}.jsonl" for name in ("base", "merged", "unmerged"))
    greedy = settings(temperature=0.0, n=1, max_new_tokens=16)
    generate_file(base_model, tasks, base, greedy)
    generate_file(base_model, tasks, merged, greedy, adapter_dir=adapter)
    generate_file(base_model, tasks, unmerged, greedy.model_copy(update={"merge_adapter": False}), adapter)
    assert unmerged.read_bytes() == merged.read_bytes() != base.read_bytes()


def test_unmerged_the_trained_token_rows_are_written_in_and_compute_as_peft_does(
    base_model: Path, tmp_path: Path
) -> None:
    """peft would rebuild the whole embedding at every forward pass to put the trained rows in."""
    adapter = lora_adapter(base_model, tmp_path / "adapter", 3, token_rows=True)
    ours, tokenizer = load_policy(base_model, adapter, "bfloat16", merge_adapter=False)
    token_layers = [module for module in ours.modules() if isinstance(module, TrainableTokensLayer)]
    assert token_layers and all(layer.merged for layer in token_layers)
    base = AutoModelForCausalLM.from_pretrained(base_model, local_files_only=True, dtype=torch.bfloat16)
    ids = tokenizer(GOOD + PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        before = base(input_ids=ids).logits
        peft_own = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits
        assert torch.equal(ours(input_ids=ids).logits, peft_own)
    assert not torch.equal(peft_own, before)


def test_merge_adapter_is_in_the_generate_parameters_only_when_off(mbpp_path: Path) -> None:
    """The generate rule's parameters are this dump: the default must leave it as it was before
    the key existed, or every finished run would generate again."""
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["data"]["mbpp_path"] = str(mbpp_path)
    default = load_config(raw).generation_settings("eval", 1)
    assert "merge_adapter" not in json.loads(default.model_dump_json())
    raw["model"]["merge_adapter"] = False
    unmerged = load_config(raw)
    dumped = unmerged.generation_settings("eval", 1).model_dump_json()
    assert json.loads(dumped)["merge_adapter"] is False
    assert GenerationSettings.model_validate_json(dumped).merge_adapter is False
    assert GenerationSettings.model_validate_json(default.model_dump_json()).merge_adapter is True
    # The base model has no adapter: its jobs stay as they are.
    assert unmerged.generation_settings("rollouts", 0) == load_config(
        {**raw, "model": {**raw["model"], "merge_adapter": True}}
    ).generation_settings("rollouts", 0)
    assert "merge_adapter" not in json.loads(unmerged.generation_settings("eval", 0).model_dump_json())


def test_cli_generate(base_model: Path, tasks: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from leti.cli import app

    output = tmp_path / "samples.jsonl"
    command = ["generate", "--model", str(base_model), "--tasks", str(tasks), "--output", str(output)]
    command += ["--settings", settings().model_dump_json(), "--threads", "1"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(output, Sample)) == 12


def test_cli_postprocess_cuts_stored_samples_at_new_stops(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from leti.cli import app

    sample = Sample(
        task_id="T/0", completion="\ndef f():\n    return 1\n```\nprose", policy_iteration=0,
        sample_index=0, seed=0, prompt_tokens=3, completion_tokens=9, finish_reason="eos",
    )  # fmt: skip
    write_jsonl(tmp_path / "samples.jsonl", [sample, sample.model_copy(update={"completion": "\npass"})])
    write_jsonl(tmp_path / "tasks.jsonl", [problem(0, "x", ["\n```"])])
    command = [
        "postprocess",
        "--tasks",
        str(tmp_path / "tasks.jsonl"),
        "--samples",
        str(tmp_path / "samples.jsonl"),
    ]
    result = CliRunner().invoke(app, [*command, "--output", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 0, result.output
    assert "1 of 2 completions changed" in result.output
    processed = read_jsonl(tmp_path / "out.jsonl", Sample)
    assert [s.completion for s in processed] == ["\ndef f():\n    return 1", "\npass"]
    assert [s.finish_reason for s in processed] == ["stop", "eos"]


def test_a_merged_policy_projects_the_last_position_without_broadcasting(
    base_model: Path, tmp_path: Path
) -> None:
    """A merged adapter leaves frozen weights, and torch.matmul then multiplies a strided
    [batch, 1, hidden] input by the output embedding broadcast over the batch (a bmm over
    batch copies of it: 8 GB for 32 prompts on Qwen). load_policy must avoid that path."""
    from torch.profiler import profile

    model, _ = load_policy(base_model, lora_adapter(base_model, tmp_path / "adapter", 1))
    assert not any(parameter.requires_grad for parameter in model.parameters())
    # What the model's head receives when prefill asks for the last position only.
    hidden = torch.randn(8, 5, model.config.hidden_size, dtype=model.dtype)[:, -1:, :]
    with torch.inference_mode(), profile() as run:
        logits = model.get_output_embeddings()(hidden)
    assert logits.shape == (8, 1, model.config.vocab_size)
    assert "aten::bmm" not in {event.name for event in run.events()}
