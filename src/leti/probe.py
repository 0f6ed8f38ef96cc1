"""The reward-token probe: has a policy learned what `<|good|>` and `<|bad|>` mean?

LETI trains `<|good|> + prompt + program` on passing programs and `<|bad|> + ...` on failing ones,
so a policy that learned the tokens finds a correct program more likely after `<|good|>`. The probe
measures that without generating: for each problem with a reference solution, the mean
log-likelihood per token of the solution after `<|good|> + prompt` and after `<|bad|> + prompt`,
teacher-forced, and their paired difference over problems (leti.analysis.stats). A greedy pass@1 contrast
moves by whole problems; this sees differences of a thousandth of a nat per token.

The policy is the one that generates (`leti.generate.load_policy`: adapter merged), scored in
`probe.dtype` (float32), and the text is exactly what it is trained on and continues: `policy_input`
followed by the solution. Also reported: the distance between the two tokens' embedding rows,
identical in the base model (`leti.model.sources.add_leti_tokens`), beside the typical row norm for scale.

`probe_as_generated` scores the same solutions after `<|good|>` under the policy exactly as `leti
generate` loads it (its dtype, bfloat16 by default where native; its adapter merged): beside the
float32 probe, how much of an update's shift the generating policy keeps (leti.analysis.comparisons).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from leti.analysis import stats
from leti.config import GenerationProbeSettings, ProbeProblems, ProbeSettings
from leti.finetune import IGNORE_INDEX, TokenizedText, collate, forward_passes
from leti.generate import ADAPTER_CONFIG, load_policy, policy_input
from leti.io import read_jsonl, write_json
from leti.layout import parse_policy
from leti.model.device import set_cpu_threads
from leti.model.tokens import BAD, GOOD, RewardPrefix, padding_id
from leti.progress import StageProgress
from leti.records import (
    Estimate,
    GenerationProbe,
    GenerationProbeProblem,
    Probe,
    ProbeProblem,
    Problem,
)

log = logging.getLogger(__name__)


def solution_text(problem: Problem, prefix: RewardPrefix, tokenizer) -> TokenizedText | None:
    """The policy's input for `problem` followed by its reference solution, labelled on the solution's
    tokens only; None when the problem has no reference solution or it has no token of its own."""
    if not problem.reference_solution:
        return None
    head = policy_input(problem, prefix).text
    encoded = tokenizer(
        head + problem.reference_solution, add_special_tokens=False, return_offsets_mapping=True
    )
    input_ids = list(encoded["input_ids"])
    # A token that straddles the boundary (e.g. a prompt's closing quotes and newline) is the prompt's.
    labels = [
        token if start >= len(head) else IGNORE_INDEX
        for token, (start, _) in zip(input_ids, encoded["offset_mapping"], strict=True)
    ]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return TokenizedText(input_ids, labels)


@torch.no_grad()
def mean_log_likelihoods(
    model, texts: Sequence[TokenizedText], forward_tokens: int, pad_id: int, on_pass=None
) -> list[tuple[float, int]]:
    """(mean log-likelihood per labelled token, labelled tokens) of each text, in order.

    The output layer runs on the labelled positions only: over a 150k-token vocabulary the logits of
    every position would be most of the memory and a quarter of the compute."""
    order = sorted(range(len(texts)), key=lambda index: len(texts[index].input_ids), reverse=True)
    results: dict[int, tuple[float, int]] = {}
    position = 0
    for part in forward_passes([texts[index] for index in order], forward_tokens):
        batch = {key: value.to(model.device) for key, value in collate(part, pad_id).items()}
        hidden = model.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        # Position t predicts token t + 1.
        targets = batch["labels"][:, 1:]
        labelled = targets != IGNORE_INDEX
        logits = model.get_output_embeddings()(hidden[:, :-1][labelled]).float()
        log_likelihoods = -F.cross_entropy(logits, targets[labelled], reduction="none")
        rows = labelled.nonzero()[:, 0]
        sums = torch.zeros(len(part), dtype=torch.float64, device=rows.device).index_add_(
            0, rows, log_likelihoods.double()
        )
        counts = labelled.sum(dim=1)
        for row, (total, count) in enumerate(zip(sums.tolist(), counts.tolist(), strict=True)):
            results[order[position + row]] = (total / count, count)
        position += len(part)
        if on_pass is not None:
            on_pass(len(part))
    return [results[index] for index in range(len(texts))]


def embedding_rows(model, tokenizer) -> tuple[float, float]:
    """(distance between the <|good|> and <|bad|> input rows, median row norm of the vocabulary)."""
    weight = model.get_input_embeddings().weight.detach().float()
    good_id, bad_id = tokenizer.convert_tokens_to_ids([GOOD, BAD])
    distance = torch.linalg.vector_norm(weight[good_id] - weight[bad_id]).item()
    return distance, torch.linalg.vector_norm(weight, dim=1).median().item()


def probe_summary(problems: list[ProbeProblem]) -> tuple[dict[str, Estimate], float | None, str | None]:
    """Estimates of good, bad and good - bad over problems, and the paired test's p-value."""
    if not problems:
        return {}, None, None
    good = np.array([problem.good for problem in problems])
    bad = np.array([problem.bad for problem in problems])
    contrast = stats.compare([good], [bad])
    estimates = {
        "good": stats.estimate([good]),
        "bad": stats.estimate([bad]),
        "good_minus_bad": Estimate(
            value=contrast.difference, ci_low=contrast.ci_low, ci_high=contrast.ci_high
        ),
    }
    return estimates, contrast.p_value, contrast.test


