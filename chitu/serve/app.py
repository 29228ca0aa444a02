"""The FastAPI app: the OpenAI routes, /health and /metrics.

The event loop only moves bytes: parsing, validation, the chat template and tokenization of each
request run in a small thread pool (the tokenizer releases the GIL), bounded by serve.prompt_timeout_s,
and responses read token texts from a table built at start.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from chitu.config.schema import ChituConfig
from chitu.engine.engine import RequestRejected
from chitu.engine.sampling_params import InvalidSamplingParam
from chitu.serve.async_engine import AsyncEngine, EngineOverloaded, EngineStopped
from chitu.serve.auth import ApiKeys
from chitu.serve.chat_template import ChatTemplate
from chitu.serve.errors import APIError, error_response, install_error_handlers, request_id_of
from chitu.serve.formats import ChatFormat, CompletionFormat, ResponseFormat
from chitu.serve.generation import respond
from chitu.serve.http_guards import HTTPGuards
from chitu.serve.metrics import ServeMetrics
from chitu.serve.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest, RequestLimits, parse_body
from chitu.serve.token_pieces import TokenPieces

logger = logging.getLogger(__name__)
PREPARE_THREADS = 4


class OpenAIService:
    """Turns OpenAI request bodies into engine requests and their responses."""

    def __init__(self, engine: AsyncEngine, config: ChituConfig, metrics: ServeMetrics):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.chat_template = ChatTemplate(self.tokenizer)
        self.pieces = TokenPieces(self.tokenizer.hf)
        self.vocab_size = engine.vocab_size
        self.model_name = config.models.name
        self.default_max_tokens = config.request.max_new_tokens
        self.limits = RequestLimits(max_prompt_chars=config.serve.prompt_char_limit(config.infer.max_seq_len),
                                    max_prompt_tokens=engine.max_model_tokens,
                                    max_stop_strings=config.serve.max_stop_strings,
                                    max_stop_chars=config.serve.max_stop_chars)
        self.prepare_timeout_s = config.serve.prompt_timeout_s
        self.pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="chitu-prepare")
        self.metrics = metrics
        self.created = int(time.time())

    async def prepare(self, raw: bytes, model: type[GenerationRequest]) -> tuple[GenerationRequest, list[int]]:
        """The validated body and its prompt's token ids, worked out off the event loop."""
        try:
            self.engine.check_capacity()  # before any work for a request that would be refused anyway
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                self.pool, self._prepare, raw, model), self.prepare_timeout_s)
        except (EngineOverloaded, EngineStopped) as e:
            raise APIError(503, str(e)) from None
        except asyncio.TimeoutError:
            raise APIError(503, f"preparing this request took over serve.prompt_timeout_s={self.prepare_timeout_s:g} s"
                           ) from None

    def _prepare(self, raw: bytes, model: type[GenerationRequest]) -> tuple[GenerationRequest, list[int]]:
        body = parse_body(raw, model, self.limits)
        self.check_model(body)
        if isinstance(body, ChatCompletionRequest):
            messages = [message.template_fields() for message in body.messages]
            return body, self.chat_template.render(messages, body.chat_template_kwargs, 2 * self.limits.max_prompt_chars)
        return body, self.completion_prompt(body)

    def check_model(self, body: GenerationRequest) -> None:
        # Case-insensitive, so that the manual's `--model "deepseek-r1"` names DeepSeek-R1.
        if body.model is not None and body.model.lower() != self.model_name.lower():
            raise APIError(400, f"model '{body.model}' is not served here; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        if isinstance(body.prompt, str):
            return self.tokenizer.encode(body.prompt)
        bad = [t for t in body.prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                           param="prompt")
        return body.prompt

    async def generate(self, http_request: Request, body: GenerationRequest, prompt: list[int],
                       format_class: Callable[..., ResponseFormat], id_prefix: str, priority: int) -> Response:
        request_id = f"{id_prefix}-{request_id_of(http_request.scope)}"
        try:
            params = body.sampling_params(self._max_new_tokens(body, len(prompt)))
            stream = await self.engine.add(request_id, prompt, params, priority)
        except RequestRejected as e:
            raise APIError(400, str(e), param=getattr(e, "param", body.prompt_param)) from None
        except InvalidSamplingParam as e:
            raise APIError(400, str(e), param=e.param) from None
        except (EngineOverloaded, EngineStopped) as e:
            raise APIError(503, str(e)) from None
        fmt = format_class(request_id, self.model_name, self.pieces, params.logprobs, body.include_usage)
        return await respond(http_request, stream, fmt, body.stop_strings, body.stream, self.metrics)

    def _max_new_tokens(self, body: GenerationRequest, prompt_len: int) -> int:
        """As asked; when not asked, request.max_new_tokens shortened to what the context leaves."""
        if body.requested_max_tokens is not None:
            return body.requested_max_tokens
        return max(1, min(self.default_max_tokens, self.engine.max_model_tokens - prompt_len))

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "chitu", "max_model_len": self.engine.max_model_tokens}]}


def create_app(async_engine: AsyncEngine, config: ChituConfig, metrics: ServeMetrics, keys: ApiKeys) -> FastAPI:
    """The app over a started engine; the app's shutdown stops the engine."""
    service = OpenAIService(async_engine, config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        logger.info("Stopping the engine; requests still in flight are aborted")
        async_engine.stop()
        service.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Chitu", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(HTTPGuards, max_body_bytes=config.serve.max_body_bytes,
                       max_in_progress=config.serve.max_connections)

    chat_format = functools.partial(ChatFormat, reasoning_parser=config.models.reasoning_parser)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, priority: int = Depends(keys.priority)) -> Response:
        body, prompt = await service.prepare(await request.body(), ChatCompletionRequest)
        return await service.generate(request, body, prompt, chat_format, "chatcmpl", priority)

    @app.post("/v1/completions")
    async def completions(request: Request, priority: int = Depends(keys.priority)) -> Response:
        body, prompt = await service.prepare(await request.body(), CompletionRequest)
        return await service.generate(request, body, prompt, CompletionFormat, "cmpl", priority)

    @app.get("/v1/models", dependencies=[Depends(keys.priority)])
    async def models() -> dict:
        return service.models()

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_alive:
            return error_response(503, "the engine is not running")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=[Depends(keys.priority)])
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
