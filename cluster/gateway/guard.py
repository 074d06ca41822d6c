"""What the gateway checks before anything is admitted, and how little of a client's input
it sends back.

- Bodies that do not decode (corrupt wire format, invalid UTF-8 in a string field) become
  an `Undecodable` request instead of an exception inside grpc (which would answer
  UNKNOWN); the servicer answers it INVALID_ARGUMENT (`inference_handler` registers the
  service with these tolerant deserializers).
- Request ids must be printable ASCII of at most `MAX_REQUEST_ID` characters: they go out
  in the `x-request-id` response header, which cannot carry anything else.
- Error messages quote at most `QUOTE_CHARS` characters of a client's string (`quote`),
  and a status message is never longer than `MAX_STATUS_MESSAGE` (`bounded`): a stock
  client reads at most 16 KB of metadata, and an error it cannot read is no error at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from cluster.engine.requests import RequestError

MAX_REQUEST_ID = 128  # characters
QUOTE_CHARS = 64  # of a client string, in an error message
MAX_STATUS_MESSAGE = 1024  # characters of a status message


@dataclass(frozen=True)
class Undecodable:
    """A request body that is not a valid `message_type`."""

    message_type: str
    reason: str

    @property
    def message(self) -> str:
        return f"the request body is not a valid {self.message_type}: {self.reason}"


def tolerant(message_class: Any) -> Any:
    """A deserializer that returns `Undecodable` where `message_class.FromString` raises."""
    name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as e:
            return Undecodable(name, str(e).removeprefix(f"Error parsing message with type '{name}': "))

    return deserialize


def inference_handler(service: Any, servicer: Any) -> grpc.GenericRpcHandler:
    """Handlers for every method of `service` (a ServiceDescriptor) on `servicer`, whose
    requests decode with `tolerant` deserializers."""
    handlers = {}
    for method in service.methods:
        request, response = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=tolerant(request),
                                     response_serializer=response.SerializeToString)  # fmt: skip
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def refuse(context: Any, error: Any) -> None:
    """End an RPC with `error`'s status (a GatewayError) by setting it on the context, for
    the handler to return: `context.abort()` raises instead, and grpc.aio keeps that
    exception in a reference cycle with the handler's frames, so a refused multi-MB
    request would stay in memory until the next full garbage collection."""
    context.set_code(error.code)
    context.set_details(error.message)


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text` as a Python literal, cut to `limit` characters (saying how long it was)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def bounded(message: str, limit: int = MAX_STATUS_MESSAGE) -> str:
    """A status message no longer than `limit` characters."""
    return message if len(message) <= limit else message[: limit - 15] + " ... (cut short)"


def check_request_id(request_id: str, field: str = "request_id") -> str:
    """`request_id` if a response header can carry it; RequestError otherwise."""
    if len(request_id) > MAX_REQUEST_ID:
        raise RequestError(field, f"is {len(request_id)} characters; at most {MAX_REQUEST_ID} are allowed")
    bad = next((c for c in request_id if not " " <= c <= "~"), None)
    if bad is not None:
        raise RequestError(field, f"must be printable ASCII; {quote(request_id)} holds {bad!r}")
    return request_id
