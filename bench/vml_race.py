"""How often a fresh process's first two-thread VML call comes out wrong, with and without the warm-up.

oneMKL resolves each vector-math function's kernel on its first call; when two intra-op threads
make that call at once, one can run a low-accuracy kernel (pytorch/pytorch#188792).
`leti.model.device.set_cpu_threads` makes a one-element call of each op first. This script starts
fresh processes one after the other; each sets two threads (plainly, or through `set_cpu_threads`)
and makes its first call of one op (cos, sin, exp, log, in turn) on the rotary embedding's angles
for 12 x 300 positions, split between the threads, then compares it with the op in float64. A call
is corrupted when some element is off by more than 1e-5 (relative where the value exceeds 1), a
hundred times float32's rounding.

    .venv/bin/python bench/vml_race.py [--processes N] [--threads T]

The race needs two cores free: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter

OPS = ("cos", "sin", "exp", "log")

CHILD = """
import sys, torch
from leti.model.device import set_cpu_threads
op, warm, threads = sys.argv[1], sys.argv[2] == "warm", int(sys.argv[3])
set_cpu_threads(threads) if warm else torch.set_num_threads(threads)
# The angles of Qwen2's rotary embedding for 12 rows of 300 positions, built as it builds them.
positions = torch.arange(300)[None].expand(12, 300)[..., None].float()
angles = torch.cat((positions * torch.tensor([1.0, 0.1, 0.01, 0.001]),) * 2, dim=-1)
x = {"exp": angles / 10, "log": angles + 0.01}.get(op, angles)
first = getattr(torch, op)(x).double()
exact = getattr(torch, op)(x.double())
error = ((first - exact).abs() / exact.abs().clamp_min(1.0)).max().item()
print("corrupted" if error > 1e-5 else "accurate")
"""


def first_call(op: str, warm: bool, threads: int) -> str:
    mode = "warm" if warm else "plain"
    result = subprocess.run(
        [sys.executable, "-c", CHILD, op, mode, str(threads)], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=200, help="per mode, spread over the ops")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for warm in (False, True):
        outcomes: Counter[str] = Counter()
        for index in range(args.processes):
            op = OPS[index % len(OPS)]
            if first_call(op, warm, args.threads) == "corrupted":
                outcomes[op] += 1
        mode = "set_cpu_threads (warm-up)" if warm else "torch.set_num_threads"
        detail = ", ".join(f"{op} {outcomes[op]}" for op in OPS)
        print(f"{mode}: {sum(outcomes.values())} of {args.processes} first calls corrupted ({detail})")


if __name__ == "__main__":
    main()
