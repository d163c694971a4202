"""``dpn serve``: an OpenAI-compatible chat server whose concurrent requests share one batch.

Endpoints: ``POST /v1/chat/completions`` (``stream`` as server-sent events, ``max_tokens`` /
``max_completion_tokens``, ``temperature``), ``GET /v1/models``, ``GET /health``. Images come as
``image_url`` parts: base64 ``data:`` URLs, or local paths (plain or ``file://``) inside the folder
the server was started with (``--image-folder``; without it local paths are refused). Requests
that arrive within ``batch_window_ms`` of each other run as one left-padded batch: the pyramid
routes each sample on its own, so one batch mixes easy and hard questions. A request may choose,
through ``extra_body={"dpn": {...}}``, ``"pyramid": "off"`` (every visual token) or a DPN
``"router_bias"`` (> 0 compresses more); requests with different choices run in separate batches.

OpenAI parameters that would change the answer are honoured or refused with a 400, never ignored
(``HANDLED``, ``NEUTRAL_VALUES``, ``UNSUPPORTED``, ``IGNORED``; docs/serving.md has the table);
``stream_options.include_usage`` ends a stream with a usage chunk.
Bad requests get a 4xx JSON error in OpenAI's shape (``{"error": {"message", "type", "param",
"code"}}``); more than ``max_queue`` waiting requests get 503. Each response carries, beside the
OpenAI fields, ``dpn``: the visual tokens per stage, the FLOPs ratio and the batch it ran in.
"""

# no "from __future__ import annotations": FastAPI reads the handlers' annotations (Request) at runtime
import asyncio
import base64
import binascii
import io
import json
import queue
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from dpn.api import has_pyramid, pyramid_disabled
from dpn.budget import get_router_bias, router_bias
from dpn.strategies.dpn import checked_router_bias
from dpn.lab.engine.answering import DEFAULT_MAX_IMAGES, Answer, Answerer, Prepared, Question
from dpn.lab.engine.messages import OPENAI_IMAGE_PART, MessageError, normalise_messages

DEFAULT_HOST = "127.0.0.1"  # loopback only unless asked: the server has no authentication
DEFAULT_PORT = 8000
DEFAULT_BATCH_WINDOW_MS = 20.0  # how long the first request of a batch waits for others
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_MAX_QUEUE = 64  # waiting requests beyond this get 503 instead of growing memory
DEFAULT_MAX_TOKENS = 128
MAX_TEMPERATURE = 2.0  # OpenAI's range
PYRAMID_CHOICES = ("on", "off")

# The policy for OpenAI's chat-completions parameters (docs/serving.md): a parameter that would change
# the answer is honoured or refused with a 400, never ignored; one that cannot change it is accepted.
HANDLED = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "stream", "stream_options",
           "dpn")
# Accepted only at the value that leaves sampling as it is (what OpenAI's default does).
NEUTRAL_VALUES = {"n": 1, "top_p": 1, "frequency_penalty": 0, "presence_penalty": 0}
# Refused unless absent or empty (null, false, [], {}, "").
UNSUPPORTED = ("stop", "seed", "logit_bias", "logprobs", "top_logprobs", "tools", "tool_choice", "functions",
               "function_call", "parallel_tool_calls", "response_format", "modalities", "audio", "prediction",
               "reasoning_effort", "web_search_options")
# They describe the caller or the bookkeeping, not the answer: accepted and ignored.
IGNORED = ("user", "metadata", "store", "service_tier")
KNOWN_PARAMETERS = frozenset((*HANDLED, *NEUTRAL_VALUES, *UNSUPPORTED, *IGNORED))


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Settings:
    """What a request asks of the pyramid; requests with equal settings can share a batch."""

    pyramid: bool
    router_bias: float | None = None


@dataclass(frozen=True)
class Delivery:
    """How a request wants its answer: whole or streamed, and whether a stream ends with the usage."""

    stream: bool = False
    include_usage: bool = False


