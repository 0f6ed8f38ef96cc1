"""The dispatcher's verdicts, in a process of their own: a failure to set up the program's process is
ours (sandbox_error); once the program's own code has started, a broken result channel is the
program's (failed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

DISPATCHER = REPO / "src" / "leti" / "sandbox" / "dispatcher.py"

# Runs one program through run_program; with "refuse-rlimits" the child's setrlimit fails, as a
# sandbox that cannot set up a process would. Its stdin stays open: closed, it means the host is gone.
RUNNER = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import dispatcher
scratch, mode, program = sys.argv[2], sys.argv[3], sys.argv[4]
if mode == "refuse-rlimits":
    def refuse(*args):
        raise OSError("simulated: no rlimits here")
    resource.setrlimit = refuse
limits = dispatcher.Limits(timeout_s=5, memory_bytes=1 << 30, file_bytes=1 << 20, processes=64,
                           open_files=64, output_bytes=1 << 20, tail_bytes=1024, scratch=scratch, wipe=[])
print(json.dumps(dispatcher.run_program(program, limits)))
"""


def verdict(tmp_path: Path, program: str, mode: str = "plain") -> dict:
    command = [sys.executable, "-c", RUNNER, str(DISPATCHER.parent), str(tmp_path / "run"), mode, program]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as process:
        # Read before stdin closes: the dispatcher takes end of input as "the host has gone".
        output = process.stdout.read()
        process.stdin.close()
        process.wait(timeout=60)
    assert process.returncode == 0, output
    return json.loads(output.splitlines()[-1])


def test_a_process_that_cannot_be_set_up_is_a_sandbox_error(tmp_path: Path) -> None:
    result = verdict(tmp_path, "assert 1 == 1\n", "refuse-rlimits")
    assert (result["status"], result["exception_type"]) == ("sandbox_error", "SandboxError")


def test_once_the_program_runs_a_closed_channel_is_its_own_failure(tmp_path: Path) -> None:
    assert verdict(tmp_path, "assert 1 == 1\n")["status"] == "passed"
    for program in ("import os\nos.close(3)\n", "import os\nos.closerange(3, 64)\nassert 1 == 2\n"):
        result = verdict(tmp_path, program)
        assert (result["status"], result["exception_type"]) == ("failed", "HarnessChannelClosed"), program
