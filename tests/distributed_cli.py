"""`python -m hf_alphaedit` for torchrun tests, with an optional crash of one rank.

    torchrun --nproc_per_node 2 tests/distributed_cli.py [--kill_rank R] stats --config ...

On rank R the first statistics batch kills the process with SIGKILL (a crashed or OOM-killed worker); the other
ranks run the real command unchanged.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_alphaedit import statistics  # noqa: E402
from hf_alphaedit.cli import main  # noqa: E402


def _die(*_args: object, **_kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill_rank", type=int, default=None)
    options, command = parser.parse_known_args()
    if options.kill_rank is not None and int(os.environ["RANK"]) == options.kill_rank:
        statistics.right_pad = _die  # the first statistics batch
    sys.exit(main(command))
