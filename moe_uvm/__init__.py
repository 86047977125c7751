"""moe-uvm: MoE expert weights in CUDA managed memory; residency is advice, compute on the GPU."""

__version__ = "0.1.0"
