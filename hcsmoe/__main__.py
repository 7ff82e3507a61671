"""`python -m hcsmoe` is the `hcsmoe` command."""

import sys

from hcsmoe.cli import main

sys.exit(main())
