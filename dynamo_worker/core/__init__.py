"""The core every role process runs: config, plugin manager, runtime, lifecycle, metrics."""
