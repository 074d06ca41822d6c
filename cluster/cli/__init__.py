"""The `dsv4` command line: argument parsing, one module per family of subcommands
(`main.py` is the entry point). The work itself is done by the assembly, the gateway,
the benchmarks and the deployment tools."""
