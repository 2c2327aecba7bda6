"""The jobs lbgm ships, written with the task API (lbgm.task) like any user's task: image
classification (`lbgm.tasks.image:classification`) over the model zoo (models.py), the data sets
(datasets.py, embedded/) and the partitions of a training set among workers (partition.py)."""

# Plain names, here without torch: the experiment config and the CLI check them in processes that
# never load torch (the `lbgm run` launcher).
BUILTIN_TASK = "lbgm.tasks.image:classification"
INITS = ("default", "reference")  # the running torch's own initialisation, or torch 1.4's as the reference ran it
