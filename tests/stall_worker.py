"""Run under torchrun by tests/test_parallel.py: rank 1 stalls, rank 0 waits in the error exchange.

With DSV3_DIST_TIMEOUT set, rank 0 must give up after that many seconds (and torchrun then stops rank 1).
"""

import sys
import time

from dsv3.distributed import agree, maybe_init_distributed, rank_of
from dsv3.errors import Dsv3Error


def main() -> int:
    group = maybe_init_distributed()
    if rank_of(group) == 1:
        time.sleep(120)  # a rank stuck on a slow filesystem, say
        return 0
    try:
        agree(None, group)
    except Dsv3Error as e:
        print(f"rank 0: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
