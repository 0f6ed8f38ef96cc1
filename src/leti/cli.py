"""The `leti` command line: one subcommand per pipeline stage, called by the Snakemake rules."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from leti.errors import LetiError

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

stderr = Console(stderr=True)

InputFile = Annotated[Path, typer.Option(exists=True, dir_okay=False, readable=True)]
OutputPath = Annotated[Path, typer.Option()]
Settings = Annotated[str, typer.Option(help="The stage's config section as JSON (the rule passes it).")]
Threads = Annotated[int, typer.Option(min=1, help="CPU threads to use.")]


@tasks_app.command("prepare")
def tasks_prepare(
    dataset: Annotated[str, typer.Option(help="mbpp, humaneval, or a custom dataset name.")],
    split: Annotated[str, typer.Option()],
    output: OutputPath,
    source: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="mbpp.jsonl, or the custom JSONL file.")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Keep only the first N problems.")] = None,
) -> None:
    """Write one task set as normalised Problem records (JSONL)."""
    from leti.io import write_jsonl
    from leti.tasks import load_task_set

    problems = load_task_set(dataset, split, source, limit)
    count = write_jsonl(output, problems)
    stderr.print(f"{dataset}/{split}: {count} problems -> {output}")


@tasks_app.command("download-mbpp")
def tasks_download_mbpp(output: OutputPath) -> None:
    """Download MBPP at its pinned commit and verify its sha256."""
    from leti.tasks import MBPP_URL, download_mbpp

    download_mbpp(output)
    stderr.print(f"MBPP from {MBPP_URL} -> {output} (sha256 verified)")


@config_app.command("check")
def config_check(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False)] = Path("config.yaml"),
) -> None:
    """Validate a config file without running anything."""
    from leti.config import load_config_file

    config = load_config_file(path)
    stderr.print(
        f"{path}: valid; {config.iterations} iteration(s), experiments: {', '.join(config.experiments)}"
    )


def _not_built_yet(stage: str, issue: int) -> NoReturn:
    raise LetiError(f"`leti {stage}` is not implemented yet (tracked in issue {issue}).")


@model_app.command("prepare")
def model_prepare(output: OutputPath, settings: Settings = "{}", threads: Threads = 1) -> None:
    """Build the base model as a plain Hugging Face folder."""
    _not_built_yet("model prepare", 4)


@sandbox_app.command("build")
def sandbox_build(output: OutputPath, settings: Settings = "{}") -> None:
    """Build the sandbox image and record its id."""
    _not_built_yet("sandbox build", 3)


@app.command()
def generate(
    model: Annotated[Path, typer.Option(exists=True, file_okay=False)],
    tasks: InputFile,
    output: OutputPath,
    adapter: Annotated[Path | None, typer.Option(exists=True, file_okay=False)] = None,
    settings: Settings = "{}",
    threads: Threads = 1,
) -> None:
    """Sample completions for every problem from the base model plus an optional LoRA adapter."""
    _not_built_yet("generate", 4)


@app.command()
def execute(
    tasks: InputFile, samples: InputFile, output: OutputPath, settings: Settings = "{}", threads: Threads = 1
) -> None:
    """Run every sample with its problem's tests in the sandbox."""
    _not_built_yet("execute", 3)


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
    _not_built_yet("feedback", 5)


@app.command()
def finetune(
    model: Annotated[Path, typer.Option(exists=True, file_okay=False)],
    feedback: InputFile,
    output: OutputPath,
    log: OutputPath,
    previous_adapter: Annotated[Path | None, typer.Option(exists=True, file_okay=False)] = None,
    settings: Settings = "{}",
    threads: Threads = 1,
) -> None:
    """LoRA fine-tuning on the feedback texts, continuing from the previous adapter."""
    _not_built_yet("finetune", 5)


@app.command()
def evaluate(
    tasks: InputFile,
    samples: InputFile,
    executions: InputFile,
    output: OutputPath,
    policy: Annotated[str, typer.Option(help='"base" or "{experiment}/iter{i}".')],
    settings: Settings = "{}",
) -> None:
    """Compute pass@k and error types for one policy on one task set."""
    from leti.config import MetricsSettings
    from leti.evaluate import evaluate as evaluate_policy

    metrics = evaluate_policy(
        tasks, samples, executions, output, MetricsSettings.model_validate_json(settings), policy
    )
    rates = ", ".join(f"{name} {value:.3f}" for name, value in metrics.pass_at_k.items())
    stderr.print(f"{policy} on {metrics.dataset}/{metrics.split}: {rates or 'no pass@k'} -> {output}")


def main() -> None:
    try:
        app()
    except LetiError as error:
        stderr.print(f"[bold red]error:[/] {error}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
