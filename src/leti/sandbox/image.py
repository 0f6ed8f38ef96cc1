"""Building the sandbox image: envs/sandbox.Dockerfile on top of a base with Python.

The base is the official Python image where a container registry is reachable. Where
none is, a Debian base is made with `debootstrap` and `docker import` (about a minute).
`execute.base_image` chooses: `registry`, `debootstrap`, or `auto`, which takes a base
already in the engine, else tries the registry, else uses debootstrap.

The image's tag is a hash of the Dockerfile, the dispatcher and the base image's id, so
building again is a no-op until one of them changes.

On a cluster whose nodes each have their own engine, the built image is also saved to an
archive (`save_image`), and an execute job on a node without it loads it (`ensure_image`).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import docker
from docker.errors import APIError, BuildError, DockerException, ImageNotFound
from docker.models.images import Image

from leti.config import ExecuteConfig
from leti.io import atomic_path
from leti.records import ExecutionStatus, SandboxImage
from leti.sandbox.base import DISPATCHER_PATH, SandboxError, dispatcher_sha256
from leti.sandbox.docker_pool import DockerPool, connect

BASE_REPOSITORY = "leti-sandbox-base"
BaseKind = Literal["registry", "debootstrap"]
Log = Callable[[str], None]
# Every node without the image reads the archive, often over a shared file system: gzip at level 1
# makes it 71 MB instead of `docker save`'s 167 MB for 2 s of CPU, once; level 6 saves 6 MB more for
# 6 s (bench/sandbox_archive.py). `docker load` reads gzip as it is.
ARCHIVE_COMPRESSLEVEL = 1


def build_image(settings: ExecuteConfig, dockerfile: Path, log: Log) -> SandboxImage:
    """Build the sandbox image unless it exists already; check that it runs a program."""
    client = connect()
    base, kind = resolve_base(client, settings, log)
    base_id = client.images.get(base).id
    digest = hashlib.sha256()
    for part in (dockerfile.read_bytes(), DISPATCHER_PATH.read_bytes(), base_id.encode()):
        digest.update(hashlib.sha256(part).digest())
    tag = f"{settings.image}:{digest.hexdigest()[:16]}"
    try:
        image = client.images.get(tag)
        log(f"{tag} is up to date")
        fresh = False
    except ImageNotFound:
        image = _docker_build(client, dockerfile, base, tag, log)
        fresh = True
    record = SandboxImage(
        image=tag, image_id=image.id, base_image=base, base_kind=kind, dispatcher_sha256=dispatcher_sha256()
    )
    if fresh:
        _smoke_test(settings, record)
        log(f"built {tag} on {base} ({kind}); it runs programs")
        _mention_older(client, settings.image, keep=image.id, log=log)
    return record


def _mention_older(client: docker.DockerClient, repository: str, keep: str, log: Log) -> None:
    """Name the earlier builds, and leave them: another checkout on this engine may still run one."""
    older = sorted(tag for old in client.images.list(name=repository) if old.id != keep for tag in old.tags)
    if older:
        log(
            f"{len(older)} other {repository} image(s) stay: {', '.join(older)}. Another checkout sharing "
            f"this Docker engine may use them; remove one with `docker rmi TAG` once no run needs it."
        )


def resolve_base(client: docker.DockerClient, settings: ExecuteConfig, log: Log) -> tuple[str, BaseKind]:
    """The base image to build on, made available in the engine."""
    official = settings.python_image
    debian = f"{BASE_REPOSITORY}:{settings.debootstrap_suite}"
    if settings.base_image == "registry":
        if not _exists(client, official):
            reason = _pull(client, official)
            if reason:
                raise SandboxError(
                    f"cannot pull {official}: {reason}. Without a reachable registry, set "
                    "execute.base_image: debootstrap (or auto)."
                )
        return official, "registry"
    if settings.base_image == "debootstrap":
        if not _exists(client, debian):
            _debootstrap(client, settings.debootstrap_suite, log)
        return debian, "debootstrap"
    if _exists(client, official):
        return official, "registry"
    if _exists(client, debian):
        return debian, "debootstrap"
    log(f"pulling {official}")
    reason = _pull(client, official)
    if not reason:
        return official, "registry"
    log(f"cannot pull {official} ({reason}); making a Debian base with debootstrap instead")
    _debootstrap(client, settings.debootstrap_suite, log)
    return debian, "debootstrap"


def _exists(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except ImageNotFound:
        return False
    return True


def _pull(client: docker.DockerClient, name: str) -> str:
    """Pull an image; the reason it failed, or "" on success."""
    try:
        client.images.pull(name)
    except (APIError, DockerException) as error:
        return str(error).strip()
    return ""


def _debootstrap(client: docker.DockerClient, suite: str, log: Log) -> None:
    if shutil.which("debootstrap") is None:
        raise SandboxError(
            "no base image with Python is available and `debootstrap` is not installed to make one: "
            "install it (`sudo apt-get install debootstrap`), or make a container registry reachable "
            "(execute.base_image: registry)."
        )
    if os.geteuid() != 0:
        raise SandboxError(
            "making the base image with debootstrap needs root: run the workflow's build_sandbox job "
            "once as root (`sudo make run` starts with it), or make a container registry reachable."
        )
    log(f"debootstrap: a minimal Debian {suite} with python3 (about a minute)")
    with tempfile.TemporaryDirectory(prefix="leti-debootstrap-") as work:
        root = Path(work) / "rootfs"
        # No mirror argument: debootstrap's own default.
        _run(["debootstrap", "--variant=minbase", "--include=python3", suite, str(root)], log)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (root / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tarball = Path(work) / "rootfs.tar"
        _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(tarball), "."], log)
        try:
            client.api.import_image(src=str(tarball), repository=BASE_REPOSITORY, tag=suite)
        except DockerException as error:
            raise SandboxError(f"docker import of the debootstrap base failed: {error}") from None
    log(f"imported {BASE_REPOSITORY}:{suite}")


def _run(command: list[str], log: Log) -> None:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    tail: list[str] = []
    for line in process.stdout:
        log(line.rstrip())
        tail = [*tail[-19:], line]
    if process.wait() != 0:
        raise SandboxError(f"`{' '.join(command)}` failed (exit {process.returncode}):\n{''.join(tail)}")


def _docker_build(client: docker.DockerClient, dockerfile: Path, base: str, tag: str, log: Log) -> Image:
    log(f"building {tag} from {dockerfile} on {base}")
    with tempfile.TemporaryDirectory(prefix="leti-sandbox-context-") as context:
        shutil.copyfile(dockerfile, Path(context) / "Dockerfile")
        shutil.copyfile(DISPATCHER_PATH, Path(context) / "dispatcher.py")
        try:
            image, output = client.images.build(
                path=context,
                tag=tag,
                buildargs={"BASE_IMAGE": base},
                pull=False,
                rm=True,
                forcerm=True,
                network_mode="none",
            )
        except BuildError as error:
            steps = "".join(chunk.get("stream", "") for chunk in error.build_log)
            raise SandboxError(f"building {tag} failed: {error.msg}\n{steps[-3000:]}") from None
        except DockerException as error:
            raise SandboxError(f"building {tag} failed: {error}") from None
    for chunk in output:
        if chunk.get("stream", "").strip():
            log(chunk["stream"].rstrip())
    return image


def _smoke_test(settings: ExecuteConfig, record: SandboxImage) -> None:
    checks = {
        "assert sum(range(4)) == 6": ExecutionStatus.passed,
        "assert sum(range(4)) == 7": ExecutionStatus.failed,
    }
    with DockerPool(settings, record, size=1) as pool:
        for program, expected in checks.items():
            result = pool.run(program)
            if result.status != expected:
                raise SandboxError(
                    f"the new image {record.image} ran `{program}` with status {result.status.value}, "
                    f"expected {expected.value}: {result.exception_type}: {result.exception_message}"
                )


def save_image(record: SandboxImage, archive: Path, log: Log) -> None:
    """Write the recorded image, with its tag, as a gzip-compressed `docker save` archive (atomically)."""
    client = connect()
    try:
        image = client.images.get(record.image_id)
    except ImageNotFound:
        raise SandboxError(
            f"cannot save {record.image}: its image {record.image_id} is not in the Docker engine"
        ) from None
    started = time.monotonic()
    try:
        with atomic_path(archive) as tmp, gzip.open(tmp, "wb", compresslevel=ARCHIVE_COMPRESSLEVEL) as out:
            for chunk in image.save(named=record.image):
                out.write(chunk)
    except DockerException as error:
        raise SandboxError(f"docker save of {record.image} to {archive} failed: {error}") from None
    log(
        f"saved {record.image} to {archive} ({archive.stat().st_size / 1e6:.0f} MB, {time.monotonic() - started:.1f} s)"
    )


def ensure_image(record: SandboxImage, archive: Path, log: Log) -> None:
    """Make the recorded image present in this node's engine, loading it from `archive` if missing."""
    client = connect()
    if _exists(client, record.image_id):
        return
    # Jobs starting together on one node would each load the archive: six at once were all ready
    # after 21 s, against 8 s when the first loads and the others find the image once they get the lock.
    with _node_lock(f"leti-sandbox-load-{record.image_id.removeprefix('sha256:')[:16]}"):
        if _exists(client, record.image_id):
            return
        started = time.monotonic()
        loaded = _load(client, archive)
    if record.image_id not in loaded:
        raise SandboxError(
            f"{archive} holds the image {', '.join(loaded) or 'none'}, not {record.image_id} that the image "
            f"record names ({record.image}): the archive is from another build; rerun build_sandbox"
        )
    log(f"loaded {record.image} from {archive} ({time.monotonic() - started:.1f} s)")


def _load(client: docker.DockerClient, archive: Path) -> list[str]:
    """`docker load` of an archive; the ids of the images it held."""
    try:
        with archive.open("rb") as data:
            return [image.id for image in client.images.load(data)]
    except FileNotFoundError:
        raise SandboxError(f"{archive}: no such sandbox image archive") from None
    except DockerException as error:
        raise SandboxError(f"docker load of {archive} failed: {error}") from None


@contextlib.contextmanager
def _node_lock(name: str) -> Iterator[None]:
    """An exclusive lock among the processes of this machine (its engine is this machine's too)."""
    path = Path(tempfile.gettempdir()) / f"{name}.lock"
    # Read-only, so that a lock file another user created can be locked too.
    descriptor = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
