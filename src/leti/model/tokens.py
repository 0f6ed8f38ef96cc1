"""The tokens LETI adds to the base model's vocabulary: one definition for every stage.

A training text is `REWARD + FEEDBACK_START + feedback + FEEDBACK_END + prompt + program`
(LETI.md); at inference a trained policy is conditioned on `GOOD` before the prompt.
"""

from __future__ import annotations

from typing import Literal, Protocol

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


class _HasSpecialIds(Protocol):
    pad_token_id: int | None
    eos_token_id: int | None


def padding_id(tokenizer: _HasSpecialIds) -> int:
    """The id batches are padded with: the pad token, else end-of-sequence (Qwen has both), else 0.
    Padded positions are masked, so any id serves."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
