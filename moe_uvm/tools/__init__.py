"""Tooling apart from the runtime: the decode benchmark harness and its sweep, and what each
`moe-uvm` subcommand does."""
