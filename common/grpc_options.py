"""gRPC channel and server options, set explicitly on both sides.

Messages never exceed one ~1 MiB chunk plus a small header, so the limits
are set a little above that instead of relying on defaults; a peer that sends
a bigger message gets RESOURCE_EXHAUSTED before anything is parsed.
"""

CHUNK_BYTES = 1 << 20  # the size tensors are cut into on the wire (lbgm.common.codec)
MAX_MESSAGE_BYTES = 4 * CHUNK_BYTES

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# A worker's channel: GetTask's server stream is read on the calling thread alone (grpcio's
# experimental grpc.experimental.ChannelOptions.SingleThreadedUnaryStream). By default grpcio serves
# a stream with a polling thread per channel and the reader waits on a condition in 0.1 s slices;
# a process hosting thousands of virtual workers, each idle in a long poll on its own channel, then
# spends its cores waking those threads (bench.thousands, K = 5,000 in 2 processes).
WORKER_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("SingleThreadedUnaryStream", 1)]

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]

ERROR_DETAIL_KEY = "lbgm-error-bin"  # trailing metadata holding a serialized ErrorDetail
# What JoinRequest.protocol must say. lbgm.v1.1: joins carry the worker's model description
# (GetExperiment first) and RoundTasks may ask for evaluations, which lbgm.v1 workers would ignore.
PROTOCOL = "lbgm.v1.1"

# Call metadata carrying credentials, so the server checks them before it reads a request message
# (documented next to the methods in lbgm.proto).
WORKER_ID_KEY = "lbgm-worker-id"  # GetTask, SubmitUpdate: the worker id from JoinReply, in decimal
WORKER_TOKEN_KEY = "lbgm-token-bin"  # GetTask, SubmitUpdate: the session token from JoinReply
JOIN_TOKEN_KEY = "lbgm-join-token-bin"  # Join: the enrollment secret the operator gave the workers
OPERATOR_TOKEN_KEY = "lbgm-operator-token-bin"  # GetStatus with include_state_digest: the operator's secret


def worker_metadata(worker_id: int, token: bytes) -> tuple[tuple[str, str | bytes], ...]:
    """The metadata a worker sends with GetTask and SubmitUpdate."""
    return (WORKER_ID_KEY, str(worker_id)), (WORKER_TOKEN_KEY, token)