@dataclass
class Job:
    prepared: Prepared
    settings: Settings
    on_token: Callable[[int], None] | None  # each new token id, for streaming
    finish: Callable[[Answer | None, BaseException | None, int], None]  # answer or error, and the batch size


@dataclass
class ServeOptions:
    model: str
    pyramid: str = "saved"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    name: str | None = None  # the model id clients ask for (default: the model directory's name)
    image_folder: str | None = None  # local image paths are allowed inside this folder only
    batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue: int = DEFAULT_MAX_QUEUE
    max_images: int = DEFAULT_MAX_IMAGES
    default_max_tokens: int = DEFAULT_MAX_TOKENS

    def __post_init__(self) -> None:
        at_least_one = {"max_batch_size": self.max_batch_size, "max_queue": self.max_queue,
                        "max_images": self.max_images, "default_max_tokens": self.default_max_tokens}
        problems = [f"--{k.replace('_', '-')} must be at least 1, got {v}" for k, v in at_least_one.items() if v < 1]
        if self.batch_window_ms < 0:
            problems.append(f"--batch-window-ms must be at least 0, got {self.batch_window_ms}")
        if self.image_folder is not None and not Path(self.image_folder).is_dir():
            problems.append(f"--image-folder {self.image_folder} is not a directory")
        if problems:
            raise ValueError("; ".join(problems))


class Batcher:
    """Runs queued jobs on one worker thread, batching those that arrive within the window."""

    def __init__(self, answerer: Answerer, window_seconds: float, max_batch_size: int, max_queue: int) -> None:
        self.answerer = answerer
        self.window_seconds = window_seconds
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.waiting = 0
        self.lock = threading.Lock()
        self.worker = threading.Thread(target=self._run, name="dpn-serve-batcher", daemon=True)
        self.worker.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.waiting >= self.max_queue:
                raise RequestError(503, f"the server has {self.waiting} requests waiting (--max-queue "
                                        f"{self.max_queue}); try again later", code="queue_full")
            self.waiting += 1
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join()

    def _collect(self, first: Job) -> list[Job]:
        batch = [first]
        deadline = time.monotonic() + self.window_seconds
        while len(batch) < self.max_batch_size:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)  # stop after this batch
                break
            batch.append(job)
        with self.lock:
            self.waiting -= len(batch)
        return batch

    def _run(self) -> None:
        while (first := self.jobs.get()) is not None:
            batch = self._collect(first)
            groups: dict[Settings, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.settings, []).append(job)
            for settings, jobs in groups.items():
                self._answer(settings, jobs)

    def _answer(self, settings: Settings, jobs: list[Job]) -> None:
        model = self.answerer.model

        def on_token(row: int, token: int) -> None:
            if jobs[row].on_token is not None:
                jobs[row].on_token(token)

        streaming = any(job.on_token is not None for job in jobs)
        try:
            with ExitStack() as stack:
                if not settings.pyramid:
                    stack.enter_context(pyramid_disabled(model))
                if settings.router_bias is not None:
                    stack.enter_context(router_bias(model, settings.router_bias))
                answers = self.answerer.answer([job.prepared for job in jobs], on_token if streaming else None)
        except Exception as err:  # noqa: BLE001 - one failed batch must not stop the server
            for job in jobs:
                job.finish(None, err, len(jobs))
            return
        for job, answer in zip(jobs, answers):
            job.finish(answer, None, len(jobs))


# ---- requests ----------------------------------------------------------------------------------

def _empty(value: Any) -> bool:
    """Absent or empty: null, false, [], {}, "" (not 0, which is a value: ``seed: 0`` is a seed)."""
    return value is None or value is False or (isinstance(value, (list, dict, str)) and not value)


