"""Running experiments: the CLI and its Trainer, sweeps, benchmarks of operating points, reports, the demo."""
