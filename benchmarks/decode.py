"""End-to-end decode benchmark over resident counts, against the other ways to offload.
The same as `moe-uvm bench` (see moe_uvm/tools/bench.py for the methods); arguments pass through.

    python benchmarks/decode.py [--trace TRACE.npz] [--resident 0%,25%,50%,75%,100%] [--batch 1,16]
"""

import sys

from moe_uvm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