def _field(body: dict, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool:  # JSON true is not a number
        raise RequestError(400, f"'{name}' must be {_kind_name(kind)}, got {json.dumps(value)}", param=name)
    if not isinstance(value, kind):
        raise RequestError(400, f"'{name}' must be {_kind_name(kind)}, got {json.dumps(value)[:80]}", param=name)
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


class RequestReader:
    """Turns a chat-completions body into a ``Question`` and ``Settings``, or a ``RequestError``."""

    def __init__(self, model_name: str, answerer: Answerer, options: ServeOptions) -> None:
        self.model_name = model_name
        self.answerer = answerer
        self.options = options
        self.image_folder = Path(options.image_folder).resolve() if options.image_folder else None

    def read(self, body: Any) -> tuple[Question, Settings, Delivery]:
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        unknown = sorted(set(body) - KNOWN_PARAMETERS)
        if unknown:
            raise RequestError(400, f"unrecognized request argument(s): {', '.join(unknown)} (dpn's own options go in "
                                    "'dpn')", param=unknown[0])
        model = body.get("model")
        if model is None:
            raise RequestError(400, f"'model' is required (this server serves {self.model_name!r})", param="model")
        if model != self.model_name:
            raise RequestError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                               param="model", code="model_not_found")
        for name, neutral in NEUTRAL_VALUES.items():
            if body.get(name) not in (None, neutral):
                raise RequestError(400, f"'{name}' other than {neutral} is not supported by dpn serve", param=name)
        for name in UNSUPPORTED:
            if not _empty(body.get(name)):
                raise RequestError(400, f"'{name}' is not supported by dpn serve", param=name)
        max_tokens = _field(body, "max_completion_tokens", int)
        if max_tokens is None:
            max_tokens = _field(body, "max_tokens", int, self.options.default_max_tokens)
        if max_tokens < 1:
            raise RequestError(400, f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
        temperature = float(_field(body, "temperature", (int, float), 0.0))
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise RequestError(400, f"'temperature' must be in [0, {MAX_TEMPERATURE}], got {temperature}",
                               param="temperature")
        stream = _field(body, "stream", bool, False)
        delivery = Delivery(stream, self._include_usage(body.get("stream_options"), stream))
        messages, images = self._messages(_field(body, "messages", list))
        return Question(messages, images, max_tokens, temperature), self._settings(body.get("dpn")), delivery

    @staticmethod
    def _include_usage(options: Any, stream: bool) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        if options is None:
            return False
        if not stream:
            raise RequestError(400, "'stream_options' is only allowed with stream: true", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError(400, "'stream_options' must be an object with 'include_usage' (a boolean)",
                               param="stream_options")
        return _field(options, "include_usage", bool, False)

    def _settings(self, choice: Any) -> Settings:
        if choice is None:
            choice = {}
        if not isinstance(choice, dict) or set(choice) - {"pyramid", "router_bias"}:
            raise RequestError(400, "'dpn' must be an object with 'pyramid' (\"on\" | \"off\") and/or 'router_bias'",
                               param="dpn")
        pyramid = choice.get("pyramid", "on")
        if pyramid not in PYRAMID_CHOICES:
            raise RequestError(400, f"dpn.pyramid must be one of {PYRAMID_CHOICES}, got {pyramid!r}", param="dpn")
        bias = _field(choice, "router_bias", (int, float))
        if bias is not None:
            if pyramid == "off":
                raise RequestError(400, "dpn.router_bias needs the pyramid on", param="dpn")
            try:
                get_router_bias(self.answerer.model)
                bias = checked_router_bias(bias)  # JSON's NaN and Infinity parse as numbers
            except ValueError as err:
                raise RequestError(400, f"dpn.router_bias: {err}", param="dpn") from err
        on = pyramid == "on" and has_pyramid(self.answerer.model)  # without one, "on" is the same as "off"
        return Settings(pyramid=on, router_bias=bias)

    def _messages(self, raw: list | None) -> tuple[list[dict], list[Image.Image]]:
        try:
            messages, images = normalise_messages(raw, self._image_part, OPENAI_IMAGE_PART)
        except MessageError as err:
            raise RequestError(400, str(err), param=err.where) from err
        if len(images) > self.options.max_images:
            raise RequestError(400, f"{len(images)} images in one request; this server takes at most "
                                    f"{self.options.max_images} (--max-images)", param="messages")
        return messages, images

    def _image_part(self, part: dict, param: str) -> Image.Image:
        """An OpenAI ``image_url`` part's image (a data URL, or a file under --image-folder)."""
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise RequestError(400, f"{param}: an image_url part needs image_url.url", param=param)
        return self._image(url, param)

    def _image(self, url: str, param: str) -> Image.Image:
        if url.startswith("data:"):
            header, _, data = url.partition(",")
            if not header.endswith(";base64"):
                raise RequestError(400, f"{param}: data URLs must be base64 (data:image/png;base64,...)", param=param)
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as err:
                raise RequestError(400, f"{param}: the image's base64 does not decode: {err}", param=param) from err
            return _open_image(io.BytesIO(raw), "the data URL", param)
        if url.startswith(("http://", "https://")):
            raise RequestError(400, f"{param}: the server does not fetch remote images; send a base64 data URL",
                               param=param)
        if self.image_folder is None:
            raise RequestError(400, f"{param}: local image paths are refused (start the server with --image-folder "
                                    "to allow a folder); send a base64 data URL", param=param)
        path = Path(url.removeprefix("file://"))
        path = (self.image_folder / path if not path.is_absolute() else path).resolve()
        if not path.is_relative_to(self.image_folder):
            raise RequestError(400, f"{param}: {url} is outside the allowed image folder", param=param)
        if not path.is_file():
            raise RequestError(400, f"{param}: no image at {url}", param=param)
        return _open_image(path, url, param)


def _open_image(source, name: str, param: str) -> Image.Image:
    try:
        return Image.open(source).convert("RGB")
    except (OSError, ValueError) as err:
        raise RequestError(400, f"{param}: {name} is not a readable image: {err}", param=param) from err


# ---- the app -----------------------------------------------------------------------------------

def create_app(model, processor, options: ServeOptions):
    """The FastAPI app serving ``model`` (with whatever pyramid it has) under ``options``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    name = options.name or Path(options.model).resolve().name
    answerer = Answerer(model, processor, max_images=options.max_images)
    reader = RequestReader(name, answerer, options)
    batcher = Batcher(answerer, options.batch_window_ms / 1e3, options.max_batch_size, options.max_queue)
    created = int(time.time())
    app = FastAPI(title="dpn serve")
    app.state.batcher = batcher

    def error(err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(404)
    async def not_found(request: Request, exc) -> JSONResponse:
        return error(RequestError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc) -> JSONResponse:
        return error(RequestError(405, f"{request.method} is not allowed on {request.url.path}"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "waiting": batcher.waiting}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "dpn"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RequestError(400, f"the request body is not JSON: {err}") from err
            question, settings, delivery = reader.read(body)
            try:
                prepared = await run_in_threadpool(answerer.prepare, question)  # tokenising and image processing
            except ValueError as err:
                raise RequestError(400, str(err), param="messages") from err
            reply = Reply(name, asyncio.get_running_loop(), delivery)
            batcher.submit(Job(prepared, settings, reply.token if delivery.stream else None, reply.finish))
        except RequestError as err:
            return error(err)
        if delivery.stream:
            return StreamingResponse(reply.events(answerer.tokenizer), media_type="text/event-stream")
        try:
            return reply.completion(await reply.done)
        except RequestError as err:
            return error(err)

    return app


@dataclass
class Reply:
    """One request's answer, handed from the batcher's thread to the event loop."""

    model_name: str
    loop: asyncio.AbstractEventLoop
    delivery: Delivery
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.done: asyncio.Future = self.loop.create_future()
        self.tokens: asyncio.Queue = asyncio.Queue()
        self.batch_size = 0

    def _hand_over(self, callback, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is gone (the server is stopping): nobody waits for this any more
            pass

    def token(self, token_id: int) -> None:
        self._hand_over(self.tokens.put_nowait, token_id)

    def finish(self, answer: Answer | None, err: BaseException | None, batch_size: int) -> None:
        self.batch_size = batch_size
        failure = None if err is None else RequestError(500, f"the model failed on this batch: {err!r}")
        self._hand_over(self._settle, answer, failure)

    def _settle(self, answer: Answer | None, failure: RequestError | None) -> None:
        if failure is not None:
            self.done.set_exception(failure)
        else:
            self.done.set_result(answer)
        self.tokens.put_nowait(None)  # after every token: the stream ends here

    def _extras(self, answer: Answer) -> dict[str, Any]:
        return {"visual_tokens": answer.visual_tokens, "flops_ratio": answer.flops_ratio,
                "batch_size": self.batch_size, "first_token_seconds": answer.first_token_seconds}

    @staticmethod
    def _usage(answer: Answer) -> dict[str, int]:
        completion_tokens = len(answer.token_ids)
        return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": answer.prompt_tokens + completion_tokens}

    def completion(self, answer: Answer) -> dict[str, Any]:
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": answer.finish_reason}],
            "usage": self._usage(answer),
            "dpn": self._extras(answer),
        }

    def _chunk(self, delta: dict | None, finish_reason: str | None = None, usage: dict | None = None, **extra) -> str:
        """One event; ``delta=None`` is the usage chunk (no choices). With ``include_usage`` every chunk
        carries ``usage``, null but in the last one (as OpenAI sends it)."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_name,
                 "choices": choices, **extra}
        if self.delivery.include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    async def events(self, tokenizer):
        """Server-sent events: the role, text as it is decoded, the finish reason, ``[DONE]``.

        The text pieces add up to the non-streamed answer: a piece is sent once the decoded text
        has moved past it (no trailing space, no half character), the rest with the last chunk.
        """
        yield self._chunk({"role": "assistant", "content": ""})
        token_ids, sent = [], ""
        while (token := await self.tokens.get()) is not None:
            token_ids.append(token)
            text = tokenizer.decode(token_ids, skip_special_tokens=True).lstrip().rstrip()
            if text.endswith("\ufffd") or not text.startswith(sent) or len(text) == len(sent):
                continue
            yield self._chunk({"content": text[len(sent):]})
            sent = text
        try:
            answer = await self.done
        except RequestError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
            return
        rest = answer.text[len(sent):] if answer.text.startswith(sent) else ""
        yield self._chunk({"content": rest} if rest else {}, answer.finish_reason, dpn=self._extras(answer))
        if self.delivery.include_usage:
            yield self._chunk(None, usage=self._usage(answer))
        yield "data: [DONE]\n\n"


# ---- running it --------------------------------------------------------------------------------

def serve(options: ServeOptions) -> None:
    """Load the model and serve it until interrupted."""
    import uvicorn

    from dpn.lab.engine.loading import load_model

    if options.host not in (DEFAULT_HOST, "localhost", "::1"):
        print(f"dpn serve: listening on {options.host}: anyone who reaches it can use the model (no authentication)")
    model, processor = load_model(options.model, options.pyramid)
    app = create_app(model, processor, options)
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level="info")
    finally:
        app.state.batcher.close()


@dataclass
class RunningServer:
    """A server on a background thread (tests, ``dpn serve-bench``); ``stop()`` ends it."""

    url: str
    server: Any
    thread: threading.Thread
    app: Any

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.app.state.batcher.close()


def start_in_thread(model, processor, options: ServeOptions, start_timeout: float = 30.0) -> RunningServer:
    """Serve ``model`` on ``options.host``:``options.port`` (0: a free port) from a background thread."""
    import socket

    import uvicorn

    port = options.port
    if port == 0:
        with socket.socket() as probe:
            probe.bind((options.host, 0))
            port = probe.getsockname()[1]
    app = create_app(model, processor, options)
    server = uvicorn.Server(uvicorn.Config(app, host=options.host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="dpn-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {options.host}:{port}")
        time.sleep(0.01)
    return RunningServer(f"http://{options.host}:{port}", server, thread, app)
