"""Benchmarks of the wire path (not timed tests): run each as `python -m bench.<name> --help`
from the repository root; each prints a markdown table and writes a JSON result file."""
