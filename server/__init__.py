"""The aggregation server: worker registry, LBG mirrors, round orchestration,
aggregation, evaluation and metrics; `service` translates gRPC to these."""
