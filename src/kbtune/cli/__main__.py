"""`python -m kbtune.cli`: the same command as `kbtune` (and `python -m kbtune`)."""

import sys

from kbtune.cli import main

sys.exit(main())
