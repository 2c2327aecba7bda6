"""The worker: local training, the LBGM encoder, and the client loop that
dials out to the aggregator (one process may host many virtual workers)."""
