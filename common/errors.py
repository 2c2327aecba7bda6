"""Errors that mean bad input (a task that does not load, a data set that is missing), in a module
without torch: the CLI turns them into one line and exit status 2, and `lbgm run`'s launcher process,
which never loads torch, must be able to catch them too."""


class TaskError(ValueError):
    """A task reference that does not resolve to a usable Task, or a task whose code fails."""


class DatasetError(RuntimeError):
    """A data set is missing or its files are malformed."""
