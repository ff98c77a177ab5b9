"""The subcommands of benchmarks/triton_dev.py, one module per family (see that script's help)."""
