# Config validation, wildcard constraints and the input functions of every rule.

import json
import shlex
from pathlib import Path
from typing import get_args

from leti.config import ConfigError, FeedbackSettings, load_config
from leti.layout import POLICY_PATTERN, PURPOSE_PATTERN, eval_purpose, parse_policy, parse_purpose, policy_name
from leti.model.sources import resolve_source
from leti.model.tokens import RewardPrefix
from leti.tasks.sources import GENEVA_ONTOLOGY, GENEVA_SHA256, GENEVA_SPLIT_FILES

GENEVA_DOWNLOAD_DIR = "resources/data/geneva"


def _validated_config():
    try:
        return load_config(config, workflow.configfiles, workflow.config_settings.config)
    except ConfigError as error:
        # A plain message, not a traceback into the Snakefile: the user needs the key.
        raise WorkflowError(str(error)) from None


LETI = _validated_config()


wildcard_constraints:
    dataset=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    split=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    experiment=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    iteration=r"[1-9][0-9]*",
    policy=POLICY_PATTERN,
    purpose=PURPOSE_PATTERN,


# Rollouts and evaluations are each generated and executed in this many shards (docs/pipeline.md#shards).
# `--set-scatter rollouts=N evaluations=M` overrides them for one run; the helpers below read the counts
# back through scatter.*, so the rules always agree with the shard files.
scattergather:
    rollouts=LETI.generate.shards,
    evaluations=LETI.evaluate.shards,


def split_task_set(name):
    dataset, split = name.split("/")
    return {"dataset": dataset, "split": split}


def optional_flag(name):
    """A params function giving `--name PATH` when the optional input `name` is present."""
    return lambda wildcards, input: f"--{name.replace('_', '-')} {input[name]}" if input.get(name) else ""


def trained_policies():
    return [
        policy_name(experiment, iteration)
        for experiment in LETI.experiments
        for iteration in range(1, LETI.iterations + 1)
    ]


def all_metrics():
    """Every evaluation (each policy, reward prefix and task set), then the rollout pass rates
    of every policy whose rollouts are trained on."""
    evaluations = [
        rules.evaluate.output.metrics.format(policy=policy, purpose=eval_purpose(prefix), **split_task_set(task_set))
        for policy in ["base", *trained_policies()]
        for prefix in LETI.evaluation_prefixes(parse_policy(policy)[1])
        for task_set in LETI.evaluate.task_sets_under(prefix)
    ]
    rollouts = [
        rules.evaluate.output.metrics.format(policy=policy, purpose="rollouts", **split_task_set(LETI.generate.tasks))
        for policy in rollout_policies()
    ]
    return evaluations + rollouts


def all_probes():
    """The reward-token probe of every policy, the base model's included, on every probed task set."""
    return [
        rules.probe.output.probe.format(policy=policy, **split_task_set(task_set))
        for policy in ["base", *trained_policies()]
        for task_set in LETI.probed_task_sets()
    ]


def rollout_policies():
    """Policies whose rollouts some arm trains on: the base model and iterations 1 .. n-1 of the
    arms that learn from feedback (the gold arm trains on reference solutions)."""
    learners = [name for name, arm in LETI.experiments.items() if arm.feedback != "gold"]
    if LETI.iterations == 0 or not learners:
        return []
    return ["base"] + [policy_name(arm, i) for arm in learners for i in range(1, LETI.iterations)]


def all_train_logs():
    return [rules.finetune.output.train_log.format(**dict(zip(("experiment", "iteration"), parse_policy(policy)))) for policy in trained_policies()]


# --- tasks


def task_source(wildcards):
    """The file a task set is read from; HumanEval ships inside its package."""
    if wildcards.dataset == "mbpp":
        return LETI.mbpp_path() or rules.download_mbpp.output[0]
    if wildcards.dataset == "geneva":
        return geneva_file(GENEVA_SPLIT_FILES[wildcards.split])
    if wildcards.dataset in LETI.data.custom:
        return LETI.data.custom[wildcards.dataset][wildcards.split]
    if wildcards.dataset in LETI.data.eae:
        return LETI.data.eae[wildcards.dataset].splits[wildcards.split]
    return []


def task_ontology(wildcards):
    """The ontology of an event argument extraction set: an input, so editing it rebuilds the tasks."""
    if wildcards.dataset == "geneva":
        return geneva_file(GENEVA_ONTOLOGY)
    if wildcards.dataset in LETI.data.eae:
        return LETI.data.eae[wildcards.dataset].ontology
    return []


def geneva_file(path):
    """A GENEVA file, from the local folder or else as download_geneva fetches it."""
    folder = LETI.geneva_dir()
    return str(folder / path) if folder else f"{GENEVA_DOWNLOAD_DIR}/{path}"


def geneva_download_folder(wildcards, output):
    """The folder download_geneva fills: its first output without GENEVA's own path."""
    depth = len(Path(next(iter(GENEVA_SHA256))).parts)
    return str(Path(output[0]).parents[depth - 1])


def strict_option(wildcards):
    return "--strict" if LETI.data.eae_strict and LETI.task_metric(wildcards.dataset) == "eae" else ""


def departure_options(wildcards):
    stops = LETI.data.extra_stop_sequences
    options = [f"--extra-stop-sequences {shlex.quote(json.dumps(stops))}"] if stops else []
    return " ".join(options + (["--strip-own-tests"] if LETI.data.strip_own_tests else []))


