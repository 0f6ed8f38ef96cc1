"""The `leti` command line: one subcommand per pipeline stage, called by the Snakemake rules."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.console import Console

from leti.errors import LetiError
from leti.model.gpus import claim_gpus

if TYPE_CHECKING:
    from leti.analysis.report import TableOutput

app = typer.Typer(
    help="LETI: learn to write code from execution feedback. Each command is one pipeline stage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
tasks_app = typer.Typer(help="Problem sets: download and normalise them.", no_args_is_help=True)
config_app = typer.Typer(help="Experiment configuration.", no_args_is_help=True)
model_app = typer.Typer(help="The base model.", no_args_is_help=True)
sandbox_app = typer.Typer(help="The execution sandbox.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(sandbox_app, name="sandbox")

stderr = Console(stderr=True, soft_wrap=True)


def table_output(markdown: bool = False) -> TableOutput:
    """Tables at their full width when written to a file or pipe (rich would fit them to 80
    columns and cut the names)."""
    from leti.analysis.report import TableOutput

    return TableOutput(Console() if sys.stdout.isatty() else Console(width=200), markdown)


InputFile = Annotated[Path, typer.Option(exists=True, dir_okay=False, readable=True)]
OutputPath = Annotated[Path, typer.Option()]
Settings = Annotated[str, typer.Option(help="The stage's config section as JSON (the rule passes it).")]
Threads = Annotated[int, typer.Option(min=1, help="CPU threads to use.")]
Markdown = Annotated[bool, typer.Option("--markdown", help="Print the tables as Markdown.")]


@tasks_app.command("prepare")
def tasks_prepare(
    dataset: Annotated[str, typer.Option(help="mbpp, humaneval, geneva, or a custom dataset name.")],
    split: Annotated[str, typer.Option()],
    output: OutputPath,
    source: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            help="mbpp.jsonl, the custom JSONL or OneIE file, or the GENEVA folder (or one of its files).",
        ),
    ] = None,
    ontology: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Event argument extraction: the ontology (GENEVA's is found in its folder).",
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option(help="Event argument extraction: also check entity types and unseen spans.")
    ] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Keep only the first N problems.")] = None,
    extra_stop_sequences: Annotated[
        str, typer.Option(help="A JSON list of stop sequences to add (a departure from the reference).")
    ] = "[]",
    strip_own_tests: Annotated[
        bool, typer.Option(help="Remove the model's own test code from completions (a departure).")
    ] = False,
) -> None:
    """Write one task set as normalised Problem records (JSONL)."""
    from pydantic import TypeAdapter

    from leti.io import write_jsonl
    from leti.tasks.sources import load_task_set

    stops = TypeAdapter(list[str]).validate_json(extra_stop_sequences)
    problems = load_task_set(dataset, split, source, limit, ontology, strict, stops, strip_own_tests)
    count = write_jsonl(output, problems)
    stderr.print(f"{dataset}/{split}: {count} problems -> {output}")


@tasks_app.command("heldout-mbpp")
def tasks_heldout_mbpp(
    source: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="mbpp.jsonl")],
    rollout_problems: Annotated[
        int, typer.Option(min=0, help="How many training problems the rollouts use (data.limits).")
    ],
    output: OutputPath,
) -> None:
    """Write MBPP's validation problems and its unused training problems as a custom task file,
    to choose settings on problems that are neither trained on nor test problems."""
    from leti.io import write_jsonl
    from leti.tasks.sources import mbpp_heldout

    count = write_jsonl(output, mbpp_heldout(source, rollout_problems))
    stderr.print(f"{count} held-out MBPP problems -> {output}")


@tasks_app.command("download-mbpp")
def tasks_download_mbpp(output: OutputPath) -> None:
    """Download MBPP at its pinned commit and verify its sha256."""
    from leti.tasks.sources import MBPP_URL, download_mbpp

    download_mbpp(output)
    stderr.print(f"MBPP from {MBPP_URL} -> {output} (sha256 verified)")


@tasks_app.command("download-geneva")
def tasks_download_geneva(output: OutputPath) -> None:
    """Download GENEVA (CC BY 3.0; Parekh et al., ACL 2023) at its pinned commit and verify every sha256."""
    from leti.tasks.sources import GENEVA_URL, download_geneva

    download_geneva(output)
    stderr.print(f"GENEVA from {GENEVA_URL} -> {output} (sha256 verified)")


@config_app.command("check")
def config_check(
    paths: Annotated[list[Path] | None, typer.Argument(exists=True, dir_okay=False)] = None,
) -> None:
    """Validate config files without running anything; several are merged in order, key by key, as
    Snakemake merges them (e.g. config.yaml configs/study.yaml)."""
    from leti.config import load_config_file

    files = paths or [Path("config.yaml")]
    config = load_config_file(*files)
    stderr.print(
        f"{' + '.join(map(str, files))}: valid; {config.iterations} iteration(s), "
        f"experiments: {', '.join(config.experiments)}"
    )


@model_app.command("prepare")
def model_prepare(output: OutputPath, settings: Settings = "{}", threads: Threads = 1) -> None:
    """Build the base model as a plain Hugging Face folder, with the LETI special tokens added."""
    from leti.config import ModelConfig
    from leti.model.device import set_cpu_threads
    from leti.model.sources import prepare_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_cpu_threads(threads)
    source = ModelConfig.model_validate_json(settings).source
    ids = prepare_model(source, output)
    stderr.print(f"{source} -> {output} (LETI token ids {ids})")


@sandbox_app.command("build")
def sandbox_build(
    output: OutputPath,
    settings: Settings = "{}",
    dockerfile: Annotated[Path, typer.Option(exists=True, dir_okay=False)] = Path("envs/sandbox.Dockerfile"),
    base: Annotated[
        str | None, typer.Option(help="auto, registry or debootstrap: overrides execute.base_image.")
    ] = None,
    archive: Annotated[
        Path | None,
        typer.Option(help="Also save the image here (gzip-compressed `docker save`), for nodes without it."),
    ] = None,
) -> None:
    """Build the sandbox image (a no-op when it is up to date) and record its id."""
    import functools
    import json

    from leti.execute import load_settings
    from leti.io import write_json
    from leti.sandbox.image import build_image, save_image

    section = json.loads(settings) | ({"base_image": base} if base else {})
    log = functools.partial(stderr.out, highlight=False)
    record = build_image(load_settings(json.dumps(section)), dockerfile, log=log)
    if archive is not None:
        save_image(record, archive, log)
    write_json(output, record)
    stderr.print(f"sandbox image {record.image} ({record.base_kind} base) -> {output}")


@app.command()
def generate(
    model: Annotated[Path, typer.Option(exists=True, file_okay=False)],
    tasks: InputFile,
    output: OutputPath,
    adapter: Annotated[Path | None, typer.Option(exists=True, file_okay=False)] = None,
    settings: Settings = "{}",
    threads: Threads = 1,
    shard: Annotated[
        str,
        typer.Option(
            metavar="I-of-N",
            help="Only shard I of N of the requests: the I-th contiguous slice, in request order "
            "(gather the N shards with `leti gather`).",
        ),
    ] = "1-of-1",
) -> None:
    """Sample completions for every problem from the base model plus an optional LoRA adapter."""
    from leti.config import GenerationSettings
    from leti.generate import generate_file
    from leti.shards import Shard

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parsed = GenerationSettings.model_validate_json(settings)
    part = Shard.parse(shard)
    if parsed.device != "cpu":
        claim_gpus(1)
    samples = generate_file(model, tasks, output, parsed, adapter, threads, stderr, part)
    tokens = sum(sample.completion_tokens for sample in samples)
    stderr.print(f"{len(samples)} samples, {tokens} generated tokens -> {output}")


@app.command()
def probe(
    model: Annotated[Path, typer.Option(exists=True, file_okay=False)],
    tasks: InputFile,
    output: OutputPath,
    policy: Annotated[str, typer.Option(help='"base" or "{experiment}/iter{i}".')],
    adapter: Annotated[Path | None, typer.Option(exists=True, file_okay=False)] = None,
    settings: Settings = "{}",
    threads: Threads = 1,
    as_generated: Annotated[
        bool,
        typer.Option(
            "--as-generated",
            help="Score after <|good|> only, with the policy as generation loads it; --settings then holds "
            "the probe's problems and generation's dtype and device (GenerationProbeSettings).",
        ),
    ] = False,
) -> None:
    """Score each reference solution after <|good|> and after <|bad|>, teacher-forced: has the policy
    learned what the reward tokens mean?"""
    from leti.config import GenerationProbeSettings, ProbeSettings
    from leti.probe import probe_as_generated, probe_policy

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parsed = (GenerationProbeSettings if as_generated else ProbeSettings).model_validate_json(settings)
    if parsed.device != "cpu":
        claim_gpus(1)
    if as_generated:
        generated = probe_as_generated(
            model,
            tasks,
            output,
            parsed,
            policy,
            adapter,
            threads,
        )
        good = generated.estimates.get("good")
        scored = (
            f"after good {good.value:+.4f} nats/token" if good else "no problem with a reference solution"
        )
        stderr.print(
            f"{policy} as generated ({generated.dtype}) on {generated.num_problems} problems: {scored} -> {output}"
        )
        return
    result = probe_policy(model, tasks, output, parsed, policy, adapter, threads)
    contrast = result.estimates.get("good_minus_bad")
    summary = (
        f"good - bad {contrast.value:+.4f} nats/token [{contrast.ci_low:+.4f}, {contrast.ci_high:+.4f}], "
        f"p {result.p_value:.3g}"
        if contrast
        else "no problem with a reference solution"
    )
    stderr.print(f"{policy} on {result.num_problems} problems: {summary} -> {output}")


@app.command()
def postprocess(tasks: InputFile, samples: InputFile, output: OutputPath) -> None:
    """Apply the task set's post-processing (stop sequences, own-test stripping) to samples generated
    without it: e.g. a departure's effect on an evaluation, without generating again."""
    from leti.generate import postprocess_samples
    from leti.io import read_jsonl, write_jsonl
    from leti.records import Problem, Sample

    original = read_jsonl(samples, Sample)
    processed = postprocess_samples(read_jsonl(tasks, Problem), original)
    changed = sum(a.completion != b.completion for a, b in zip(original, processed, strict=True))
    write_jsonl(output, processed)
    stderr.print(f"{changed} of {len(processed)} completions changed -> {output}")


