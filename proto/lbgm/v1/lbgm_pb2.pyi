from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DENSE: _ClassVar[Codec]
    TOPK: _ClassVar[Codec]
    SIGN: _ClassVar[Codec]
    QSGD: _ClassVar[Codec]
    LOWRANK: _ClassVar[Codec]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
INT64: DType
INT32: DType
INT16: DType
INT8: DType
UINT8: DType
BOOL: DType
DENSE: Codec
TOPK: Codec
SIGN: Codec
QSGD: Codec
LOWRANK: Codec

class TensorMeta(_message.Message):
    __slots__ = ("dtype", "shape", "nbytes")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("worker_name", "protocol", "model_tensors")
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    MODEL_TENSORS_FIELD_NUMBER: _ClassVar[int]
    worker_name: str
    protocol: str
    model_tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, worker_name: _Optional[str] = ..., protocol: _Optional[str] = ..., model_tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class ExperimentRequest(_message.Message):
    __slots__ = ("worker_name", "protocol")
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    worker_name: str
    protocol: str
    def __init__(self, worker_name: _Optional[str] = ..., protocol: _Optional[str] = ...) -> None: ...

class ExperimentSpec(_message.Message):
    __slots__ = ("dataset", "model", "partition", "classes_per_worker", "dirichlet_alpha", "num_shards", "seed", "granularity", "model_fingerprint", "task", "model_tensors", "eval_batch_size")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    CLASSES_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    DIRICHLET_ALPHA_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_TENSORS_FIELD_NUMBER: _ClassVar[int]
    EVAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    model: str
    partition: str
    classes_per_worker: int
    dirichlet_alpha: float
    num_shards: int
    seed: int
    granularity: str
    model_fingerprint: str
    task: str
    model_tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    eval_batch_size: int
    def __init__(self, dataset: _Optional[str] = ..., model: _Optional[str] = ..., partition: _Optional[str] = ..., classes_per_worker: _Optional[int] = ..., dirichlet_alpha: _Optional[float] = ..., num_shards: _Optional[int] = ..., seed: _Optional[int] = ..., granularity: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., task: _Optional[str] = ..., model_tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., eval_batch_size: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype", "buffer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    buffer: bool
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., buffer: _Optional[bool] = ...) -> None: ...

