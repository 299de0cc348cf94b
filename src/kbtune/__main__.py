"""`python -m kbtune`: the same command as `kbtune`."""

import sys

from kbtune.cli import main

sys.exit(main())
