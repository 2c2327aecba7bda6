"""In-process simulation of a federation with exactly the gRPC system's math."""
