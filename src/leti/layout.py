"""How policies are named in artifact paths.

Artifacts are keyed by the policy that produced them: `base` for the base model,
`{experiment}/iter{i}` for the LoRA adapter trained in iteration i of an arm.
So the base model's rollouts and evaluation live once under `results/base/`,
shared by every arm, and iteration i's training samples are the rollouts of
policy i-1.
"""

from __future__ import annotations

import re

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
