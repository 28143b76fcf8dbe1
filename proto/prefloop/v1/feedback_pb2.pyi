from prefloop.proto.prefloop.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RatingScale(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RATING_SCALE_UNSPECIFIED: _ClassVar[RatingScale]
    RATING_SCALE_THUMBS: _ClassVar[RatingScale]
    RATING_SCALE_STARS: _ClassVar[RatingScale]
RATING_SCALE_UNSPECIFIED: RatingScale
RATING_SCALE_THUMBS: RatingScale
RATING_SCALE_STARS: RatingScale

class SubmitPreferenceRequest(_message.Message):
    __slots__ = ("chosen_response_id", "rejected_response_id", "prompt_messages", "chosen_text", "rejected_text", "comment", "idempotency_key", "user_id", "session_id")
    CHOSEN_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTED_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TEXT_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    chosen_response_id: str
    rejected_response_id: str
    prompt_messages: _containers.RepeatedCompositeFieldContainer[_generation_pb2.ChatMessage]
    chosen_text: str
    rejected_text: str
    comment: str
    idempotency_key: str
    user_id: str
    session_id: str
    def __init__(self, chosen_response_id: _Optional[str] = ..., rejected_response_id: _Optional[str] = ..., prompt_messages: _Optional[_Iterable[_Union[_generation_pb2.ChatMessage, _Mapping]]] = ..., chosen_text: _Optional[str] = ..., rejected_text: _Optional[str] = ..., comment: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., user_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class SubmitRatingRequest(_message.Message):
    __slots__ = ("response_id", "score", "scale", "comment", "idempotency_key", "user_id", "session_id")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    score: int
    scale: RatingScale
    comment: str
    idempotency_key: str
    user_id: str
    session_id: str
    def __init__(self, response_id: _Optional[str] = ..., score: _Optional[int] = ..., scale: _Optional[_Union[RatingScale, str]] = ..., comment: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., user_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class FeedbackAck(_message.Message):
    __slots__ = ("feedback_id", "duplicate")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    duplicate: bool
    def __init__(self, feedback_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...
