"""Sweeps: a grid of experiment settings (grid), each point run as a real local federation in a
folder named after it, skipped when already finished and resumed when interrupted (runner).
`lbgm sweep` is the entry point."""