@app.command()
def execute(
    tasks: InputFile,
    samples: InputFile,
    output: OutputPath,
    settings: Settings = "{}",
    threads: Threads = 1,
    sandbox: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="image.json from `leti sandbox build` (docker backend)."
        ),
    ] = None,
    sandbox_archive: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="The image's archive from `leti sandbox build --archive`: loaded where the engine lacks the image.",
        ),
    ] = None,
) -> None:
    """Run every sample with its problem's tests in the sandbox."""
    from leti.execute import load_settings, run_stage

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = run_stage(
        tasks,
        samples,
        output,
        load_settings(settings),
        threads,
        sandbox,
        stderr,
        sandbox_archive=sandbox_archive,
    )
    summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items())) or "no samples"
    stderr.print(f"{summary} -> {output}")


@app.command()
def gather(
    shards: Annotated[
        list[Path], typer.Argument(exists=True, dir_okay=False, help="The shards' files, shard 1 first.")
    ],
    records: Annotated[
        Literal["samples", "executions"],
        typer.Option(help="What the shards hold: samples (generate) or executions (execute)."),
    ],
    tasks: InputFile,
    output: OutputPath,
    settings: Settings = "{}",
) -> None:
    """Concatenate the shards of one generate or execute job into the file that job writes unsharded,
    after checking that shard I of N holds exactly the I-th slice of the task set's requests."""
    from leti.config import GenerationSettings
    from leti.io import read_jsonl
    from leti.records import Problem
    from leti.shards import gather_shards, request_keys

    parsed = GenerationSettings.model_validate_json(settings)
    problems = read_jsonl(tasks, Problem)[: parsed.max_problems]
    count = gather_shards(shards, output, records, request_keys(problems, parsed.n))
    stderr.print(f"{count} {records} from {len(shards)} shards -> {output}")


