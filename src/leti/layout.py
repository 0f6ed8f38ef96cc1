"""How policies are named in artifact paths.

Artifacts are keyed by the policy that produced them: `base` for the base model,
`{experiment}/iter{i}` for the LoRA adapter trained in iteration i of an arm, and then by
purpose: `rollouts` or `eval-{reward prefix}`.
So the base model's rollouts and evaluation live once under `results/base/`,
shared by every arm, and iteration i's training samples are the rollouts of
policy i-1.
"""

from __future__ import annotations

import re

from leti.model.tokens import RewardPrefix
from leti.records import Purpose

BASE_POLICY = "base"
POLICY_PATTERN = r"base|[A-Za-z0-9][A-Za-z0-9_-]*/iter[1-9][0-9]*"


def policy_name(experiment: str, iteration: int) -> str:
    return BASE_POLICY if iteration == 0 else f"{experiment}/iter{iteration}"


def parse_policy(policy: str) -> tuple[str | None, int]:
    """(experiment, iteration) of a policy name; the base model is (None, 0)."""
    if policy == BASE_POLICY:
        return None, 0
    match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_-]*)/iter([1-9][0-9]*)", policy)
    if match is None:
        raise ValueError(f"not a policy name: {policy!r}")
    return match.group(1), int(match.group(2))


# What a policy's samples are for, as the folder under the policy names it: `rollouts` (training
# samples, prefixed as LETI.md says) or `eval-{prefix}` (evaluation with one reward prefix).
PURPOSE_PATTERN = r"rollouts|eval-(?:good|bad|none)"


def eval_purpose(prefix: RewardPrefix) -> str:
    return f"eval-{prefix}"


def parse_purpose(purpose: str) -> tuple[Purpose, RewardPrefix | None]:
    """("rollouts", None) or ("eval", prefix)."""
    if purpose == "rollouts":
        return "rollouts", None
    match = re.fullmatch(r"eval-(good|bad|none)", purpose)
    if match is None:
        raise ValueError(f"not a purpose folder: {purpose!r}; expected rollouts or eval-{{good,bad,none}}")
    return "eval", match.group(1)  # type: ignore[return-value]


def parse_samples_folder(relative: str) -> tuple[str, str, str, str]:
    """(policy, purpose folder, dataset, split) of a samples folder under `results/`, laid out as
    `{policy}/{purpose}/{dataset}/{split}` (the generate rule's output)."""
    match = re.fullmatch(rf"({POLICY_PATTERN})/({PURPOSE_PATTERN})/([^/]+)/([^/]+)", relative)
    if match is None:
        raise ValueError(f"not laid out as {{policy}}/{{purpose}}/{{dataset}}/{{split}}: {relative!r}")
    policy, purpose, dataset, split = match.groups()
    return policy, purpose, dataset, split
