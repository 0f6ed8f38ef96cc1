"""Running untrusted programs: a dispatcher inside each sandbox, pools of sandboxes
(`docker` containers or `local` bubblewrap), and LETI feedback text from the outcome."""

from __future__ import annotations

import logging
from pathlib import Path

from leti.config import ExecuteConfig
from leti.records import SandboxImage
from leti.sandbox.base import Program, RunResult, SandboxError, SandboxPool, run_programs

__all__ = ["Program", "RunResult", "SandboxError", "SandboxPool", "open_pool", "run_programs"]


def open_pool(
    settings: ExecuteConfig, size: int, image: SandboxImage | None = None, archive: Path | None = None
) -> SandboxPool:
    """A started pool of `size` sandboxes of the configured backend; close it (or use `with`).
    The docker backend loads the image from `archive` (`leti sandbox build --archive`) where this
    node's engine lacks it."""
    if settings.backend == "docker":
        if image is None:
            raise SandboxError(
                "the docker backend needs the image record that `leti sandbox build` writes "
                "(resources/sandbox/image.json); pass it with --sandbox"
            )
        from leti.sandbox.docker_pool import DockerPool
        from leti.sandbox.image import ensure_image

        if archive is not None:
            ensure_image(image, archive, log=logging.getLogger(__name__).info)
        return DockerPool(settings, image, size).open()
    from leti.sandbox.local import LocalPool

    return LocalPool(settings, size).open()
