"""Adapters from other libraries to moe-uvm."""
