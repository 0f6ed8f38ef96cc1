"""The iteration DAG, read from Snakemake's own dry-run plan."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import Job, planned_jobs, run_snakemake


def producer(jobs: list[Job], path: str) -> Job:
    (job,) = (job for job in jobs if path in job.outputs)
    return job


def rollout_samples(policy: str) -> str:
    return f"results/{policy}/rollouts/mbpp/train/samples.jsonl"


@pytest.mark.parametrize("iterations", [2, 10])
def test_every_stage_runs_for_every_iteration(workdir: Path, iterations: int) -> None:
    jobs = planned_jobs(workdir, "--config", f"iterations={iterations}")
    counts = Counter(job.rule for job in jobs)
    arms, eval_sets, prefixes = 2, 2, 1
    assert counts["finetune"] == arms * iterations
    assert counts["build_feedback"] == arms * iterations
    # Rollouts: the base model's (shared by the arms) plus each arm's policies 1..N-1.
    rollouts = 1 + arms * (iterations - 1)
    # The base model once (no reward token), every trained policy once per reward prefix.
    evaluations = eval_sets * (1 + arms * iterations * prefixes)
    assert counts["generate"] == counts["execute"] == rollouts + evaluations
    # Every policy's evaluations, and the pass rate of every rollout set.
    assert counts["evaluate"] == evaluations + rollouts
    assert counts["prepare_model"] == counts["build_sandbox"] == 1
    for arm in ("textual", "binary"):
        for iteration in range(1, iterations + 1):
            assert f"results/{arm}/iter{iteration}/adapter" in {o for job in jobs for o in job.outputs}
            for eval_set in ("mbpp/test", "humaneval/test"):
                metrics = f"results/{arm}/iter{iteration}/eval-good/{eval_set}/metrics.json"
                assert producer(jobs, metrics).rule == "evaluate"


def test_iteration_i_generates_with_the_policy_of_iteration_i_minus_1(workdir: Path) -> None:
    jobs = planned_jobs(workdir, "--config", "iterations=3")

    # Iteration 1 trains on the base model's rollouts; that generate job needs no adapter.
    base_rollouts = producer(jobs, rollout_samples("base"))
    assert base_rollouts.rule == "generate"
    assert "resources/models/base" in base_rollouts.inputs
    assert not any("adapter" in path for path in base_rollouts.inputs)

    for arm in ("textual", "binary"):
        for iteration in (1, 2, 3):
            previous = "base" if iteration == 1 else f"{arm}/iter{iteration - 1}"
            feedback = producer(jobs, f"results/{arm}/iter{iteration}/feedback.jsonl")
            assert rollout_samples(previous) in feedback.inputs
            assert f"results/{previous}/rollouts/mbpp/train/executions.jsonl" in feedback.inputs

            finetune = producer(jobs, f"results/{arm}/iter{iteration}/adapter")
            assert f"results/{arm}/iter{iteration}/feedback.jsonl" in finetune.inputs
            adapters = [path for path in finetune.inputs if path.endswith("/adapter")]
            assert adapters == ([] if iteration == 1 else [f"results/{arm}/iter{iteration - 1}/adapter"])

            if iteration > 1:
                rollouts = producer(jobs, rollout_samples(previous))
                assert f"results/{previous}/adapter" in rollouts.inputs
                assert "resources/models/base" in rollouts.inputs

            evaluation = producer(jobs, f"results/{arm}/iter{iteration}/eval-good/mbpp/test/samples.jsonl")
            assert f"results/{arm}/iter{iteration}/adapter" in evaluation.inputs


def test_iteration_0_is_shared_by_the_arms(workdir: Path) -> None:
    jobs = planned_jobs(workdir)
    base_jobs = [job for job in jobs if any(o.startswith("results/base/") for o in job.outputs)]
    produced = Counter(output for job in base_jobs for output in job.outputs)
    assert produced["results/base/eval-none/mbpp/test/metrics.json"] == 1
    assert produced["results/base/rollouts/mbpp/train/metrics.json"] == 1
    assert produced[rollout_samples("base")] == 1
    assert all(count == 1 for count in produced.values())


def test_every_policy_is_also_probed_as_generation_loads_it(workdir: Path) -> None:
    jobs = planned_jobs(workdir)
    policies = ["base", *(f"{arm}/iter{i}" for arm in ("textual", "binary") for i in (1, 2))]
    expected = {
        f"results/{policy}/probe/{task_set}/generation.json"
        for policy in policies
        for task_set in ("mbpp/test", "humaneval/test")
    }
    probes = [job for job in jobs if job.rule == "probe_generation"]
    assert len(probes) == len(expected) and {o for job in probes for o in job.outputs} == expected
    for policy in policies:
        job = producer(jobs, f"results/{policy}/probe/mbpp/test/generation.json")
        adapters = [path for path in job.inputs if path.endswith("/adapter")]
        assert adapters == ([] if policy == "base" else [f"results/{policy}/adapter"])
    assert expected <= set(producer(jobs, "results/summary.csv").inputs)
    # Each loads its policy as generation does (model.dtype: auto), the float32 probe as it always does.
    plan = run_snakemake(workdir, "--dry-run", "--cores", "2", "--printshellcmds").stdout
    commands = [line for line in plan.splitlines() if line.startswith("Shell command: leti probe ")]
    as_generated = [command for command in commands if "--as-generated" in command]
    assert len(as_generated) == len(expected) == len(commands) - len(as_generated)
    assert all('"dtype":"auto"' in command and "temperature" not in command for command in as_generated)
    assert all('"dtype":"float32"' in command for command in commands if command not in as_generated)


def test_zero_iterations_evaluates_only_the_base_model(workdir: Path) -> None:
    jobs = planned_jobs(workdir, "--config", "iterations=0")
    counts = Counter(job.rule for job in jobs)
    assert counts["finetune"] == counts["build_feedback"] == 0
    assert counts["evaluate"] == 2


def test_a_gold_arm_trains_on_tasks_without_rollouts(workdir: Path) -> None:
    jobs = planned_jobs(workdir, "--config", "experiments={'gold': {'feedback': 'gold'}}", "iterations=1")
    feedback = producer(jobs, "results/gold/iter1/feedback.jsonl")
    assert "resources/tasks/mbpp/train.jsonl" in feedback.inputs
    assert not any("rollouts" in path for path in feedback.inputs)


def test_the_paper_config_plans_every_arm_at_full_scale(workdir: Path) -> None:
    from conftest import REPO

    jobs = planned_jobs(workdir, "--configfile", str(REPO / "configs" / "paper.yaml"))
    counts = Counter(job.rule for job in jobs)
    arms, iterations, eval_sets = 3, 4, 2
    assert counts["finetune"] == counts["build_feedback"] == arms * iterations
    # Evaluations, then rollout pass rates: the base model's and the two learning arms' policies 1-3.
    rollouts, evaluations = 1 + 2 * (iterations - 1), eval_sets * (1 + arms * iterations)
    assert counts["evaluate"] == evaluations + rollouts
    # Rollouts in 16 shards, evaluations in 4, each gathered into one file.
    assert counts["generate_shard"] == counts["execute_shard"] == 16 * rollouts + 4 * evaluations
    assert counts["gather_samples"] == counts["gather_executions"] == rollouts + evaluations
    assert counts["generate"] == counts["execute"] == 0
    # The gold arm trains on reference solutions: no rollouts of its own policies.
    assert not any(o.startswith("results/gold/") and "/rollouts/" in o for job in jobs for o in job.outputs)


def test_the_eae_config_plans_leti_on_geneva(workdir: Path, geneva_dir: Path, monkeypatch) -> None:
    from conftest import REPO

    monkeypatch.setenv("LETI_GENEVA_DIR", str(geneva_dir))
    jobs = planned_jobs(workdir, "--configfile", str(REPO / "configs" / "eae.yaml"))
    counts = Counter(job.rule for job in jobs)
    arms, iterations = 2, 2
    assert counts["finetune"] == counts["build_feedback"] == arms * iterations
    rollouts = 1 + arms * (iterations - 1)  # the base model's and each arm's policy 1
    evaluations = 1 + arms * iterations  # greedy on geneva/test with the <|good|> prefix only
    assert counts["generate"] == rollouts + evaluations
    assert counts["evaluate"] == evaluations + rollouts  # rollouts have their pass rates too
    assert counts["prepare_tasks"] == 2
    assert "download_geneva" not in counts
    assert "results/base/rollouts/geneva/train/samples.jsonl" in {o for job in jobs for o in job.outputs}
    assert "results/textual/iter2/eval-good/geneva/test/metrics.json" in {
        o for job in jobs for o in job.outputs
    }
    prepare = producer(jobs, "resources/tasks/geneva/train.jsonl")
    assert str(geneva_dir / "meta_data" / "event_ontology.json") in prepare.inputs


def test_the_eae_config_passes_the_snakemake_linter(workdir: Path, geneva_dir: Path, monkeypatch) -> None:
    from conftest import REPO, run_snakemake

    monkeypatch.setenv("LETI_GENEVA_DIR", str(geneva_dir))
    result = run_snakemake(workdir, "--lint", "--configfile", str(REPO / "configs" / "eae.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_list_of_reward_prefixes_adds_one_evaluation_per_trained_policy_and_task_set(workdir: Path) -> None:
    single = Counter(job.rule for job in planned_jobs(workdir))
    jobs = planned_jobs(workdir, "--config", "evaluate={'reward_prefix': ['good', 'bad']}")
    double = Counter(job.rule for job in jobs)
    trained_policies, eval_sets = 2 * 2, 2
    extra = trained_policies * eval_sets
    assert double - single == Counter(generate=extra, execute=extra, evaluate=extra)
    outputs = {o for job in jobs for o in job.outputs}
    assert "results/textual/iter2/eval-bad/humaneval/test/metrics.json" in outputs
    assert "results/textual/iter2/eval-good/humaneval/test/metrics.json" in outputs
    # The base model has no reward token: one evaluation, unprefixed.
    assert not any(o.startswith("results/base/eval-bad") for o in outputs)
    bad = producer(jobs, "results/binary/iter1/eval-bad/mbpp/test/samples.jsonl")
    assert "results/binary/iter1/adapter" in bad.inputs


def test_the_study_config_plans_three_arms_and_the_reward_contrast(workdir: Path) -> None:
    from conftest import REPO

    jobs = planned_jobs(workdir, "--configfile", str(REPO / "configs" / "study.yaml"))
    counts = Counter(job.rule for job in jobs)
    arms, iterations, eval_sets = 3, 2, 2
    assert counts["finetune"] == counts["build_feedback"] == arms * iterations
    rollouts = 1 + 2 * (iterations - 1)  # the gold arm has none
    good = eval_sets * (1 + arms * iterations)
    bad = arms * iterations  # MBPP only
    assert counts["generate"] == counts["execute"] == rollouts + good + bad
    outputs = {o for job in jobs for o in job.outputs}
    assert "results/gold/iter2/eval-bad/mbpp/test/metrics.json" in outputs
    assert not any("eval-bad/humaneval" in output for output in outputs)
    # <|bad|> covers the first 200 MBPP test problems; <|good|> all of them.
    from leti.config import load_config_file

    study = load_config_file(REPO / "config.yaml", REPO / "configs" / "study.yaml")
    assert study.generation_settings("eval", 1, "bad").max_problems == 200
    assert study.generation_settings("eval", 1, "good").max_problems is None


@pytest.mark.parametrize(
    ("config_file", "expected"),
    [
        ("study.yaml", {"mbpp/train": "64", "mbpp/test": None, "humaneval/test": None}),
        ("paper.yaml", {"mbpp/train": None, "mbpp/test": None, "humaneval/test": None}),
    ],
)
def test_a_config_file_merged_into_config_yaml_keeps_its_own_problem_limits(
    workdir: Path, config_file: str, expected: dict[str, str | None]
) -> None:
    from conftest import REPO

    configfile = str(REPO / "configs" / config_file)
    plan = run_snakemake(workdir, "--dry-run", "--printshellcmds", "--cores", "2", "--configfile", configfile)
    prefix = "Shell command: leti tasks prepare "
    commands = [line.removeprefix(prefix) for line in plan.stdout.splitlines() if line.startswith(prefix)]
    limits = {}
    for command in commands:
        words = command.split()
        task_set = f"{words[words.index('--dataset') + 1]}/{words[words.index('--split') + 1]}"
        limits[task_set] = words[words.index("--limit") + 1] if "--limit" in words else None
    assert limits == expected


def test_the_study_config_passes_the_snakemake_linter(workdir: Path) -> None:
    from conftest import REPO, run_snakemake

    result = run_snakemake(workdir, "--lint", "--configfile", str(REPO / "configs" / "study.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_arm_with_its_own_finetune_keys_trains_on_the_shared_base_rollouts(workdir: Path) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["experiments"]["regularised"] = {
        "feedback": "textual",
        "finetune": {"regularizer": {"ratio": 1.0}},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    jobs = planned_jobs(workdir)
    assert rollout_samples("base") in producer(jobs, "results/regularised/iter1/feedback.jsonl").inputs

    plan = run_snakemake(workdir, "--dry-run", "--printshellcmds", "--cores", "2").stdout
    prefix = "Shell command: leti finetune "
    commands = [line.removeprefix(prefix) for line in plan.splitlines() if line.startswith(prefix)]
    ratios = {
        command.split("--output ")[1].split()[0]: command.split('"ratio":')[1][:3] for command in commands
    }
    assert ratios == {
        f"results/{arm}/iter{iteration}/adapter": "1.0" if arm == "regularised" else "0.0"
        for arm in ("textual", "binary", "regularised")
        for iteration in (1, 2)
    }


def test_an_arm_training_on_passing_rollouts_only_says_so_and_the_others_keep_their_settings(
    workdir: Path,
) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["experiments"]["passed-only"] = {"feedback": "textual", "train_on": "passed"}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    plan = run_snakemake(workdir, "--dry-run", "--printshellcmds", "--cores", "2").stdout
    prefix = "Shell command: leti feedback "
    commands = [line.removeprefix(prefix) for line in plan.splitlines() if line.startswith(prefix)]
    settings = {
        command.split("--output ")[1].split()[0]: json.loads(
            command.split("--settings ")[1].split(" > ")[0].strip("'")
        )
        for command in commands
    }
    assert settings == {
        f"results/{arm}/iter{iteration}/feedback.jsonl": {"mode": mode, **extra}
        for arm, mode, extra in [
            ("textual", "textual", {}),
            ("binary", "binary", {}),
            ("passed-only", "textual", {"train_on": "passed"}),
        ]
        for iteration in (1, 2)
    }


@pytest.mark.parametrize(
    ("config_file", "arms"),
    [
        ("heldout.yaml", ["textual", "textual-regularised", "textual-passed-only"]),
        ("strip-own-tests.yaml", ["textual"]),
    ],
)
def test_the_held_out_configs_train_one_iteration_and_evaluate_on_held_out_problems(
    workdir: Path, mbpp_path: Path, config_file: str, arms: list[str]
) -> None:
    from conftest import REPO, write_heldout_tasks

    write_heldout_tasks(workdir, mbpp_path)
    configfile = str(REPO / "configs" / config_file)
    jobs = planned_jobs(workdir, "--configfile", configfile)
    assert Counter(job.rule for job in jobs)["finetune"] == len(arms)
    outputs = {output for job in jobs for output in job.outputs}
    assert {o for o in outputs if o.endswith("metrics.json") and "/eval-" in o} == {
        "results/base/eval-none/heldout/validation/metrics.json"
    } | {f"results/{arm}/iter1/eval-good/heldout/validation/metrics.json" for arm in arms}
    plan = run_snakemake(workdir, "--dry-run", "--printshellcmds", "--cores", "2", "--configfile", configfile)
    prepare_commands = [line.split() for line in plan.stdout.splitlines() if "leti tasks prepare" in line]
    limits = {
        words[words.index("--split") + 1]: words[words.index("--limit") + 1] if "--limit" in words else None
        for words in prepare_commands
    }
    assert limits == {"train": "64", "validation": None}
    assert run_snakemake(workdir, "--lint", "--configfile", configfile).returncode == 0


SHARD_RULES = {"generate_shard", "execute_shard", "gather_samples", "gather_executions"}


def with_shards(workdir: Path, generate: int, evaluate: int) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["generate"]["shards"], config["evaluate"]["shards"] = generate, evaluate
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def test_one_shard_plans_exactly_the_unsharded_jobs(workdir: Path) -> None:
    """config.yaml sets both counts to 1; leaving the keys out or overriding the scatters with 1
    plans the same jobs, with the same inputs and outputs."""
    plan = run_snakemake(workdir, "--dry-run", "--printshellcmds", "--cores", "2").stdout
    assert "--shard" not in plan and "leti gather" not in plan
    jobs = planned_jobs(workdir)
    assert not SHARD_RULES & {job.rule for job in jobs}
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    del config["generate"]["shards"], config["evaluate"]["shards"]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    without_keys = planned_jobs(workdir, "--set-scatter", "rollouts=1", "evaluations=1")

    def signatures(jobs: list[Job]) -> list[tuple[str, list[str], list[str]]]:
        # safe_dump sorts the arms by name, and with them the order of summarize's inputs.
        return sorted((job.rule, sorted(job.inputs), job.outputs) for job in jobs)

    assert signatures(without_keys) == signatures(jobs)


def test_shards_plan_a_job_per_shard_and_a_gather_per_file(workdir: Path) -> None:
    unsharded = planned_jobs(workdir)
    with_shards(workdir, generate=3, evaluate=2)
    jobs = planned_jobs(workdir)
    counts = Counter(job.rule for job in jobs)
    rollouts, evaluations = 1 + 2 * (2 - 1), 2 * (1 + 2 * 2)
    assert counts["generate_shard"] == counts["execute_shard"] == 3 * rollouts + 2 * evaluations
    assert counts["gather_samples"] == counts["gather_executions"] == rollouts + evaluations
    assert counts["generate"] == counts["execute"] == 0
    # The gathers write the very files generate and execute wrote, and the other jobs are unchanged.
    produced = {rule: sorted(o for job in jobs if job.rule == rule for o in job.outputs) for rule in counts}
    before = {
        rule: sorted(o for job in unsharded if job.rule == rule for o in job.outputs)
        for rule in {job.rule for job in unsharded}
    }
    assert produced["gather_samples"] == before["generate"]
    assert produced["gather_executions"] == before["execute"]
    assert {rule: paths for rule, paths in produced.items() if rule not in SHARD_RULES} == {
        rule: paths for rule, paths in before.items() if rule not in {"generate", "execute"}
    }

    rollout_folder = "results/textual/iter1/rollouts/mbpp/train"
    gather = producer(jobs, f"{rollout_folder}/samples.jsonl")
    shards = [f"{rollout_folder}/shards/{i}-of-3/samples.jsonl" for i in (1, 2, 3)]
    assert gather.inputs == ["resources/tasks/mbpp/train.jsonl", *shards]
    for shard in shards:
        assert "results/textual/iter1/adapter" in producer(jobs, shard).inputs
        execution = shard.replace("samples.jsonl", "executions.jsonl")
        assert shard in producer(jobs, execution).inputs
    evaluation = "results/base/eval-none/humaneval/test"
    assert producer(jobs, f"{evaluation}/executions.jsonl").inputs[1:] == [
        f"{evaluation}/shards/{i}-of-2/executions.jsonl" for i in (1, 2)
    ]
    assert run_snakemake(workdir, "--lint").returncode == 0


def test_rollouts_alone_can_be_sharded(workdir: Path) -> None:
    with_shards(workdir, generate=4, evaluate=1)
    jobs = planned_jobs(workdir)
    sharded = {job.outputs[0].split("/shards/")[0] for job in jobs if job.rule == "generate_shard"}
    assert sharded == {
        f"results/{policy}/rollouts/mbpp/train" for policy in ("base", "textual/iter1", "binary/iter1")
    }
    assert all("/eval-" in job.outputs[0] for job in jobs if job.rule in ("generate", "execute"))
    assert Counter(job.rule for job in jobs)["generate_shard"] == 4 * 3
