"""Sharded generate and execute stages: the slices, the gather and its checks, and a sharded DAG
whose files are the unsharded run's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import planned_jobs, run_snakemake, tiny_pipeline_config

from leti.config import ConfigError, GenerationSettings, load_config, load_config_file
from leti.generate import generate_file
from leti.io import ArtifactError, read_jsonl, write_jsonl
from leti.records import Execution, Problem, Sample
from leti.shards import Shard, ShardError, gather_shards, request_keys


def sample(task_id: str, index: int) -> Sample:
    return Sample(
        task_id=task_id,
        completion=f"    return {index}\n",
        policy_iteration=0,
        sample_index=index,
        seed=index,
        prompt_tokens=3,
        completion_tokens=4,
        finish_reason="eos",
    )


def problems(count: int) -> list[Problem]:
    return [
        Problem(
            task_id=f"T/{number}", dataset="t", split="test", prompt=f"def f{number}():\n", test_code="pass"
        )
        for number in range(count)
    ]


# --- slices


@pytest.mark.parametrize("count", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("total", [0, 1, 7, 10, 16])
def test_the_shards_split_the_requests_into_contiguous_slices_in_order(total: int, count: int) -> None:
    items = list(range(total))
    slices = [Shard(index, count).of(items) for index in range(1, count + 1)]
    assert [item for part in slices for item in part] == items
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_shard_names_are_snakemake_scatter_items() -> None:
    assert Shard.parse("3-of-16") == Shard(3, 16)
    assert str(Shard(3, 16)) == "3-of-16"
    for name in ("0-of-3", "4-of-3", "1-of-0", "3of16", "3-of-", "a-of-b"):
        with pytest.raises(ShardError, match="shard"):
            Shard.parse(name)


def test_the_request_order_is_problem_then_sample() -> None:
    assert request_keys(problems(2), 3) == [
        ("T/0", 0),
        ("T/0", 1),
        ("T/0", 2),
        ("T/1", 0),
        ("T/1", 1),
        ("T/1", 2),
    ]


# --- gather


def write_shards(folder: Path, records: list[Sample], count: int) -> list[Path]:
    paths = [folder / f"{index}-of-{count}" / "samples.jsonl" for index in range(1, count + 1)]
    for index, path in enumerate(paths, start=1):
        write_jsonl(path, Shard(index, count).of(records))
    return paths


def test_the_gather_writes_what_one_job_would_have_written(tmp_path: Path) -> None:
    keys = request_keys(problems(5), 2)
    records = [sample(task_id, index) for task_id, index in keys]
    whole = tmp_path / "whole.jsonl"
    write_jsonl(whole, records)
    output = tmp_path / "gathered.jsonl"
    assert gather_shards(write_shards(tmp_path, records, 3), output, "samples", keys) == 10
    assert output.read_bytes() == whole.read_bytes()
    # More shards than requests: the empty ones add nothing.
    assert gather_shards(write_shards(tmp_path / "many", records, 12), output, "samples", keys) == 10
    assert output.read_bytes() == whole.read_bytes()


def test_shards_that_do_not_add_up_stop_the_gather_naming_the_file(tmp_path: Path) -> None:
    keys = request_keys(problems(5), 2)
    records = [sample(task_id, index) for task_id, index in keys]
    first, second, third = write_shards(tmp_path, records, 3)
    output = tmp_path / "gathered.jsonl"

    def refusal(shards: list[Path], requests: list[tuple[str, int]] = keys) -> str:
        with pytest.raises(ShardError) as error:
            gather_shards(shards, output, "samples", requests)
        assert not output.exists()
        return str(error.value)

    assert refusal([second, first, third]) == (
        f"{second}: 3 records, T/1 #1 to T/2 #1, but shard 1 of 3 of these 10 requests is "
        "3 records, T/0 #0 to T/1 #0 (a shard of another run or shard count?)"
    )
    assert refusal(write_shards(tmp_path / "four", records, 4)[:3]).startswith(
        f"{tmp_path / 'four' / '1-of-4' / 'samples.jsonl'}: 2 records"
    )
    assert refusal([first, second, third], request_keys(problems(5), 3)).startswith(f"{first}: ")
    write_jsonl(second, Shard(2, 3).of(records)[1:])
    assert refusal([first, second, third]).startswith(f"{second}: 2 records, T/2 #0 to T/2 #1, but shard 2")


def test_a_gathered_shard_that_is_not_a_record_file_names_its_line(tmp_path: Path) -> None:
    keys = request_keys(problems(2), 2)
    shards = write_shards(tmp_path, [sample(task_id, index) for task_id, index in keys], 2)
    shards[1].write_text('{"task_id": "T/1"}\n')
    with pytest.raises(ArtifactError, match=f"^{re.escape(str(shards[1]))}:1: not a valid Sample record"):
        gather_shards(shards, tmp_path / "gathered.jsonl", "samples", keys)


# --- generation in shards


def test_sharded_generation_writes_the_unsharded_samples_byte_for_byte(
    tiny_model: Path, tmp_path: Path
) -> None:
    tasks = tmp_path / "tasks.jsonl"
    write_jsonl(tasks, problems(5))
    settings = GenerationSettings(
        n=2, temperature=0.8, top_p=0.95, max_new_tokens=12, batch_size=4, seed=7,
        policy_iteration=0, reward_prefix="none", dtype="float32",
    )  # fmt: skip
    whole = tmp_path / "whole.jsonl"
    generate_file(tiny_model, tasks, whole, settings)
    shards = [tmp_path / f"{index}-of-3.jsonl" for index in (1, 2, 3)]
    for index, path in enumerate(shards, start=1):
        generate_file(tiny_model, tasks, path, settings, shard=Shard(index, 3))
    assert [len(read_jsonl(path, Sample)) for path in shards] == [3, 3, 4]
    gathered = tmp_path / "gathered.jsonl"
    gather_shards(shards, gathered, "samples", request_keys(problems(5), 2))
    assert gathered.read_bytes() == whole.read_bytes()
    # Not a vacuous comparison: the samples differ from one another.
    assert len({sample.completion for sample in read_jsonl(whole, Sample)}) > 5


def test_the_cli_refuses_a_bad_shard_name_and_a_gather_that_does_not_add_up(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    write_jsonl(tasks, problems(2))
    keys = request_keys(problems(2), 2)
    shards = write_shards(tmp_path, [sample(task_id, index) for task_id, index in keys], 2)
    settings = GenerationSettings(
        n=2, temperature=0.8, top_p=1.0, max_new_tokens=8, seed=0, policy_iteration=0, reward_prefix="none"
    ).model_dump_json()
    leti = [str(Path(sys.executable).parent / "leti")]
    gather = [*leti, "gather", "--records", "samples", "--tasks", str(tasks), "--settings", settings]
    output = tmp_path / "gathered.jsonl"
    done = subprocess.run(
        [*gather, *map(str, shards), "--output", str(output)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "4 samples from 2 shards" in done.stderr
    assert output.read_bytes() == b"".join(path.read_bytes() for path in shards)

    refused = subprocess.run([*gather, str(shards[1]), str(shards[0]), "--output", str(tmp_path / "x.jsonl")],
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 1
    assert f"error: {shards[1]}: 2 records" in " ".join(refused.stderr.split())

    model = tmp_path / "no-model"
    model.mkdir()
    generate = [*leti, "generate", "--model", str(model), "--tasks", str(tasks), "--output", str(output)]
    bad = subprocess.run(
        [*generate, "--settings", settings, "--shard", "3-of-2"], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "no shard 3 of 2" in bad.stderr


# --- the config keys


def test_shards_are_positive_whole_numbers_and_default_to_one() -> None:
    from conftest import REPO

    config = load_config_file(REPO / "config.yaml")
    assert (config.generate.shards, config.evaluate.shards) == (1, 1)
    paper = load_config_file(REPO / "config.yaml", REPO / "configs" / "paper.yaml")
    assert (paper.generate.shards, paper.evaluate.shards) == (16, 4)
    # Not a setting of the samples themselves: generation settings (and so the rules' params) lack it.
    assert "shards" not in paper.generation_settings("rollouts", 0).model_dump()
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    for value in (0, -1, True, 1.5):
        raw["generate"]["shards"] = value
        with pytest.raises(ConfigError, match=r"generate\.shards"):
            load_config(raw)


# --- through the Snakemake DAG


@pytest.mark.slow
def test_a_sharded_run_writes_the_unsharded_files_and_a_lost_shard_reruns_alone(
    tmp_path: Path, mbpp_path: Path, tiny_raw_model: Path
) -> None:
    config = tiny_pipeline_config(mbpp_path, tiny_raw_model)
    config["data"]["limits"]["mbpp/train"] = 5  # 10 rollouts (n = 2 at temperature 0.8): 3 shards of 3, 3, 4
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    rollouts, evaluation = "results/base/rollouts/mbpp/train", "results/base/eval-none/mbpp/test"
    targets = [f"{rollouts}/metrics.json", f"{evaluation}/metrics.json"]
    files = [
        f"{folder}/{name}"
        for folder in (rollouts, evaluation)
        for name in ("samples.jsonl", "executions.jsonl")
    ]
    unsharded = run_snakemake(tmp_path, "--cores", "2", *targets)
    assert unsharded.returncode == 0, unsharded.stderr[-3000:]
    before = {path: (tmp_path / path).read_bytes() for path in [*files, *targets]}

    config["generate"]["shards"] = 3
    config["evaluate"]["shards"] = 2
    config_path.write_text(yaml.safe_dump(config))
    plan = {(job.rule, job.outputs[0]) for job in planned_jobs(tmp_path, *targets)}
    shard_outputs = {
        (f"{stage}_shard", f"{folder}/shards/{index}-of-{count}/{name}")
        for folder, count in ((rollouts, 3), (evaluation, 2))
        for stage, name in (("generate", "samples.jsonl"), ("execute", "executions.jsonl"))
        for index in range(1, count + 1)
    }
    gathers = {
        (f"gather_{name}", f"{folder}/{name}.jsonl")
        for folder in (rollouts, evaluation)
        for name in ("samples", "executions")
    }
    assert plan == shard_outputs | gathers | {("evaluate", target) for target in targets}
    sharded = run_snakemake(tmp_path, "--cores", "2", *targets)
    assert sharded.returncode == 0, sharded.stderr[-3000:]

    for folder in (rollouts, evaluation):
        samples = f"{folder}/samples.jsonl"
        assert (tmp_path / samples).read_bytes() == before[samples]
        # An execution's duration_s is its measured wall time, different in any two runs.
        executions = read_jsonl(tmp_path / folder / "executions.jsonl", Execution)
        unsharded_executions = [
            Execution.model_validate_json(line) for line in before[f"{folder}/executions.jsonl"].splitlines()
        ]
        assert [e.model_dump(exclude={"duration_s"}) for e in executions] == [
            e.model_dump(exclude={"duration_s"}) for e in unsharded_executions
        ]
        shards = sorted((tmp_path / folder / "shards").iterdir())
        assert (tmp_path / folder / "executions.jsonl").read_bytes() == b"".join(
            (shard / "executions.jsonl").read_bytes() for shard in shards
        )
    assert [
        len(read_jsonl(shard / "samples.jsonl", Sample))
        for shard in sorted((tmp_path / rollouts / "shards").iterdir())
    ] == [3, 3, 4]
    # Evaluation never learns about shards: the same metrics.
    assert all((tmp_path / target).read_bytes() == before[target] for target in targets)

    again = run_snakemake(tmp_path, "--dry-run", "--cores", "2", *targets)
    assert "Nothing to be done" in again.stdout + again.stderr

    # What a run whose rollout shard 2 failed leaves: no files of that shard, no gathers, nothing
    # after them. The rerun redoes that shard alone, then what depends on it.
    for lost in (
        "shards/2-of-3/samples.jsonl",
        "shards/2-of-3/executions.jsonl",
        "samples.jsonl",
        "executions.jsonl",
        "metrics.json",
    ):
        (tmp_path / rollouts / lost).unlink()
    plan = {(job.rule, job.outputs[0]) for job in planned_jobs(tmp_path, *targets)}
    assert plan == {
        ("generate_shard", f"{rollouts}/shards/2-of-3/samples.jsonl"),
        ("execute_shard", f"{rollouts}/shards/2-of-3/executions.jsonl"),
        ("gather_samples", f"{rollouts}/samples.jsonl"),
        ("gather_executions", f"{rollouts}/executions.jsonl"),
        ("evaluate", f"{rollouts}/metrics.json"),
    }
