"""The tokens LETI adds to the base model's vocabulary: one definition for every stage.

A training text is `REWARD + FEEDBACK_START + feedback + FEEDBACK_END + prompt + program`
(LETI.md); at inference a trained policy is conditioned on `GOOD` before the prompt.
"""

from __future__ import annotations

from typing import Literal

GOOD = "<|good|>"
BAD = "<|bad|>"
FEEDBACK_START = "<|lang_feedback|>"
FEEDBACK_END = "<|/lang_feedback|>"

LETI_SPECIAL_TOKENS = (GOOD, BAD, FEEDBACK_START, FEEDBACK_END)

RewardPrefix = Literal["good", "bad", "none"]

_REWARD_TOKENS: dict[RewardPrefix, str] = {"good": GOOD, "bad": BAD, "none": ""}


def reward_token(prefix: RewardPrefix) -> str:
    """The text put before a prompt for a reward prefix; "none" is the empty string."""
    return _REWARD_TOKENS[prefix]