@app.command()
def feedback(
    tasks: InputFile,
    output: OutputPath,
    model: Annotated[Path, typer.Option(exists=True, file_okay=False, help="For its tokenizer.")],
    samples: Annotated[Path | None, typer.Option(exists=True, dir_okay=False)] = None,
    executions: Annotated[Path | None, typer.Option(exists=True, dir_okay=False)] = None,
    settings: Settings = "{}",
) -> None:
    """Turn executions into LETI training texts."""
    from leti.config import FeedbackSettings
    from leti.feedback import build_feedback, text_tokenizer

    parsed = FeedbackSettings.model_validate_json(settings)
    count = build_feedback(tasks, output, parsed, text_tokenizer(model), samples, executions)
    stderr.print(f"{count} {parsed.mode} training texts -> {output}")


@app.command()
def finetune(
    model: Annotated[Path, typer.Option(exists=True, file_okay=False)],
    feedback: InputFile,
    output: OutputPath,
    log: OutputPath,
    previous_adapter: Annotated[Path | None, typer.Option(exists=True, file_okay=False)] = None,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Where to keep checkpoints; a rerun resumes from the last one.")
    ] = None,
    settings: Settings = "{}",
    threads: Threads = 1,
) -> None:
    """LoRA or full fine-tuning on the feedback texts, continuing from the previous iteration's policy;
    with `processes` above 1, data-parallel in that many processes."""
    from accelerate import PartialState

    from leti.config import FinetuneSettings
    from leti.finetune import finetune as train
    from leti.finetune import launched, run_processes

    parsed = FinetuneSettings.model_validate_json(settings)
    if parsed.device != "cpu" and not launched():
        claim_gpus(parsed.processes)  # the launched processes see only these
    if parsed.processes > 1 and not launched():
        arguments = ["finetune", "--model", str(model), "--feedback", str(feedback), "--output", str(output)]
        arguments += ["--log", str(log), "--settings", settings, "--threads", str(threads)]
        if previous_adapter is not None:
            arguments += ["--previous-adapter", str(previous_adapter)]
        if checkpoint_dir is not None:
            arguments += ["--checkpoint-dir", str(checkpoint_dir)]
        raise typer.Exit(run_processes(parsed.processes, parsed.device, threads, arguments))
    steps = train(
        model,
        feedback,
        output,
        log,
        parsed,
        previous_adapter=previous_adapter,
        checkpoint_dir=checkpoint_dir,
        threads=threads,
    )
    if PartialState().is_main_process:
        stderr.print(f"{len(steps)} steps, final loss {steps[-1].loss:.4f} -> {output}")


