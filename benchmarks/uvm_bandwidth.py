"""Memory-path ceilings on this GPU, in one run: HBM read, pinned H2D copy, managed read-through
(PreferredLocation=CPU + AccessedBy=GPU), promote and demote bandwidth, and advice cost.

    python benchmarks/uvm_bandwidth.py [--gib 1] [--out benchmarks/results/uvm_bandwidth.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

from moe_uvm import ceilings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="buffer size per measurement")
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "uvm_bandwidth.json")
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("uvm_bandwidth.py needs a CUDA GPU")
    nbytes = int(args.gib * 2**30)
    result = ceilings.device_summary()
    result["buffer_bytes"] = nbytes
    result["hbm_read_gbps"] = ceilings.hbm_read_gbps(2 * nbytes)
    result["h2d_pinned_gbps"] = ceilings.h2d_gbps(nbytes)
    result["read_through_gbps"] = ceilings.read_through_gbps(nbytes)
    result.update(ceilings.migration_gbps(nbytes))
    result.update(ceilings.advise_ms_per_10mb())
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("HBM read (Triton streaming read)", f"{result['hbm_read_gbps']:.0f} GB/s"),
        ("pinned host-to-device copy", f"{result['h2d_pinned_gbps']:.1f} GB/s"),
        (
            "managed read-through (PREFER_CPU + ACCESSED_BY)",
            f"{result['read_through_gbps']:.1f} GB/s",
        ),
        ("promote (advise GPU + prefetch)", f"{result['promote_gbps']:.1f} GB/s"),
        ("demote (advise CPU + prefetch)", f"{result['demote_gbps']:.1f} GB/s"),
        ("advise to GPU, host time", f"{result['advise_to_gpu_ms_per_10mb']:.3f} ms / 10 MB"),
        ("advise to CPU, host time", f"{result['advise_to_cpu_ms_per_10mb']:.3f} ms / 10 MB"),
    ]
    print(
        f"\n{result['device']}, torch {result['torch']}, {nbytes / 2**30:.1f} GiB buffers, medians"
    )
    print("| path | measured |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