class UnitVersion(_message.Message):
    __slots__ = ("unit", "version")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    unit: int
    version: int
    def __init__(self, unit: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("worker_id", "token", "shard_index", "experiment", "lbg_versions", "last_accepted_round")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    LBG_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_ACCEPTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    token: bytes
    shard_index: int
    experiment: ExperimentSpec
    lbg_versions: _containers.RepeatedCompositeFieldContainer[UnitVersion]
    last_accepted_round: int
    def __init__(self, worker_id: _Optional[int] = ..., token: _Optional[bytes] = ..., shard_index: _Optional[int] = ..., experiment: _Optional[_Union[ExperimentSpec, _Mapping]] = ..., lbg_versions: _Optional[_Iterable[_Union[UnitVersion, _Mapping]]] = ..., last_accepted_round: _Optional[int] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("worker_id", "token", "max_wait_seconds", "model_version", "model_digest", "downlink_versions")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    token: bytes
    max_wait_seconds: float
    model_version: int
    model_digest: bytes
    downlink_versions: _containers.RepeatedCompositeFieldContainer[UnitVersion]
    def __init__(self, worker_id: _Optional[int] = ..., token: _Optional[bytes] = ..., max_wait_seconds: _Optional[float] = ..., model_version: _Optional[int] = ..., model_digest: _Optional[bytes] = ..., downlink_versions: _Optional[_Iterable[_Union[UnitVersion, _Mapping]]] = ...) -> None: ...

class TrainSettings(_message.Message):
    __slots__ = ("local_steps", "batch_size", "local_lr", "delta", "wire_dtype", "error_feedback", "codec", "topk_fraction", "quantization_levels", "lowrank_rank", "compressor_memory")
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LR_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TOPK_FRACTION_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_LEVELS_FIELD_NUMBER: _ClassVar[int]
    LOWRANK_RANK_FIELD_NUMBER: _ClassVar[int]
    COMPRESSOR_MEMORY_FIELD_NUMBER: _ClassVar[int]
    local_steps: int
    batch_size: int
    local_lr: float
    delta: float
    wire_dtype: DType
    error_feedback: bool
    codec: Codec
    topk_fraction: float
    quantization_levels: int
    lowrank_rank: int
    compressor_memory: bool
    def __init__(self, local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., local_lr: _Optional[float] = ..., delta: _Optional[float] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., error_feedback: _Optional[bool] = ..., codec: _Optional[_Union[Codec, str]] = ..., topk_fraction: _Optional[float] = ..., quantization_levels: _Optional[int] = ..., lowrank_rank: _Optional[int] = ..., compressor_memory: _Optional[bool] = ...) -> None: ...

class RoundTask(_message.Message):
    __slots__ = ("round", "total_rounds", "settings", "num_tensors", "seconds_to_deadline", "checkpointed_round", "evaluate", "evaluate_only", "model_version", "model_digest", "model_updates", "base_version", "drop_lookbacks")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_TO_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_UPDATES_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DROP_LOOKBACKS_FIELD_NUMBER: _ClassVar[int]
    round: int
    total_rounds: int
    settings: TrainSettings
    num_tensors: int
    seconds_to_deadline: float
    checkpointed_round: int
    evaluate: bool
    evaluate_only: bool
    model_version: int
    model_digest: bytes
    model_updates: bool
    base_version: int
    drop_lookbacks: bool
    def __init__(self, round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., settings: _Optional[_Union[TrainSettings, _Mapping]] = ..., num_tensors: _Optional[int] = ..., seconds_to_deadline: _Optional[float] = ..., checkpointed_round: _Optional[int] = ..., evaluate: _Optional[bool] = ..., evaluate_only: _Optional[bool] = ..., model_version: _Optional[int] = ..., model_digest: _Optional[bytes] = ..., model_updates: _Optional[bool] = ..., base_version: _Optional[int] = ..., drop_lookbacks: _Optional[bool] = ...) -> None: ...

class DownlinkLookback(_message.Message):
    __slots__ = ("round", "layer", "version", "meta", "data")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    round: int
    layer: int
    version: int
    meta: TensorMeta
    data: bytes
    def __init__(self, round: _Optional[int] = ..., layer: _Optional[int] = ..., version: _Optional[int] = ..., meta: _Optional[_Union[TensorMeta, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DownlinkScalars(_message.Message):
    __slots__ = ("layers", "rhos", "lbg_versions", "round")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    RHOS_FIELD_NUMBER: _ClassVar[int]
    LBG_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    rhos: _containers.RepeatedScalarFieldContainer[float]
    lbg_versions: _containers.RepeatedScalarFieldContainer[int]
    round: int
    def __init__(self, layers: _Optional[_Iterable[int]] = ..., rhos: _Optional[_Iterable[float]] = ..., lbg_versions: _Optional[_Iterable[int]] = ..., round: _Optional[int] = ...) -> None: ...

class ModelTensor(_message.Message):
    __slots__ = ("index", "meta", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    meta: TensorMeta
    data: bytes
    def __init__(self, index: _Optional[int] = ..., meta: _Optional[_Union[TensorMeta, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Idle(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TaskPart(_message.Message):
    __slots__ = ("task", "tensor", "chunk", "idle", "finished", "downlink_lookback", "downlink_scalars")
    TASK_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_LOOKBACK_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_SCALARS_FIELD_NUMBER: _ClassVar[int]
    task: RoundTask
    tensor: ModelTensor
    chunk: TensorChunk
    idle: Idle
    finished: Finished
    downlink_lookback: DownlinkLookback
    downlink_scalars: DownlinkScalars
    def __init__(self, task: _Optional[_Union[RoundTask, _Mapping]] = ..., tensor: _Optional[_Union[ModelTensor, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., idle: _Optional[_Union[Idle, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ..., downlink_lookback: _Optional[_Union[DownlinkLookback, _Mapping]] = ..., downlink_scalars: _Optional[_Union[DownlinkScalars, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("worker_id", "token", "round", "num_samples", "train_loss")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    token: bytes
    round: int
    num_samples: int
    train_loss: float
    def __init__(self, worker_id: _Optional[int] = ..., token: _Optional[bytes] = ..., round: _Optional[int] = ..., num_samples: _Optional[int] = ..., train_loss: _Optional[float] = ...) -> None: ...

class FullGradient(_message.Message):
    __slots__ = ("layer", "lbg_version", "codec", "parts", "data")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    LBG_VERSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    layer: int
    lbg_version: int
    codec: Codec
    parts: _containers.RepeatedCompositeFieldContainer[TensorMeta]
    data: bytes
    def __init__(self, layer: _Optional[int] = ..., lbg_version: _Optional[int] = ..., codec: _Optional[_Union[Codec, str]] = ..., parts: _Optional[_Iterable[_Union[TensorMeta, _Mapping]]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ScalarUpdate(_message.Message):
    __slots__ = ("units", "rhos", "lbg_versions")
    UNITS_FIELD_NUMBER: _ClassVar[int]
    RHOS_FIELD_NUMBER: _ClassVar[int]
    LBG_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    units: _containers.RepeatedScalarFieldContainer[int]
    rhos: _containers.RepeatedScalarFieldContainer[float]
    lbg_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, units: _Optional[_Iterable[int]] = ..., rhos: _Optional[_Iterable[float]] = ..., lbg_versions: _Optional[_Iterable[int]] = ...) -> None: ...

class UpdatePart(_message.Message):
    __slots__ = ("header", "full", "chunk", "scalars", "buffer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    full: FullGradient
    chunk: TensorChunk
    scalars: ScalarUpdate
    buffer: ModelTensor
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., full: _Optional[_Union[FullGradient, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., scalars: _Optional[_Union[ScalarUpdate, _Mapping]] = ..., buffer: _Optional[_Union[ModelTensor, _Mapping]] = ...) -> None: ...

class UpdateAck(_message.Message):
    __slots__ = ("round", "full_units", "scalar_units")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FULL_UNITS_FIELD_NUMBER: _ClassVar[int]
    SCALAR_UNITS_FIELD_NUMBER: _ClassVar[int]
    round: int
    full_units: int
    scalar_units: int
    def __init__(self, round: _Optional[int] = ..., full_units: _Optional[int] = ..., scalar_units: _Optional[int] = ...) -> None: ...

class EvaluationReport(_message.Message):
    __slots__ = ("worker_id", "token", "round", "num_samples", "loss", "accuracy", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    token: bytes
    round: int
    num_samples: int
    loss: float
    accuracy: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, worker_id: _Optional[int] = ..., token: _Optional[bytes] = ..., round: _Optional[int] = ..., num_samples: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EvaluationAck(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("reason", "stale_units", "current_round")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[ErrorDetail.Reason]
        STALE_LBG: _ClassVar[ErrorDetail.Reason]
        ROUND_CLOSED: _ClassVar[ErrorDetail.Reason]
        MALFORMED: _ClassVar[ErrorDetail.Reason]
        UNAUTHENTICATED: _ClassVar[ErrorDetail.Reason]
        DUPLICATE: _ClassVar[ErrorDetail.Reason]
        NOT_SAMPLED: _ClassVar[ErrorDetail.Reason]
        MODEL_MISMATCH: _ClassVar[ErrorDetail.Reason]
    REASON_UNSPECIFIED: ErrorDetail.Reason
    STALE_LBG: ErrorDetail.Reason
    ROUND_CLOSED: ErrorDetail.Reason
    MALFORMED: ErrorDetail.Reason
    UNAUTHENTICATED: ErrorDetail.Reason
    DUPLICATE: ErrorDetail.Reason
    NOT_SAMPLED: ErrorDetail.Reason
    MODEL_MISMATCH: ErrorDetail.Reason
    REASON_FIELD_NUMBER: _ClassVar[int]
    STALE_UNITS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    reason: ErrorDetail.Reason
    stale_units: _containers.RepeatedScalarFieldContainer[int]
    current_round: int
    def __init__(self, reason: _Optional[_Union[ErrorDetail.Reason, str]] = ..., stale_units: _Optional[_Iterable[int]] = ..., current_round: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("include_state_digest",)
    INCLUDE_STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    include_state_digest: bool
    def __init__(self, include_state_digest: _Optional[bool] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("round", "total_rounds", "workers_joined", "test_accuracy", "test_loss", "uplink_bytes", "downlink_bytes", "finished", "completed_rounds", "state_digest", "evaluation", "evaluated_model_round")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_JOINED_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    UPLINK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_BYTES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_MODEL_ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    total_rounds: int
    workers_joined: int
    test_accuracy: float
    test_loss: float
    uplink_bytes: int
    downlink_bytes: int
    finished: bool
    completed_rounds: int
    state_digest: str
    evaluation: str
    evaluated_model_round: int
    def __init__(self, round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., workers_joined: _Optional[int] = ..., test_accuracy: _Optional[float] = ..., test_loss: _Optional[float] = ..., uplink_bytes: _Optional[int] = ..., downlink_bytes: _Optional[int] = ..., finished: _Optional[bool] = ..., completed_rounds: _Optional[int] = ..., state_digest: _Optional[str] = ..., evaluation: _Optional[str] = ..., evaluated_model_round: _Optional[int] = ...) -> None: ...
