from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_snakemake

from leti.config import ConfigError, load_config, load_config_file


@pytest.fixture
def raw_config(mbpp_path: Path) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["data"]["mbpp_path"] = str(mbpp_path)
    return config


def config_error(raw: dict, *files: Path, overrides: dict | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(raw, files, overrides)
    return str(caught.value)


def test_the_default_config_is_valid(raw_config: dict) -> None:
    config = load_config(raw_config)
    assert config.iterations == 2
    assert set(config.experiments) == {"textual", "binary"}
    assert config.used_task_sets() == ["mbpp/train", "mbpp/test", "humaneval/test"]


def test_a_wrong_type_names_the_key_file_and_line(tmp_path: Path, mbpp_path: Path) -> None:
    text = (REPO / "config.yaml").read_text().replace("iterations: 2", 'iterations: "two"')
    text = text.replace("mbpp_path: null", f"mbpp_path: {mbpp_path}")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    line = text.splitlines().index('iterations: "two"') + 1
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    assert f"iterations: Input should be a valid integer (got 'two')  [{path}:{line}]" in str(caught.value)


def test_a_value_from_the_command_line_is_attributed_to_it(raw_config: dict) -> None:
    raw_config["iterations"] = "two"
    message = config_error(raw_config, REPO / "config.yaml", overrides={"iterations": "two"})
    assert "iterations: Input should be a valid integer (got 'two')  [--config]" in message


@pytest.mark.parametrize("value", [True, 2.5, -1])
def test_iterations_must_be_a_non_negative_integer(raw_config: dict, value: object) -> None:
    raw_config["iterations"] = value
    assert "iterations:" in config_error(raw_config)


def test_unknown_keys_are_named_at_every_depth(raw_config: dict) -> None:
    raw_config["bogus"] = 1
    raw_config["finetune"]["lr"] = 0.1
    raw_config["experiments"]["textual"]["mode"] = "x"
    message = config_error(raw_config)
    assert "bogus: unknown key" in message
    assert "finetune.lr: unknown key" in message
    assert "experiments.textual.mode: unknown key" in message


def test_nested_values_are_checked(raw_config: dict) -> None:
    raw_config["generate"]["top_p"] = 1.5
    raw_config["experiments"]["binary"]["feedback"] = "numeric"
    raw_config["execute"]["backend"] = "podman"
    message = config_error(raw_config)
    assert "generate.top_p: Input should be less than or equal to 1 (got 1.5)" in message
    assert "experiments.binary.feedback:" in message
    assert "execute.backend:" in message


def test_missing_files_are_named(raw_config: dict, tmp_path: Path) -> None:
    raw_config["data"]["mbpp_path"] = str(tmp_path / "nope.jsonl")
    raw_config["data"]["custom"] = {"mine": {"test": str(tmp_path / "mine.jsonl")}}
    raw_config["model"]["source"] = str(tmp_path / "model.gguf")
    message = config_error(raw_config)
    assert f"data.mbpp_path: no such file: {tmp_path / 'nope.jsonl'}" in message
    assert f"data.custom.mine.test: no such file: {tmp_path / 'mine.jsonl'}" in message
    assert f"model.source: no such file or folder: {tmp_path / 'model.gguf'}" in message


def test_the_mbpp_environment_variable_is_checked(
    raw_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw_config["data"]["mbpp_path"] = None
    monkeypatch.setenv("LETI_MBPP_PATH", str(tmp_path / "gone.jsonl"))
    assert "$LETI_MBPP_PATH: no such file" in config_error(raw_config)
    monkeypatch.delenv("LETI_MBPP_PATH")
    assert load_config(raw_config).mbpp_path() is None


def test_task_set_references_must_exist(raw_config: dict) -> None:
    raw_config["evaluate"]["tasks"] = ["mbpp/test", "mbpp/dev"]
    assert "evaluate.tasks: unknown task set 'mbpp/dev'" in config_error(raw_config)


def test_custom_datasets_become_task_sets(raw_config: dict, tmp_path: Path) -> None:
    (tmp_path / "mine.jsonl").write_text("")
    raw_config["data"]["custom"] = {"mine": {"test": str(tmp_path / "mine.jsonl")}}
    raw_config["evaluate"]["tasks"] = ["mine/test"]
    raw_config["data"]["limits"] = {"mine/test": 5}
    assert "mine/test" in load_config(raw_config).task_sets()
    raw_config["data"]["custom"] = {"mbpp": {"test": str(tmp_path / "mine.jsonl")}}
    assert "data.custom: mbpp is a built-in dataset name" in config_error(raw_config)


def test_generation_settings_follow_the_reward_prefix_rules(raw_config: dict) -> None:
    raw_config["evaluate"]["reward_prefix"] = "bad"
    config = load_config(raw_config)
    assert config.generation_settings("rollouts", 0).reward_prefix == "none"
    assert config.generation_settings("eval", 0).reward_prefix == "none"
    assert config.generation_settings("rollouts", 1).reward_prefix == "good"
    eval_settings = config.generation_settings("eval", 2)
    assert eval_settings.reward_prefix == "bad"
    assert (eval_settings.n, eval_settings.temperature) == (config.evaluate.n, config.evaluate.temperature)
    assert config.generation_settings("rollouts", 1).n == config.generate.n


# The same checks through Snakemake: a bad config stops the run before any job starts.


def assert_nothing_ran(workdir: Path) -> None:
    assert not any((workdir / name).exists() for name in ("resources", "results", "logs", "benchmarks"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("iterations=two", "iterations: Input should be a valid integer (got 'two')  [--config]"),
        ("bogus=1", "bogus: unknown key"),
        ("evaluate={'tasks': ['mbpp/dev']}", "evaluate.tasks: unknown task set 'mbpp/dev'"),
    ],
)
def test_snakemake_refuses_a_bad_config(workdir: Path, override: str, expected: str) -> None:
    result = run_snakemake(workdir, "--cores", "1", "--config", override)
    assert result.returncode != 0
    assert expected in result.stderr
    assert_nothing_ran(workdir)


def test_snakemake_names_a_missing_mbpp_file(workdir: Path, tmp_path: Path) -> None:
    config = (workdir / "config.yaml").read_text()
    config = "\n".join(
        "  mbpp_path: /nowhere/mbpp.jsonl" if line.startswith("  mbpp_path:") else line
        for line in config.splitlines()
    )
    (workdir / "config.yaml").write_text(config)
    result = run_snakemake(workdir, "--cores", "1")
    assert result.returncode != 0
    assert "data.mbpp_path: no such file: /nowhere/mbpp.jsonl" in result.stderr
    assert_nothing_ran(workdir)


# Event argument extraction: GENEVA and your own OneIE data.


def test_geneva_task_sets_and_the_eae_metric(raw_config: dict, geneva_dir: Path) -> None:
    raw_config["data"]["geneva_dir"] = str(geneva_dir)
    raw_config["evaluate"]["tasks"] = ["geneva/test", "mbpp/test"]
    config = load_config(raw_config)
    assert {"geneva/train", "geneva/validation", "geneva/test"} <= set(config.task_sets())
    assert config.geneva_dir() == geneva_dir
    assert config.task_metric("geneva") == "eae"
    assert config.task_metric("mbpp") is None
    assert config.task_metric("humaneval") is None
    assert config.data.eae_strict is False


def test_custom_eae_datasets_become_task_sets(raw_config: dict, tmp_path: Path) -> None:
    for name in ("ace.jsonl", "ontology.json"):
        (tmp_path / name).write_text("")
    raw_config["data"]["eae"] = {
        "ace": {"ontology": str(tmp_path / "ontology.json"), "splits": {"test": str(tmp_path / "ace.jsonl")}}
    }
    raw_config["data"]["eae_strict"] = True
    raw_config["evaluate"]["tasks"] = ["ace/test"]
    config = load_config(raw_config)
    assert "ace/test" in config.task_sets()
    assert config.task_metric("ace") == "eae"
    assert config.data.eae_strict is True


def test_eae_config_errors_name_their_key(
    raw_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw_config["data"]["eae"] = {
        "ace": {"ontology": str(tmp_path / "gone.json"), "splits": {"test": str(tmp_path / "gone.jsonl")}},
        "bad": {"ontology": str(tmp_path / "o.json"), "split": {}},
    }
    raw_config["data"]["geneva_dir"] = str(tmp_path / "no-geneva")
    message = config_error(raw_config)
    assert "data.eae.bad.split: unknown key" in message
    assert "data.eae.bad.splits: Field required" in message
    del raw_config["data"]["eae"]["bad"]
    message = config_error(raw_config)
    assert f"data.eae.ace.ontology: no such file: {tmp_path / 'gone.json'}" in message
    assert f"data.eae.ace.splits.test: no such file: {tmp_path / 'gone.jsonl'}" in message
    assert f"data.geneva_dir: no such folder: {tmp_path / 'no-geneva'}" in message
    raw_config["data"]["eae"] = {"geneva": raw_config["data"]["eae"]["ace"]}
    assert "data.eae: geneva is a built-in dataset name" in config_error(raw_config)
    del raw_config["data"]["eae"], raw_config["data"]["geneva_dir"]
    (tmp_path / "half").mkdir()
    monkeypatch.setenv("LETI_GENEVA_DIR", str(tmp_path / "half"))
    assert f"$LETI_GENEVA_DIR: no file data/test.json in {tmp_path / 'half'}" in config_error(raw_config)


def test_the_eae_config_is_valid(geneva_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETI_GENEVA_DIR", str(geneva_dir))
    config = load_config_file(REPO / "configs" / "eae.yaml")
    assert config.generate.tasks == "geneva/train"
    assert config.evaluate.tasks == ["geneva/test"]
    assert set(config.experiments) == {"textual", "binary"}
    assert config.iterations == 2


def test_reward_prefix_may_be_a_list_of_distinct_prefixes(raw_config: dict) -> None:
    raw_config["evaluate"]["reward_prefix"] = ["good", "bad"]
    config = load_config(raw_config)
    assert config.evaluation_prefixes(0) == ["none"]
    assert config.evaluation_prefixes(2) == ["good", "bad"]
    assert config.generation_settings("eval", 1, "bad").reward_prefix == "bad"
    assert config.generation_settings("eval", 1).reward_prefix == "good"
    with pytest.raises(ValueError, match="use the prefix 'none'"):
        config.generation_settings("eval", 0, "good")
    raw_config["evaluate"]["reward_prefix"] = ["good", "good"]
    with pytest.raises(ConfigError, match=r"evaluate.reward_prefix: .*each prefix once"):
        load_config(raw_config)


def test_prefix_limits_cap_only_evaluations_under_that_prefix(raw_config: dict) -> None:
    raw_config["evaluate"].update(reward_prefix=["good", "bad"], prefix_limits={"bad": 200})
    config = load_config(raw_config)
    assert config.generation_settings("eval", 1, "bad").max_problems == 200
    assert config.generation_settings("eval", 1, "good").max_problems is None
    assert config.generation_settings("rollouts", 1).max_problems is None
    assert config.problem_limit("eval", "bad") == 200


def test_an_arm_overrides_only_the_finetune_keys_it_names(raw_config: dict) -> None:
    raw_config["finetune"]["learning_rate"] = 3e-4
    raw_config["experiments"]["regularised"] = {
        "feedback": "textual",
        "finetune": {"regularizer": {"ratio": 1.0}, "epochs": 2},
    }
    config = load_config(raw_config)
    plain, regularised = config.finetune_settings("textual"), config.finetune_settings("regularised")
    assert (plain.regularizer.ratio, plain.epochs) == (0.0, 1)
    assert (regularised.regularizer.ratio, regularised.epochs) == (1.0, 2)
    assert regularised.regularizer.corpus == plain.regularizer.corpus == "stdlib"
    assert regularised.learning_rate == plain.learning_rate == 3e-4
    assert regularised.model_copy(update={"regularizer": plain.regularizer, "epochs": 1}) == plain


def test_an_arms_finetune_keys_are_checked_and_located(raw_config: dict, tmp_path: Path) -> None:
    raw_config["experiments"]["regularised"] = {
        "feedback": "textual",
        "finetune": {"regularizer": {"ratio": -1}, "seed": 3},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw_config, sort_keys=False))
    lines = path.read_text().splitlines()
    ratio_line = next(i for i, line in enumerate(lines) if "ratio: -1" in line) + 1
    message = config_error(raw_config, path)
    assert (
        "experiments.regularised.finetune.regularizer.ratio: Input should be greater than or equal to 0 "
        f"(got -1)  [{path}:{ratio_line}]"
    ) in message
    assert "experiments.regularised.finetune.seed: unknown key" in message


def test_prefix_tasks_restrict_a_prefix_to_some_evaluation_task_sets(raw_config: dict) -> None:
    raw_config["evaluate"].update(reward_prefix=["good", "bad"], prefix_tasks={"bad": ["mbpp/test"]})
    config = load_config(raw_config)
    assert config.evaluate.task_sets_under("bad") == ["mbpp/test"]
    assert config.evaluate.task_sets_under("good") == ["mbpp/test", "humaneval/test"]
    raw_config["evaluate"]["prefix_tasks"] = {"bad": ["mbpp/validation"]}
    assert "evaluate.prefix_tasks.bad: mbpp/validation is not one of evaluate.tasks" in config_error(
        raw_config
    )


def test_an_arm_set_to_null_is_left_out(raw_config: dict) -> None:
    raw_config["experiments"]["binary"] = None
    assert list(load_config(raw_config).experiments) == ["textual"]
    raw_config["experiments"]["textual"] = None
    assert "experiments: Dictionary should have at least 1 item" in config_error(raw_config)


@pytest.mark.parametrize("name", sorted(path.stem for path in (REPO / "configs").glob("*.yaml")))
def test_every_config_file_is_valid_merged_into_config_yaml(
    name: str, mbpp_path: Path, geneva_dir: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from conftest import write_heldout_tasks

    write_heldout_tasks(tmp_path, mbpp_path)
    env = {
        "PATH": str(Path(sys.executable).parent),
        "LETI_MBPP_PATH": str(mbpp_path),
        "LETI_GENEVA_DIR": str(geneva_dir),
    }
    leti = str(Path(sys.executable).parent / "leti")
    files = [str(REPO / "config.yaml"), str(REPO / "configs" / f"{name}.yaml")]
    checked = subprocess.run(
        [leti, "config", "check", *files], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert checked.returncode == 0, checked.stderr
    assert "valid" in checked.stderr


def test_merged_config_files_name_the_file_that_set_a_bad_key(tmp_path: Path, mbpp_path: Path) -> None:
    override = tmp_path / "override.yaml"
    override.write_text("data:\n  mbpp_path: " + str(mbpp_path) + "\nevaluate:\n  n: 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config_file(REPO / "config.yaml", override)
    assert f"evaluate.n: Input should be greater than 0 (got 0)  [{override}:4]" in str(caught.value)


def test_a_sweep_expands_into_one_named_arm_per_grid_point(raw_config: dict) -> None:
    raw_config["experiments"] = {
        "binary": {"feedback": "binary"},
        "textual": {
            "feedback": "textual",
            "finetune": {"epochs": 2},
            "sweep": [
                {"learning_rate": [2.0e-5, 2.0e-4], "gradient_accumulation_steps": [1, 4]},
                {"method": ["full"], "learning_rate": [1.0e-5]},
                {"regularizer.ratio": [0.5]},
            ],
        },
    }
    config = load_config(raw_config)
    assert list(config.experiments) == [
        "binary",
        "textual-lr2e-5-accum1",
        "textual-lr2e-5-accum4",
        "textual-lr2e-4-accum1",
        "textual-lr2e-4-accum4",
        "textual-full-lr1e-5",
        "textual-ratio0p5",
    ]
    full = config.finetune_settings("textual-full-lr1e-5")
    assert (full.method, full.learning_rate, full.epochs) == ("full", 1.0e-5, 2)
    accumulated = config.finetune_settings("textual-lr2e-4-accum4")
    assert (accumulated.method, accumulated.gradient_accumulation_steps, accumulated.epochs) == ("lora", 4, 2)
    assert config.finetune_settings("textual-ratio0p5").regularizer.ratio == 0.5
    assert all(
        arm.feedback == "textual" and not arm.sweep
        for name, arm in config.experiments.items()
        if name != "binary"
    )


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ([{"learning_rat": [1.0e-4]}], "'learning_rat' is not a key of the finetune section"),
        ([{"regularizer.ratioo": [1.0]}], "'regularizer.ratioo' is not a key of the finetune section"),
        ([{"learning_rate": []}], "List should have at least 1 item"),
        ([{}], "a grid names at least one finetune key"),
        (
            [{"learning_rate": [-1.0]}],
            "experiments.textual-lr-1p0.finetune.learning_rate: Input should be greater than 0",
        ),
        ([{"lora_target_modules": ["q_proj k_proj"]}], "cannot be part of an arm name"),
    ],
)
def test_a_bad_sweep_is_named(raw_config: dict, sweep: list, expected: str) -> None:
    raw_config["experiments"]["textual"]["sweep"] = sweep
    assert expected in config_error(raw_config)


def test_a_swept_arm_may_not_take_another_arms_name(raw_config: dict) -> None:
    raw_config["experiments"]["textual-lr1e-4"] = {"feedback": "binary"}
    raw_config["experiments"]["textual"]["sweep"] = [{"learning_rate": [1.0e-4]}]
    assert "its sweep makes an arm textual-lr1e-4, and that name is taken" in config_error(raw_config)


def test_the_probe_covers_the_evaluated_task_sets_unless_told(raw_config: dict) -> None:
    config = load_config(raw_config)
    assert config.probed_task_sets() == ["mbpp/test", "humaneval/test"]
    raw_config["probe"] = {"tasks": ["mbpp/validation"], "max_problems": 10}
    config = load_config(raw_config)
    assert config.probed_task_sets() == ["mbpp/validation"]
    assert "mbpp/validation" in config.used_task_sets()
    assert config.probe_settings().max_problems == 10
    raw_config["probe"] = {"tasks": ["mbpp/nope"]}
    assert "probe.tasks: unknown task set 'mbpp/nope'" in config_error(raw_config)
