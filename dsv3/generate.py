"""Entry point for `python -m dsv3.generate ...` (what `torchrun` launches): same as `dsv3 generate`.

The command lives in `dsv3.cli.generate`; import `dsv3.generate` the function, never this module.
"""

import sys

from dsv3.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
