"""The FastAPI app: the OpenAI routes, /health and /metrics."""
from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from chitu.config.schema import ChituConfig
from chitu.engine.engine import RequestRejected
from chitu.serve.async_engine import AsyncEngine, EngineStopped
from chitu.serve.auth import ApiKeys
from chitu.serve.errors import APIError, error_response, install_error_handlers
from chitu.serve.formats import ChatFormat, CompletionFormat, ResponseFormat
from chitu.serve.generation import respond
from chitu.serve.metrics import ServeMetrics
from chitu.serve.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest, parse_body

logger = logging.getLogger(__name__)


class OpenAIService:
    """Turns validated OpenAI requests into engine requests and their responses."""

    def __init__(self, engine: AsyncEngine, config: ChituConfig, metrics: ServeMetrics):
        self.engine = engine
        self.tokenizer = engine.engine.tokenizer
        self.vocab_size = engine.engine.model_config.vocab_size
        self.model_name = config.models.name
        self.default_max_tokens = config.request.max_new_tokens
        self.metrics = metrics
        self.created = int(time.time())

    def check_model(self, body: GenerationRequest) -> None:
        # Case-insensitive, so that the manual's `--model "deepseek-r1"` names DeepSeek-R1.
        if body.model is not None and body.model.lower() != self.model_name.lower():
            raise APIError(400, f"model '{body.model}' is not served here; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        messages = [message.model_dump() for message in body.messages]
        try:
            return self.tokenizer.apply_chat_template(messages, **body.chat_template_kwargs)
        except Exception as e:  # the template's own checks (roles, kwargs) or no template at all
            raise APIError(400, f"cannot apply the model's chat template to these messages: {e}",
                           param="messages") from None

    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        if isinstance(body.prompt, str):
            return self.tokenizer.encode(body.prompt)
        bad = [t for t in body.prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                           param="prompt")
        return body.prompt

    async def generate(self, http_request: Request, body: GenerationRequest, prompt: list[int],
                       format_class: type[ResponseFormat], id_prefix: str, priority: int) -> Response:
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        try:
            params = body.sampling_params(self._max_new_tokens(body, len(prompt)))
            stream = await self.engine.add(request_id, prompt, params, priority)
        except RequestRejected as e:
            raise APIError(400, str(e), param=body.prompt_param) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except EngineStopped as e:
            raise APIError(503, str(e)) from None
        fmt = format_class(request_id, self.model_name, self.tokenizer, params.logprobs, body.include_usage)
        return await respond(http_request, stream, fmt, body.stop_strings, body.stream, self.metrics)

    def _max_new_tokens(self, body: GenerationRequest, prompt_len: int) -> int:
        """As asked; when not asked, request.max_new_tokens shortened to what the context leaves."""
        if body.requested_max_tokens is not None:
            return body.requested_max_tokens
        return max(1, min(self.default_max_tokens, self.engine.max_model_tokens - prompt_len))

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "chitu", "max_model_len": self.engine.max_model_tokens}]}


def create_app(async_engine: AsyncEngine, config: ChituConfig, metrics: ServeMetrics) -> FastAPI:
    """The app over a started engine; the app's shutdown stops the engine."""
    service = OpenAIService(async_engine, config, metrics)
    keys = ApiKeys(config.serve)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        logger.info("Stopping the engine; requests still in flight are aborted")
        async_engine.stop()

    app = FastAPI(title="Chitu", lifespan=lifespan)
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, priority: int = Depends(keys.priority)) -> Response:
        body = parse_body(await request.body(), ChatCompletionRequest)
        service.check_model(body)
        return await service.generate(request, body, service.chat_prompt(body), ChatFormat, "chatcmpl", priority)

    @app.post("/v1/completions")
    async def completions(request: Request, priority: int = Depends(keys.priority)) -> Response:
        body = parse_body(await request.body(), CompletionRequest)
        service.check_model(body)
        return await service.generate(request, body, service.completion_prompt(body), CompletionFormat, "cmpl",
                                      priority)

    @app.get("/v1/models", dependencies=[Depends(keys.priority)])
    async def models() -> dict:
        return service.models()

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_alive:
            return error_response(503, "the engine is not running")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
