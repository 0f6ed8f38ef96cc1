"""LETI training texts: one per sample, from its execution (LETI.md, "Build feedback data").

textual: REWARD + <|lang_feedback|> + FEEDBACK + <|/lang_feedback|> + PROMPT + PROGRAM  (failures)
         REWARD + PROMPT + PROGRAM                                                   (passes)
binary:  REWARD + PROMPT + PROGRAM
gold:    <|good|> + PROMPT + the problem's reference solution + EOS (the supervised baseline)

Only gold texts end with the tokenizer's end-of-text token: the reference's supervised
fine-tuning (run_ft.py) wraps each text in BOS ... EOS, its LETI training (run_leti.py) does not.
Without it a policy trained on gold solutions never learns where a solution ends.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from leti.config import FeedbackSettings
from leti.io import ArtifactError, read_jsonl, write_jsonl
from leti.model.tokens import BAD, FEEDBACK_END, FEEDBACK_START, GOOD
from leti.records import Execution, ExecutionStatus, FeedbackExample, FeedbackMode, Problem, Sample, TrainOn

CountTokens = Callable[[str], int]


def training_text(mode: FeedbackMode, problem: Problem, completion: str, execution: Execution | None) -> str:
    """The text for one program; `execution` is None only for gold solutions, which pass by definition."""
    passed = execution is None or execution.status is ExecutionStatus.passed
    reward = GOOD if passed else BAD
    feedback_span = ""
    if mode == "textual" and not passed:
        feedback_span = f"{FEEDBACK_START}{execution.feedback}{FEEDBACK_END}"
    return f"{reward}{feedback_span}{problem.prompt}{completion}"


def gold_completion(problem: Problem, end_of_text: str) -> str:
    """The reference solution as a completion of the prompt (MBPP prompts end without a newline)."""
    if problem.reference_solution is None:
        raise ArtifactError(f"{problem.task_id} has no reference solution for the gold baseline")
    separator = "" if problem.prompt.endswith("\n") else "\n"
    return separator + problem.reference_solution + end_of_text


def example(
    mode: FeedbackMode,
    problem: Problem,
    completion: str,
    execution: Execution | None,
    sample_index: int | None,
    count_tokens: CountTokens,
) -> FeedbackExample:
    text = training_text(mode, problem, completion, execution)
    passed = execution is None or execution.status is ExecutionStatus.passed
    return FeedbackExample(
        task_id=problem.task_id,
        sample_index=sample_index,
        mode=mode,
        reward="good" if passed else "bad",
        num_tokens=count_tokens(text),
        program_offset=len(text) - len(completion),
        text=text,
    )


def rollout_examples(
    mode: FeedbackMode,
    problems: Sequence[Problem],
    samples: Sequence[Sample],
    executions: Sequence[Execution],
    count_tokens: CountTokens,
    train_on: TrainOn = "all",
) -> Iterator[FeedbackExample]:
    """One example per sample, in sample order (only the passing ones with `train_on="passed"`).
    Sandbox errors are ours, not the program's: skipped."""
    problems_by_id = {problem.task_id: problem for problem in problems}
    executions_by_key = {(e.task_id, e.sample_index): e for e in executions}
    for sample in samples:
        execution = executions_by_key.get((sample.task_id, sample.sample_index))
        if execution is None:
            raise ArtifactError(f"no execution for {sample.task_id} sample {sample.sample_index}")
        if sample.task_id not in problems_by_id:
            raise ArtifactError(f"sample for {sample.task_id}, which is not in the task set")
        if execution.status is ExecutionStatus.sandbox_error:
            continue
        if train_on == "passed" and execution.status is not ExecutionStatus.passed:
            continue
        problem = problems_by_id[sample.task_id]
        yield example(mode, problem, sample.completion, execution, sample.sample_index, count_tokens)


def gold_examples(
    problems: Sequence[Problem], count_tokens: CountTokens, end_of_text: str
) -> Iterator[FeedbackExample]:
    for problem in problems:
        yield example("gold", problem, gold_completion(problem, end_of_text), None, None, count_tokens)


@dataclass(frozen=True)
class TextTokenizer:
    """What the feedback stage needs of the model's tokenizer."""

    count_tokens: CountTokens
    end_of_text: str | None


def text_tokenizer(model_dir: str | os.PathLike[str]) -> TextTokenizer:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return TextTokenizer(
        count_tokens=lambda text: len(tokenizer(text, add_special_tokens=False).input_ids),
        end_of_text=tokenizer.eos_token,
    )


def build_feedback(
    tasks: str | os.PathLike[str],
    output: str | os.PathLike[str],
    settings: FeedbackSettings,
    tokenizer: TextTokenizer,
    samples: str | os.PathLike[str] | None = None,
    executions: str | os.PathLike[str] | None = None,
) -> int:
    """Write feedback.jsonl; returns the number of examples."""
    problems = read_jsonl(tasks, Problem)
    if settings.mode == "gold":
        if not tokenizer.end_of_text:
            raise ArtifactError(
                "the gold baseline ends its texts with the tokenizer's eos_token; it has none"
            )
        return write_jsonl(output, gold_examples(problems, tokenizer.count_tokens, tokenizer.end_of_text))
    if samples is None or executions is None:
        raise ArtifactError(f"feedback mode {settings.mode!r} needs the samples and their executions")
    return write_jsonl(
        output,
        rollout_examples(
            settings.mode,
            problems,
            read_jsonl(samples, Sample),
            read_jsonl(executions, Execution),
            tokenizer.count_tokens,
            settings.train_on,
        ),
    )