def probe_texts(
    problems: Sequence[Problem], tokenizer, max_problems: int | None
) -> list[tuple[Problem, dict[RewardPrefix, TokenizedText]]]:
    """The problems the probe scores, in task-set order, with their texts after <|good|> and after
    <|bad|>: the first `max_problems` whose reference solution has tokens of its own after both."""
    selected = [
        (problem, {"good": good, "bad": bad})
        for problem in problems
        if (good := solution_text(problem, "good", tokenizer)) is not None
        and (bad := solution_text(problem, "bad", tokenizer)) is not None
    ][:max_problems]
    log.info("%d of %d problems have a reference solution to score", len(selected), len(problems))
    return selected


def score_solutions(
    model, tokenizer, problems: Sequence[Problem], settings: ProbeProblems, prefixes: Sequence[RewardPrefix]
) -> list[tuple[Problem, list[tuple[float, int]]]]:
    """Each probed problem with (mean log-likelihood per token, tokens) of its reference solution after
    each of `prefixes`, in that order."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    selected = probe_texts(problems, tokenizer, settings.max_problems)
    texts = [by_prefix[prefix] for _, by_prefix in selected for prefix in prefixes]
    progress = StageProgress(
        TextColumn("probe"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with progress:
        bar = progress.add_task("probe", total=len(texts))
        scores = mean_log_likelihoods(
            model,
            texts,
            settings.forward_tokens,
            padding_id(tokenizer),
            lambda done: progress.update(bar, advance=done),
        )
    width = len(prefixes)
    return [
        (problem, scores[index * width : (index + 1) * width]) for index, (problem, _) in enumerate(selected)
    ]


def task_set(problems: Sequence[Problem]) -> tuple[str, str]:
    """(dataset, split) of a task set; empty for an empty one."""
    return (problems[0].dataset, problems[0].split) if problems else ("", "")


def probe_policy(
    model_dir: str | os.PathLike[str],
    tasks: str | os.PathLike[str],
    output: str | os.PathLike[str],
    settings: ProbeSettings,
    policy: str,
    adapter_dir: str | os.PathLike[str] | None = None,
    threads: int = 1,
) -> Probe:
    """Score one policy on one task set, in `settings.dtype`, and write probe.json."""
    set_cpu_threads(threads)
    problems = read_jsonl(tasks, Problem)
    model, tokenizer = load_policy(
        Path(model_dir), Path(adapter_dir) if adapter_dir else None, settings.dtype, settings.device
    )
    scored = [
        ProbeProblem(task_id=problem.task_id, tokens=good_tokens, good=good, bad=bad)
        for problem, [(good, good_tokens), (bad, _)] in score_solutions(
            model, tokenizer, problems, settings, ("good", "bad")
        )
    ]
    estimates, p_value, test = probe_summary(scored)
    distance, row_norm = embedding_rows(model, tokenizer)
    dataset, split = task_set(problems)
    probe = Probe(
        dataset=dataset,
        split=split,
        policy=policy,
        policy_iteration=parse_policy(policy)[1],
        num_problems=len(scored),
        embedding_distance=distance,
        embedding_row_norm=row_norm,
        estimates=estimates,
        p_value=p_value,
        test=test,
        problems=scored,
    )
    write_json(output, probe)
    return probe


def generating_policy(model_dir: Path, adapter_dir: Path | None, settings: GenerationProbeSettings):
    """(model, tokenizer): the policy exactly as `leti generate` loads it. The one place here that turns
    generation's loading settings (dtype, device, the adapter merged or beside the weights) into a
    loaded policy."""
    return load_policy(model_dir, adapter_dir, settings.dtype, settings.device, settings.merge_adapter)


def adapter_merged(model, adapter_dir: Path | None) -> bool | None:
    """Whether the policy's LoRA adapter is merged into its weights; None when it has no adapter."""
    if adapter_dir is None or not (adapter_dir / ADAPTER_CONFIG).is_file():
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    return not any(isinstance(module, BaseTunerLayer) for module in model.modules())


def probe_as_generated(
    model_dir: str | os.PathLike[str],
    tasks: str | os.PathLike[str],
    output: str | os.PathLike[str],
    settings: GenerationProbeSettings,
    policy: str,
    adapter_dir: str | os.PathLike[str] | None = None,
    threads: int = 1,
) -> GenerationProbe:
    """Score the probe's reference solutions after <|good|> under the policy as generation loads it,
    and write the GenerationProbe. <|bad|> is left out: the shift against the base model needs <|good|> only."""
    set_cpu_threads(threads)
    problems = read_jsonl(tasks, Problem)
    adapter = Path(adapter_dir) if adapter_dir else None
    model, tokenizer = generating_policy(Path(model_dir), adapter, settings)
    scored = [
        GenerationProbeProblem(task_id=problem.task_id, tokens=tokens, good=good)
        for problem, [(good, tokens)] in score_solutions(model, tokenizer, problems, settings, ("good",))
    ]
    goods = np.array([problem.good for problem in scored])
    dataset, split = task_set(problems)
    probe = GenerationProbe(
        dataset=dataset,
        split=split,
        policy=policy,
        policy_iteration=parse_policy(policy)[1],
        dtype=str(model.dtype).removeprefix("torch."),
        adapter_merged=adapter_merged(model, adapter),
        num_problems=len(scored),
        estimates={"good": stats.estimate([goods])} if scored else {},
        problems=scored,
    )
    write_json(output, probe)
    return probe
