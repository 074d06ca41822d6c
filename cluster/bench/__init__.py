"""The benchmarks behind `dsv4 bench` (each reports ratios against a baseline run alongside)."""


class BenchError(ValueError):
    """A benchmark asked for with impossible options; the CLI prints it and exits with 2."""
