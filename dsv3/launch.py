"""`python -m dsv3.launch ARGS` is `torchrun ARGS`, except for how a failed launch ends.

torchrun reports every failed worker itself -- an `E... failed (exitcode: 2)` log line, a
traceback of torchrun ending in `ChildFailedError`, a block per failed rank -- and exits with 1
whatever the workers' exit codes were. A dsv3 command's rank 0 has already said what went wrong
in one line, so here torchrun runs in this process with its own logging quieted, and a failed
launch exits with the workers' code: 2 when a dsv3 rank reported an error (nothing is added),
128 + N when a worker died from signal N and no rank reported anything (one line naming that
rank, which could not speak for itself), else the first failure's code (the rank's own
traceback, if any, has already been printed).
"""

from __future__ import annotations

import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # torchrun's modules each hold a logger with its own level: quiet them all, after they exist
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        if 2 in codes.values():
            return 2  # a dsv3 rank printed its one line
        rank, first = e.get_first_failure()
        if first.exitcode < 0:
            sig = -first.exitcode
            try:
                what = signal.Signals(sig).name
            except ValueError:
                what = f"signal {sig}"
            print(f"dsv3 launch: rank {rank} (pid {first.pid}) died from {what}", file=sys.stderr)
            return 128 + sig
        return first.exitcode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
