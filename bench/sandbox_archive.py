"""The sandbox image's archive (execute.image_archive): size, time to save and time to load,
as a plain `docker save` tar and gzip-compressed at levels 1 and 6; then several jobs of one
node loading it at once, each on its own and through `ensure_image`'s lock.

The image in the engine is never removed: the loads time a copy of the sandbox image made
with `docker export` and `docker import`, the same files in one layer of its own, so each
load writes the whole image as on a node that has none of it.

    .venv/bin/python bench/sandbox_archive.py [--jobs N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
from docker.errors import ImageNotFound
from docker.models.images import Image

from leti.config import ExecuteConfig
from leti.records import SandboxImage
from leti.sandbox.image import ARCHIVE_COMPRESSLEVEL, build_image, ensure_image, save_image

REPO = Path(__file__).resolve().parents[1]


def flattened_copy(client: docker.DockerClient, record: SandboxImage, folder: Path) -> SandboxImage:
    """The sandbox image's files as a one-layer image of its own."""
    container = client.containers.create(record.image_id)
    rootfs = folder / "rootfs.tar"
    try:
        with rootfs.open("wb") as out:
            for chunk in container.export():
                out.write(chunk)
    finally:
        container.remove()
    tag = f"leti-sandbox-bench:{uuid.uuid4().hex[:12]}"
    repository, _, version = tag.partition(":")
    client.api.import_image_from_file(str(rootfs), repository=repository, tag=version)
    rootfs.unlink()
    return record.model_copy(update={"image": tag, "image_id": client.images.get(tag).id})


def write_archive(image: Image, tag: str, path: Path, level: int | None) -> None:
    with path.open("wb") if level is None else gzip.open(path, "wb", compresslevel=level) as out:
        for chunk in image.save(named=tag):
            out.write(chunk)


def load(client: docker.DockerClient, path: Path) -> None:
    with path.open("rb") as data:
        client.images.load(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6, help="jobs loading at once (default 6)")
    args = parser.parse_args()
    client = docker.from_env(timeout=600)
    sandbox = build_image(ExecuteConfig(), REPO / "envs" / "sandbox.Dockerfile", log=print)
    with tempfile.TemporaryDirectory(prefix="leti-bench-archive-") as work:
        folder = Path(work)
        copy = flattened_copy(client, sandbox, folder)
        try:
            # "our CPU": this process's, so the compression's; the engine's own work is not in it.
            print(f"{'archive':<10} {'MB':>6} {'save s':>7} {'our CPU s':>9} {'load s':>7}")
            for name, level in (("tar", None), ("gzip -1", 1), ("gzip -6", 6)):
                path = folder / f"{name.replace(' ', '')}.tar"
                started, cpu = time.monotonic(), time.process_time()
                write_archive(client.images.get(copy.image_id), copy.image, path, level)
                save_s, cpu = time.monotonic() - started, time.process_time() - cpu
                client.images.remove(copy.image_id)
                started = time.monotonic()
                load(client, path)
                load_s = time.monotonic() - started
                print(
                    f"{name:<10} {path.stat().st_size / 1e6:>6.0f} {save_s:>7.1f} {cpu:>9.1f} {load_s:>7.1f}"
                )

            archive = folder / "image.tar.gz"
            save_image(copy, archive, log=print)
            print(f"\n{args.jobs} jobs of one node starting at once (gzip -{ARCHIVE_COMPRESSLEVEL} archive):")
            jobs: dict[str, Callable[[], None]] = {
                "each loads": functools.partial(load, client, archive),
                "ensure_image": functools.partial(ensure_image, copy, archive, log=lambda line: None),
            }
            for name, job in jobs.items():
                client.images.remove(copy.image_id)
                started = time.monotonic()
                with ThreadPoolExecutor(args.jobs) as pool:
                    for future in [pool.submit(job) for _ in range(args.jobs)]:
                        future.result()
                print(f"  {name:<14} all ready after {time.monotonic() - started:.1f} s")
        finally:
            with contextlib.suppress(ImageNotFound):
                client.images.remove(copy.image_id)


if __name__ == "__main__":
    main()