@app.command()
def evaluate(
    tasks: InputFile,
    samples: InputFile,
    executions: InputFile,
    output: OutputPath,
    policy: Annotated[str, typer.Option(help='"base" or "{experiment}/iter{i}".')],
    settings: Settings = "{}",
) -> None:
    """Compute pass@k, error types and their CIs for one policy on one task set."""
    from leti.config import MetricsSettings
    from leti.evaluate import evaluate as evaluate_policy

    metrics = evaluate_policy(
        tasks, samples, executions, output, MetricsSettings.model_validate_json(settings), policy
    )
    rates = ", ".join(f"{name} {value:.3f}" for name, value in metrics.pass_at_k.items())
    stderr.print(f"{policy} on {metrics.dataset}/{metrics.split}: {rates or 'no pass@k'} -> {output}")


@app.command()
def summarize(
    metrics: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="metrics.json files.")],
    csv: OutputPath,
    comparisons: OutputPath,
    pass_at_k_plot: OutputPath,
    sample_efficiency_plot: OutputPath,
    error_types_plot: OutputPath,
    loss_plot: OutputPath,
    reward_probe_plot: OutputPath,
    train_log: Annotated[list[Path] | None, typer.Option(exists=True, dir_okay=False)] = None,
    probe: Annotated[
        list[Path] | None, typer.Option(exists=True, dir_okay=False, help="probe.json files.")
    ] = None,
    generation_probe: Annotated[
        list[Path] | None,
        typer.Option(exists=True, dir_okay=False, help="generation.json files (leti probe --as-generated)."),
    ] = None,
) -> None:
    """Aggregate metrics and reward-token probes into summary.csv and comparisons.csv, and plot
    pass@k, sample efficiency, error types, training loss and the reward probe."""
    from leti.analysis.report import SummaryOutputs
    from leti.analysis.report import summarize as write_summary

    outputs = SummaryOutputs(
        csv,
        comparisons,
        pass_at_k_plot,
        sample_efficiency_plot,
        error_types_plot,
        loss_plot,
        reward_probe_plot,
    )
    table = write_summary(metrics, train_log or [], outputs, probe or [], generation_probe or [])
    stderr.print(f"{len(table)} rows -> {csv}; comparisons -> {comparisons}")


