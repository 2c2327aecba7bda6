"""`python -m lbgm.cli` is the `lbgm` command (what `lbgm run` starts its children with)."""

import sys

from lbgm.cli.entry import main

sys.exit(main())
