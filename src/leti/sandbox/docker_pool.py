"""The `docker` backend: a warm pool of long-lived, hardened containers, each running the
dispatcher as its PID 1 and talking to us over the container's attached stdin/stdout.

Containers are labelled with their owner process. Every way our process can end removes
them: `close()` on normal exit, Ctrl-C and SIGTERM (see `base`); after a crash or SIGKILL
the attach connection drops, the daemon closes the container's stdin (StdinOnce), the
dispatcher exits and `auto_remove` deletes the container. Leftovers of dead owners that
survive even that are reaped when the next pool starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from typing import Any

import docker
import psutil
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from leti.config import ExecuteConfig
from leti.records import SandboxImage
from leti.sandbox.base import (
    Channel,
    Sandbox,
    SandboxError,
    SandboxPool,
    dispatcher_limits,
    dispatcher_sha256,
)

log = logging.getLogger(__name__)

LABEL = "org.leti.sandbox"
OWNER_LABEL = "org.leti.sandbox.owner"
SCRATCH = "/tmp/run"
STDOUT_STREAM = 1


class DockerUnavailableError(SandboxError):
    """The Docker engine is not installed, not running, or not ours to use."""


def connect() -> docker.DockerClient:
    """A client for the local Docker engine, or an error that says how to get one."""
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except DockerException as error:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise DockerUnavailableError(
            f"cannot reach the Docker engine at {where} ({error}). Start it (`sudo systemctl start docker`, "
            "or `sudo dockerd &`); install it if missing (`sudo apt-get install docker.io`; "
            "`make docker-engine` does both as root); make sure you may use its socket (the `docker` group). "
            "Or set execute.backend: local to use bubblewrap instead."
        ) from None
    return client


def owner_label() -> str:
    """This process, as `host:pid:start time`: a pid alone may be reused after we die."""
    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.2f}"


def _owner_alive(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname():
        # Another machine shares this engine: its processes are not ours to judge.
        return True
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except (psutil.NoSuchProcess, ValueError):
        return False


def reap_leftovers(client: docker.DockerClient) -> int:
    """Remove sandbox containers whose owner process is gone; returns how many."""
    reaped = 0
    for container in client.containers.list(all=True, filters={"label": LABEL}, ignore_removed=True):
        if not _owner_alive(container.labels.get(OWNER_LABEL, "")):
            _remove(client, container.id)
            reaped += 1
    return reaped


def _remove(client: docker.DockerClient, container_id: str) -> None:
    try:
        client.api.remove_container(container_id, force=True)
    except NotFound:
        pass
    except DockerException as error:
        # 409: auto_remove got there first and is still at it; wait, so that a closed pool
        # really has no container left. Anything else leaves a leftover, which the next pool
        # reaps; stopping must not fail the run that is ending.
        if isinstance(error, APIError) and error.status_code == 409:
            _wait_until_removed(client, container_id)
        else:
            log.warning("could not remove sandbox container %s: %s", container_id[:12], error)


def _wait_until_removed(client: docker.DockerClient, container_id: str, timeout_s: float = 30.0) -> None:
    try:
        client.api.wait(container_id, timeout=timeout_s, condition="removed")
    except NotFound:
        pass  # already gone
    except (DockerException, requests.exceptions.RequestException) as error:
        log.warning("sandbox container %s is still being removed: %s", container_id[:12], error)


class AttachChannel(Channel):
    """The container's attached stdin and stdout. Without a TTY the daemon multiplexes
    stdout and stderr into frames, each an 8-byte header (stream, size) and its payload."""

    def __init__(self, sock: Any) -> None:
        super().__init__()
        # docker-py wraps a UNIX socket in a SocketIO; the raw socket does timeouts and sendall.
        self._socket: socket.socket = getattr(sock, "_sock", sock)
        self._frames = bytearray()
        self._stderr = bytearray()

    def _write(self, data: bytes) -> None:
        self._socket.sendall(data)

    def _read(self, timeout: float) -> bytes | None:
        self._socket.settimeout(timeout)
        try:
            return self._socket.recv(1 << 16)
        except TimeoutError:
            return None

    def _feed(self, chunk: bytes) -> None:
        self._frames += chunk
        while len(self._frames) >= 8:
            stream, size = struct.unpack(">BxxxL", self._frames[:8])
            if len(self._frames) < 8 + size:
                return
            payload = bytes(self._frames[8 : 8 + size])
            del self._frames[: 8 + size]
            if stream == STDOUT_STREAM:
                self._lines += payload
            else:
                self._stderr = (self._stderr + payload)[-4000:]

    def _diagnostics(self) -> str:
        return f"; its stderr: {self._stderr.decode(errors='replace')}" if self._stderr else ""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()


class Container(Sandbox):
    def __init__(self, client: docker.DockerClient, container_id: str, channel: AttachChannel) -> None:
        super().__init__(channel)
        self.client = client
        self.container_id = container_id
        self._stopped = threading.Event()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.channel.close()
        _remove(self.client, self.container_id)


class DockerPool(SandboxPool):
    """Hardened containers: no network, capped memory and pids, read-only root with a small
    tmpfs, no capabilities, no-new-privileges, a non-root user; rlimits per program."""

    def __init__(self, settings: ExecuteConfig, image: SandboxImage, size: int) -> None:
        super().__init__(settings, size)
        if image.dispatcher_sha256 != dispatcher_sha256():
            raise SandboxError(
                f"the sandbox image {image.image} holds another version of dispatcher.py; "
                "rebuild it: rerun the workflow (its build_sandbox job), or `leti sandbox build --output FILE`"
            )
        self.image = image
        self.client = connect()
        try:
            self.client.images.get(image.image_id)
        except ImageNotFound:
            raise SandboxError(
                f"the sandbox image {image.image} is not in the Docker engine of {socket.gethostname()}; "
                "build it with the workflow (its build_sandbox job), or `leti sandbox build --output FILE`. "
                "On a cluster whose nodes have Docker engines of their own, set execute.image_archive: true"
            ) from None
        self.owner = owner_label()
        reap_leftovers(self.client)

    def _spawn(self, index: int) -> Container:
        settings = self.settings
        api = self.client.api
        # One uid per slot: RLIMIT_NPROC counts a uid's processes across the whole host, so
        # a fork bomb in one container must not starve the others.
        uid = settings.sandbox_uid + index
        memory = f"{settings.memory_mb + settings.scratch_mb + 128}m"
        host_config = api.create_host_config(
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,noexec,size={settings.scratch_mb}m,mode=1777"},
            shm_size="16m",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            mem_limit=memory,
            memswap_limit=memory,
            pids_limit=settings.max_processes + 16,
            auto_remove=True,
        )
        try:
            created = api.create_container(
                self.image.image_id,
                command=[dispatcher_limits(settings, SCRATCH, ["/tmp", "/dev/shm", "/dev/mqueue"])],
                user=f"{uid}:{uid}",
                working_dir="/tmp",
                stdin_open=True,
                network_disabled=True,
                labels={LABEL: "1", OWNER_LABEL: self.owner},
                host_config=host_config,
            )
        except DockerException as error:
            raise SandboxError(
                f"cannot create a sandbox container from {self.image.image}: {error}"
            ) from None
        container_id = created["Id"]
        try:
            # Attach before start, so not a byte of the dispatcher's output is missed.
            sock = api.attach_socket(container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            container = Container(self.client, container_id, AttachChannel(sock))
            api.start(container_id)
        except DockerException as error:
            _remove(self.client, container_id)
            raise SandboxError(f"cannot start a sandbox container from {self.image.image}: {error}") from None
        return container