@app.command()
def summary(
    results: Annotated[Path, typer.Argument(exists=True, file_okay=False)] = Path("results"),
    markdown: Markdown = False,
) -> None:
    """Print the arm-by-iteration pass@k and outcome tables of the metrics under RESULTS."""
    from leti.analysis.report import print_summary

    print_summary(results, table_output(markdown))


@app.command()
def compare(
    results_a: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    results_b: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    output: Annotated[
        Path | None, typer.Option(help="Also write the rows as CSV (comparisons.csv's columns).")
    ] = None,
    markdown: Markdown = False,
) -> None:
    """Pair the evaluations two runs share (say a departure against the faithful setting), problem by
    problem: a - b with its 95% paired-bootstrap CI and p-value."""
    from leti.analysis.report import compare_runs
    from leti.io import write_csv

    table = compare_runs(results_a, results_b, table_output(markdown))
    if output is not None:
        write_csv(output, table)


@app.command()
def diagnose(
    results: Annotated[Path, typer.Argument(exists=True, file_okay=False)] = Path("results"),
    tasks: Annotated[Path, typer.Option(exists=True, file_okay=False, help="The prepared task sets.")] = Path(
        "resources/tasks"
    ),
    output: Annotated[Path | None, typer.Option(help="Also write the rows as CSV.")] = None,
    markdown: Markdown = False,
) -> None:
    """Text features of every samples set under RESULTS, with 95% CIs: own test code, length cuts,
    SyntaxErrors, Markdown fences, mean completion tokens."""
    from leti.analysis.diagnose import diagnosis_table, diagnosis_view
    from leti.io import write_csv

    table = diagnosis_table(results, tasks)
    tables = table_output(markdown)
    for (dataset, split), view in diagnosis_view(table).groupby(["dataset", "split"], sort=False):
        tables.table(view.drop(columns=["dataset", "split"]), f"{dataset}/{split}: share of samples [95% CI]")
    if output is not None:
        write_csv(output, table)


@app.command()
def timings(
    benchmarks: Annotated[Path, typer.Argument(exists=True, file_okay=False)] = Path("benchmarks"),
    markdown: Markdown = False,
) -> None:
    """Per-rule wall times and peak memory, from Snakemake's benchmark files under BENCHMARKS."""
    from leti.analysis.report import print_timings

    print_timings(benchmarks, table_output(markdown))


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    task_id: Annotated[str | None, typer.Option(help="Show only this task's records.")] = None,
    status: Annotated[
        str | None,
        typer.Option(help="passed, failed, timeout, an exception type, good/bad, stop/eos/length."),
    ] = None,
    examples: Annotated[int, typer.Option(min=0, help="How many records to show.")] = 3,
) -> None:
    """Counts by status and error type, and a few examples, of any artifact."""
    from leti.analysis.report import inspect_artifact

    inspect_artifact(path, Console(soft_wrap=True), task_id=task_id, status=status, examples=examples)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def snakemake(context: typer.Context) -> None:
    """Run Snakemake with these arguments in this folder (what `make run` does), first removing the
    lock of a Snakemake that was killed here; a lock that a live Snakemake holds stays. On a machine
    with GPUs, a local run gets `--resources gpu=N` unless the arguments set resources themselves."""
    from leti.model.gpus import with_gpu_limit
    from leti.workflow_lock import run_snakemake

    run_snakemake(with_gpu_limit(context.args))


def main() -> None:
    try:
        app()
    except LetiError as error:
        stderr.print(f"[bold red]error:[/] {error}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
