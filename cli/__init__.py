"""Command-line entry points: `lbgm run | server | worker | status`."""
