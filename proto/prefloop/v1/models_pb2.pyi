from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_version", "architecture", "context_length", "dtype", "backend", "sampling_defaults")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    architecture: str
    context_length: int
    dtype: str
    backend: str
    sampling_defaults: SamplingDefaults
    def __init__(self, model_version: _Optional[str] = ..., architecture: _Optional[str] = ..., context_length: _Optional[int] = ..., dtype: _Optional[str] = ..., backend: _Optional[str] = ..., sampling_defaults: _Optional[_Union[SamplingDefaults, _Mapping]] = ...) -> None: ...

class SamplingDefaults(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "repetition_penalty")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., repetition_penalty: _Optional[float] = ...) -> None: ...

class GetEngineStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EngineStats(_message.Message):
    __slots__ = ("running", "waiting", "free_blocks", "total_blocks", "prefix_cache_hit_tokens", "active_requests", "queued_requests", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    prefix_cache_hit_tokens: int
    active_requests: int
    queued_requests: int
    extra: _containers.ScalarMap[str, float]
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., free_blocks: _Optional[int] = ..., total_blocks: _Optional[int] = ..., prefix_cache_hit_tokens: _Optional[int] = ..., active_requests: _Optional[int] = ..., queued_requests: _Optional[int] = ..., extra: _Optional[_Mapping[str, float]] = ...) -> None: ...

class StartABRequest(_message.Message):
    __slots__ = ("candidate", "traffic", "sticky", "min_votes", "confidence", "max_duration", "force", "futility_win")
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    STICKY_FIELD_NUMBER: _ClassVar[int]
    MIN_VOTES_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    FUTILITY_WIN_FIELD_NUMBER: _ClassVar[int]
    candidate: str
    traffic: float
    sticky: str
    min_votes: int
    confidence: float
    max_duration: str
    force: bool
    futility_win: float
    def __init__(self, candidate: _Optional[str] = ..., traffic: _Optional[float] = ..., sticky: _Optional[str] = ..., min_votes: _Optional[int] = ..., confidence: _Optional[float] = ..., max_duration: _Optional[str] = ..., force: _Optional[bool] = ..., futility_win: _Optional[float] = ...) -> None: ...

class GetABStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopABRequest(_message.Message):
    __slots__ = ("outcome", "reason")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    outcome: str
    reason: str
    def __init__(self, outcome: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ABStatus(_message.Message):
    __slots__ = ("running", "candidate", "control", "status", "wins", "losses", "interval_low", "interval_high", "decision", "reason", "status_json")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    WINS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_LOW_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_HIGH_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_JSON_FIELD_NUMBER: _ClassVar[int]
    running: bool
    candidate: str
    control: str
    status: str
    wins: int
    losses: int
    interval_low: float
    interval_high: float
    decision: str
    reason: str
    status_json: str
    def __init__(self, running: _Optional[bool] = ..., candidate: _Optional[str] = ..., control: _Optional[str] = ..., status: _Optional[str] = ..., wins: _Optional[int] = ..., losses: _Optional[int] = ..., interval_low: _Optional[float] = ..., interval_high: _Optional[float] = ..., decision: _Optional[str] = ..., reason: _Optional[str] = ..., status_json: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "parent", "created_at", "kind", "method", "current", "metrics_json", "gate_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    GATE_JSON_FIELD_NUMBER: _ClassVar[int]
    version: str
    parent: str
    created_at: str
    kind: str
    method: str
    current: bool
    metrics_json: str
    gate_json: str
    def __init__(self, version: _Optional[str] = ..., parent: _Optional[str] = ..., created_at: _Optional[str] = ..., kind: _Optional[str] = ..., method: _Optional[str] = ..., current: _Optional[bool] = ..., metrics_json: _Optional[str] = ..., gate_json: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions", "current_version", "serving_version")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    current_version: str
    serving_version: str
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ..., current_version: _Optional[str] = ..., serving_version: _Optional[str] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("version", "reason", "force")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    version: str
    reason: str
    force: bool
    def __init__(self, version: _Optional[str] = ..., reason: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class SwitchResponse(_message.Message):
    __slots__ = ("previous_version", "current_version")
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    previous_version: str
    current_version: str
    def __init__(self, previous_version: _Optional[str] = ..., current_version: _Optional[str] = ...) -> None: ...