def limit_option(wildcards):
    limit = LETI.data.limits.get(f"{wildcards.dataset}/{wildcards.split}")
    return f"--limit {limit}" if limit else ""


# --- the base model


def model_source(wildcards):
    """A local model file or folder is an input, so replacing it rebuilds the base model."""
    source = resolve_source(LETI.model.source)
    return source.location if source.kind in ("gguf", "folder") else []


# --- generate and execute


def policy_adapter(wildcards):
    """The LoRA adapter behind a policy; the base model has none."""
    experiment, iteration = parse_policy(wildcards.policy)
    if iteration == 0:
        return []
    return rules.finetune.output.adapter.format(experiment=experiment, iteration=iteration)


def generation_settings(wildcards):
    _, iteration = parse_policy(wildcards.policy)
    purpose, prefix = parse_purpose(wildcards.purpose)
    return LETI.generation_settings(purpose, iteration, prefix).model_dump_json()


def metrics_settings(wildcards):
    _, iteration = parse_policy(wildcards.policy)
    purpose, prefix = parse_purpose(wildcards.purpose)
    return LETI.metrics_settings(purpose, iteration, prefix, wildcards.dataset).model_dump_json()


def sandbox_image(wildcards):
    return rules.build_sandbox.output.record if LETI.execute.backend == "docker" else []


def sandbox_archive_output():
    """build_sandbox's archive of the image, with execute.image_archive: made on the node that built it."""
    return {"archive": "resources/sandbox/image.tar.gz"} if LETI.execute.image_archive else {}


def sandbox_archive(wildcards):
    """The image's archive, for execute jobs on nodes whose engine lacks the image."""
    wanted = LETI.execute.backend == "docker" and LETI.execute.image_archive
    return rules.build_sandbox.output.archive if wanted else []


def sandbox_options(wildcards, input):
    """`--sandbox image.json`, and `--sandbox-archive` with the archive; nothing for the local backend."""
    return " ".join(filter(None, (optional_flag(name)(wildcards, input) for name in ("sandbox", "sandbox_archive"))))


def sandbox_sources(wildcards):
    """What the sandbox image is built from: a change to either rebuilds it."""
    return {
        "dockerfile": f"{workflow.basedir}/envs/sandbox.Dockerfile",
        "dispatcher": f"{workflow.basedir}/src/leti/sandbox/dispatcher.py",
    }


# --- shards


SHARD_FOLDER = "results/{policy}/{purpose}/{dataset}/{split}/shards/{scatteritem}"


def shard_set(purpose_folder):
    """The scatter of a purpose folder: rollouts, or evaluations for every eval-{prefix}."""
    purpose, _ = parse_purpose(purpose_folder)
    return scatter.rollouts if purpose == "rollouts" else scatter.evaluations


def sharded_purposes():
    """The purpose folders generated in more than one shard, as the shard and gather rules' wildcard
    constraint; empty when nothing is sharded (those rules are then not defined)."""
    purposes = ["rollouts", *(eval_purpose(prefix) for prefix in get_args(RewardPrefix))]
    return "|".join(purpose for purpose in purposes if len(shard_set(purpose)("{scatteritem}")) > 1)


def shard_files(pattern):
    """An input function: every shard's file of one generate or execute job, shard 1 first."""
    return lambda wildcards: shard_set(wildcards.purpose)(pattern, **dict(wildcards.items()))


# --- feedback and fine-tuning


def rollout_artifacts(wildcards):
    """Samples and executions of policy i-1 on the training tasks; the gold arm needs none."""
    if LETI.experiments[wildcards.experiment].feedback == "gold":
        return {}
    previous = policy_name(wildcards.experiment, int(wildcards.iteration) - 1)
    where = dict(policy=previous, purpose="rollouts", **split_task_set(LETI.generate.tasks))
    return {
        "samples": rules.generate.output.samples.format(**where),
        "executions": rules.execute.output.executions.format(**where),
    }


def feedback_settings(wildcards):
    experiment = LETI.experiments[wildcards.experiment]
    return FeedbackSettings(mode=experiment.feedback, train_on=experiment.train_on).as_param()


def previous_adapter(wildcards):
    iteration = int(wildcards.iteration)
    if iteration == 1:
        return []
    return rules.finetune.output.adapter.format(experiment=wildcards.experiment, iteration=iteration - 1)


def finetune_settings(wildcards):
    return LETI.finetune_settings(wildcards.experiment).model_dump_json()


# --- resources of every job (config `resources`, `device`), locally and on a cluster


def job_threads(rule):
    """The rule's threads; a local run caps them at --cores."""
    return LETI.resources.of(rule).threads


def job_resources(rule):
    """mem_mb and runtime (minutes) of the rule's jobs, and `gpu` for the rules that run a model
    when `device` is cuda; unpacked into each rule's `resources:`."""
    return LETI.job_resources(rule)


# --- the probe as generation loads the policy (rules/probe.smk: probe_generation; rules/summary.smk)


def generation_probe_settings(wildcards):
    """The probe's problems, with the settings the policy's evaluation generates with."""
    _, iteration = parse_policy(wildcards.policy)
    return LETI.generation_probe_settings(iteration).model_dump_json()


def all_generation_probes():
    """Every policy's probe as generated, on every probed task set, beside `all_probes()`."""
    return [
        rules.probe_generation.output.probe.format(policy=policy, **split_task_set(task_set))
        for policy in ["base", *trained_policies()]
        for task_set in LETI.probed_task_sets()
    ]
