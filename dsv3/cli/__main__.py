"""`python -m dsv3.cli ARGS` is `dsv3 ARGS`."""

import sys

from dsv3.cli import main

sys.exit(main())
