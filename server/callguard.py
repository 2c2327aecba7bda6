"""A server interceptor that bounds every call (lbgm.server.limits says why).

For a unary request gRPC waits for the message on a pool thread before the handler
runs, with no deadline, so a client that sends headers and nothing else holds that
thread for good. The guard therefore turns every handler into its streaming-request
form (the same bytes on the wire) and reads each message, the first included, under a
stage deadline; each message the server streams back must be taken within one too.
A call whose stage outlives `CallLimits.stall_seconds` is cancelled (the client sees
CANCELLED) and logged. Methods named in `raw_requests` get each request message's bytes
as gRPC received them, undeserialized (SubmitUpdate: lbgm.common.wire reads an upload's
chunks straight from those bytes instead of copying each through a parsed message).

Calls fall into two classes:

- worker calls (GetTask, SubmitUpdate) run on the server's pool. `admit(method,
  context)` runs before their first message is read: it authenticates from the call
  metadata (aborting the call otherwise) and returns what to run when the call ends;
- every other call (Join, GetStatus, health, reflection) runs on a small pool of its
  own, at most `control_calls` at once, beyond which it is refused with UNAVAILABLE
  (transient: clients retry with backoff). Stalled or flooding callers of these can
  keep `lbgm status` out for a stall deadline, but never take a thread from a worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from lbgm.server.limits import CallLimits, Watchdog

log = logging.getLogger(__name__)

Admit = Callable[[str, grpc.ServicerContext], Callable[[], None]]


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call at once without reading it."""
    def refuse(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> None:
        context.abort(code, message)
    return grpc.stream_unary_rpc_method_handler(refuse)


class CallGuard(grpc.ServerInterceptor):
    def __init__(self, limits: CallLimits, worker_methods: frozenset[str], admit: Admit,
                 raw_requests: frozenset[str] = frozenset()) -> None:
        self.limits = limits
        self.worker_methods = worker_methods
        self.admit = admit
        self.raw_requests = raw_requests
        self.watchdog = Watchdog()
        self._control_slots = threading.BoundedSemaphore(limits.control_calls)
        self.control_pool = ThreadPoolExecutor(limits.control_calls, thread_name_prefix="control")

    def close(self) -> None:
        self.control_pool.shutdown(wait=False, cancel_futures=True)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        if details.method in self.worker_methods:
            return self._guarded(handler, details.method, lambda context: self.admit(details.method, context), None)
        if not self._control_slots.acquire(blocking=False):
            return _refusal(grpc.StatusCode.UNAVAILABLE,
                            f"the server is already running {self.limits.control_calls} status, join, health "
                            f"and reflection calls; try again shortly")
        return self._guarded(handler, details.method, lambda context: self._control_slots.release,
                             self.control_pool)

    # ------------------------------------------------------------ wrapping

    def _cut(self, context: grpc.ServicerContext, method: str, waiting_for: str) -> Callable[[], None]:
        def cut() -> None:
            log.warning("cancelled %s from %s: no %s within %gs", method, context.peer(), waiting_for,
                        self.limits.stall_seconds)
            context.cancel()
        return cut

    def _received(self, requests: Iterator[Any], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
        """The client's messages, each of which must arrive within the stall deadline."""
        while True:
            with self.watchdog.stage(self.limits.stall_seconds, self._cut(context, method, "next request message")):
                message = next(requests, None)
            if message is None:
                return
            yield message

    def _sent(self, responses: Iterator[Any], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
        """The server's messages; the client must take each within the stall deadline (producing them may
        take as long as it takes, as a long poll does)."""
        for response in responses:
            with self.watchdog.stage(self.limits.stall_seconds, self._cut(context, method, "read of a response")):
                yield response

    def _guarded(self, handler: grpc.RpcMethodHandler, method: str,
                 admit: Callable[[grpc.ServicerContext], Callable[[], None]],
                 pool: ThreadPoolExecutor | None) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        non_blocking = getattr(inner, "experimental_non_blocking", False)

        def argument(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            received = self._received(request_iterator, context, method)
            if handler.request_streaming:
                return received
            request = next(received, None)
            if request is None:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} requires exactly one request message")
            return request

        if not handler.response_streaming:
            def behavior(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
                done = admit(context)
                try:
                    return inner(argument(request_iterator, context), context)
                finally:
                    done()
        elif non_blocking:  # answers through a callback later (health Watch) and holds no thread meanwhile
            def behavior(request_iterator: Iterator[Any], context: grpc.ServicerContext,
                         send_response_callback: Callable[[Any], None]) -> None:
                done = admit(context)
                try:
                    inner(argument(request_iterator, context), context, send_response_callback)
                finally:
                    done()
            behavior.experimental_non_blocking = True
        else:
            def behavior(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                done = admit(context)
                try:
                    yield from self._sent(inner(argument(request_iterator, context), context), context, method)
                finally:
                    done()
        if pool is not None:
            behavior.experimental_thread_pool = pool
        make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else \
            grpc.stream_unary_rpc_method_handler
        deserializer = None if method in self.raw_requests else handler.request_deserializer
        return make(behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer)
