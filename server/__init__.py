"""The aggregation server: worker registry, LBG mirrors, round orchestration,
aggregation, evaluation and metrics; `service` translates gRPC to these."""

# Where the server keeps the look-back gradients (server/mirrors.py), named here without torch: `lbgm run`'s
# launcher process offers them as --mirrors choices without loading it.
MIRROR_STORES = ("memory", "disk")
