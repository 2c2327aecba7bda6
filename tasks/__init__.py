"""The jobs lbgm ships, written with the task API (lbgm.task) like any user's task: image
classification (`lbgm.tasks.image:classification`) over the model zoo (models.py), the data sets
(datasets.py, embedded/) and the partitions of a training set among workers (partition.py)."""
