"""`python -m moe_uvm`: the `moe-uvm` command."""

import sys

from moe_uvm.cli import main

sys.exit(main())
