"""What the HTTP front end's parts share: its configuration, its error, and the typed keys of
the application's state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from engine.scheduler import Engine
from server.chat import ChatFormatter
from server.cluster import Cluster, Signer
from server.engine_loop import EngineLoop, RequestFront
from server.router import Router
from server.routing import RoutingPolicy

if TYPE_CHECKING:
    from server.response_cache import ResponseCache


@dataclass
class ServerConfig:
    model_name: str = "ringleader"
    api_key: str | None = None
    max_queue: int = 256  # requests waiting or running; more get 429
    max_body_bytes: int = 1 << 20
    request_timeout_s: float | None = None  # a request still running after this fails with 504
    drain_timeout_s: float = 20.0  # on shutdown, how long in-flight requests may take to finish
    # sampling values a request that leaves them out gets (generation_config.json's, as vLLM)
    sampling_defaults: dict = field(default_factory=dict)
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)  # a cluster router's policy
    tool_call_parser: str | None = None  # server.tools.PARSERS' name; None: the chat template's syntax


class ApiError(Exception):
    """An HTTP error answer: status, and the OpenAI error object's message, type, param, code."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


ENGINE_LOOP = web.AppKey("engine_loop", EngineLoop)
CONFIG = web.AppKey("config", ServerConfig)
ENGINE = web.AppKey("engine", Engine)
METRICS = web.AppKey("metrics", dict)
CHAT_FORMATTER = web.AppKey("chat_formatter", ChatFormatter)
STARTED = web.AppKey("started", int)  # when the server started (Unix time): /v1/models' "created"
FRONT = web.AppKey("front", RequestFront)  # where requests go: the engine loop, or a cluster's router
CLUSTER = web.AppKey("cluster", Cluster)
ROUTER = web.AppKey("router", Router)
SIGNER = web.AppKey("signer", Signer)
RESPONSE_CACHE: web.AppKey[ResponseCache] = web.AppKey("response_cache")
