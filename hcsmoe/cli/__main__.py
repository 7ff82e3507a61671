"""`python -m hcsmoe.cli`: the same command line as `hcsmoe`."""

import sys

from hcsmoe.cli import main

sys.exit(main())
