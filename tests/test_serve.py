"""serve.py: the OpenAI-compatible API against sample.py's text through the official openai client, chat prompts
against transformers' apply_chat_template, concurrent clients, the bounded line (503), disconnects, bad input, and
the script itself. The page is tested in a browser in test_serve_page.py."""

import dataclasses
import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

import sample
import serve
from configurator import run_main
from conftest import Gate, serving, start_script
from tokenizer import read_gguf, smollm2_gguf_path

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def served(text_checkpoint):
    return serve.load(serve.ServeConfig(out_dir=str(text_checkpoint), device="cpu"))


@pytest.fixture(scope="module")
def url(served):
    with serving(serve.build_app(served, queue_size=16)) as running:
        yield running.url


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def sample_text(out_dir, capsys, max_tokens, temperature, top_k=None, seed=1337):
    """What sample.py writes after PROMPT."""
    sample.main([f"--out_dir={out_dir}", f"--start={PROMPT}", f"--max_new_tokens={max_tokens}",
                 f"--temperature={temperature}", f"--top_k={top_k}", f"--seed={seed}"])
    out = capsys.readouterr().out
    assert out.startswith(PROMPT) and out.endswith("\n---------------\n")
    return out[len(PROMPT):-len("\n---------------\n")]


def completion(url, stream=False, **options):
    """The openai client's completion of PROMPT: (text, finish_reason), joined from the events when streamed."""
    options = {"model": "any", "prompt": PROMPT, **options}
    if "top_k" in options:  # not one of OpenAI's fields: the client sends it as it is
        options["extra_body"] = {"top_k": options.pop("top_k")}
    if not stream:
        choice = client(url).completions.create(**options).choices[0]
        return choice.text, choice.finish_reason
    chunks = list(client(url).completions.create(**options, stream=True))
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


def wait_until(condition, timeout=60):
    """Poll condition() until it is true (the state a test waits for), failing after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def request(url, body=None):
    """(status, the JSON answer) of a GET, or of a POST of body (a str, or JSON'd)."""
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, {"Content-Type": "application/json"}),
                                    timeout=60) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def queued(url):
    return request(f"{url}/health")[1]["queued"]


# ---- completions: sample.py's text ----

SETTINGS = {"greedy": dict(temperature=0), "seeded": dict(temperature=0.8, top_k=200, seed=3)}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_completions_are_sample_py_s_text(text_checkpoint, url, capsys, settings):
    """At temperature 0, and with a seed at temperature 0.8, streamed and not: what sample.py writes."""
    expected = sample_text(text_checkpoint, capsys, 20, **settings)
    assert len(expected) > 20
    assert completion(url, max_tokens=20, **settings)[0] == expected
    assert completion(url, stream=True, max_tokens=20, **settings)[0] == expected


def test_n_choices_and_stop_strings(text_checkpoint, url, capsys):
    greedy = sample_text(text_checkpoint, capsys, 20, 0)
    answer = client(url).completions.create(model="any", prompt=PROMPT, max_tokens=20, temperature=0, n=3)
    assert [c.text for c in answer.choices] == [greedy] * 3 and [c.index for c in answer.choices] == [0, 1, 2]
    assert {c.finish_reason for c in answer.choices} == {"length"}
    assert answer.usage.prompt_tokens == 4 and answer.usage.completion_tokens == 60
    # a stop string across tokens ends the text before it, streamed too (the events hold back what may begin one)
    stop = greedy[7:12]
    for stream, stops in ((False, stop), (True, ["never said", stop])):
        text, finish = completion(url, stream, max_tokens=20, temperature=0, stop=stops)
        assert (text, finish) == (greedy[:greedy.index(stop)], "stop")


def test_eight_clients_at_once_all_get_their_text(text_checkpoint, url, capsys):
    expected = {name: sample_text(text_checkpoint, capsys, 12, **s) for name, s in SETTINGS.items()}
    names = ["greedy", "seeded"] * 4

    def ask(i):
        return completion(url, stream=i % 4 < 2, max_tokens=12, **SETTINGS[names[i]])[0]
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, range(8)))
    assert texts == [expected[name] for name in names]
    assert queued(url) == 0


# ---- the line, disconnects ----

def test_a_full_line_answers_503(served, monkeypatch):
    """queue_size 2: one request generating (held by the gate), one waiting; a third is turned away at once."""
    gate = Gate(free=0)
    monkeypatch.setattr(serve, "stream", gate.stream)
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    with serving(serve.build_app(served, queue_size=2)) as running, ThreadPoolExecutor(2) as pool:
        url = running.url
        first = [pool.submit(request, f"{url}/v1/completions", body) for _ in range(2)]
        wait_until(lambda: queued(url) == 2 and gate.waiting.is_set())  # one decoding (held), one in line
        status, busy = request(f"{url}/v1/completions", body)
        assert status == 503 and busy["error"]["message"].startswith("the server is busy")
        gate.open()
        answers = [f.result() for f in first]
        assert [status for status, _ in answers] == [200, 200]
        assert answers[0][1]["choices"] == answers[1][1]["choices"]
        assert queued(url) == 0


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "whole"])
def test_a_client_that_disconnects_ends_its_generation(served, monkeypatch, streaming):
    """The client leaves while the third of 40 tokens is decoded (streamed: once it read the first event): the
    decoding stops after that token, and the line is free."""
    gate = Gate(free=2)
    monkeypatch.setattr(serve, "stream", gate.stream)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 40, "stream": streaming}).encode()
    with serving(serve.build_app(served, queue_size=4)) as running:
        with socket.create_connection(urllib.parse.urlsplit(running.url)[1].split(":")) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert gate.waiting.wait(timeout=60)
            received = b""
            while streaming and b"data: " not in received:
                received += s.recv(4096)
        wait_until(lambda: not running.server.server_state.connections)  # uvicorn saw the client go
        gate.open()
        assert gate.closed.wait(timeout=60)
        assert gate.given == 3
        assert queued(running.url) == 0


# ---- chat ----

def test_chat_renders_smollm2_s_template_as_transformers_does(served, monkeypatch):
    """The prompt is transformers' apply_chat_template's for the template in SmolLM2's GGUF file; a chat's answer is
    the completion of that prompt, and ends at <|im_end|> (the end of the assistant's turn), where a completion
    goes on to <|endoftext|>."""
    from transformers import PreTrainedTokenizerFast
    template = read_gguf(smollm2_gguf_path())[0]["tokenizer.chat_template"]
    reference = PreTrainedTokenizerFast(tokenizer_object=served.tokenizer)
    chat = dataclasses.replace(served, chat=serve.smollm2_chat(served.tokenizer))
    conversations = [[{"role": "user", "content": "What is 2+2?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]]
    prompts = [chat.chat.prompt(messages) for messages in conversations]
    assert prompts == [reference.apply_chat_template(m, chat_template=template, tokenize=False,
                                                     add_generation_prompt=True) for m in conversations]
    assert prompts[0].endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    with serving(serve.build_app(chat, queue_size=4)) as running:
        url = running.url
        expected = client(url).completions.create(model="any", prompt=prompts[1], max_tokens=8, temperature=0)
        answer = client(url).chat.completions.create(model="any", messages=conversations[1], max_tokens=8,
                                                     temperature=0)
        assert answer.choices[0].message.content == expected.choices[0].text
        assert answer.choices[0].message.role == "assistant" and answer.choices[0].finish_reason == "length"
        chunks = list(client(url).chat.completions.create(model="any", messages=conversations[1], max_tokens=8,
                                                          temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.choices[0].text
        # the decoder scripted: " Paris", <|im_end|>, <|endoftext|>
        paris = served.tokenizer.encode(" Paris").ids
        scripted = paris + [served.tokenizer.token_to_id("<|im_end|>"), served.eot, 5, 5]
        monkeypatch.setattr(serve, "stream", lambda model, idx, n, sampling: (torch.tensor([[t]]) for t in scripted))
        answer = client(url).chat.completions.create(model="any", messages=conversations[0], max_tokens=8)
        assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (" Paris", "stop")
        answer = client(url).completions.create(model="any", prompt=prompts[0], max_tokens=8)
        assert (answer.choices[0].text, answer.choices[0].finish_reason) == (" Paris<|im_end|>", "stop")


# ---- bad input ----

BAD = [  # (path, body, status, the error message)
    ("completions", {"prompt": PROMPT, "temperature": -1}, 400,
     "temperature: Input should be greater than or equal to 0"),
    ("completions", '{"prompt": "Once upon",', 400, "the body is not valid JSON: Expecting property name"),
    ("completions", {"prompt": " word" * 130}, 400, "the prompt has 130 tokens, and the model's context (block_size) "
                                                    "is 128: it must leave room for at least one new token"),
    ("completions", {"prompt": PROMPT, "max_tokens": 125}, 400, "max_tokens=125 with the prompt's 4 tokens is more "
                                                                "than the model's context (block_size) of 128: ask "
                                                                "for at most 124"),
    ("completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens: Input should be greater than or equal to 1"),
    ("completions", {"prompt": ""}, 400, "the prompt is empty"),
    ("completions", {"prompt": PROMPT, "top_p": 0}, 400, "top_p: Input should be greater than 0"),
    ("completions", {"prompt": PROMPT, "n": 100}, 400, "n: Input should be less than or equal to 16"),
    ("completions", {"prompt": PROMPT, "stop": [""]}, 400, "stop.0: String should have at least 1 character"),
    ("completions", {"prompt": PROMPT, "stop": list("abcde")}, 400, "stop: List should have at most 4 items"),
    ("completions", {"prompt": PROMPT, "logprobs": 1}, 400, "logprobs=1 is not supported by this server"),
    ("completions", {"prompt": 7}, 400, "prompt: Input should be a valid string"),
    ("completions", {"max_tokens": 3}, 400, "prompt: Field required"),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, 404, "tokenizer has no chat template"),
]


def test_bad_input_gets_a_4xx_saying_what_was_wrong(url):
    for path, body, status, message in BAD:
        answer = request(f"{url}/v1/{path}", body)
        assert answer[0] == status and message in answer[1]["error"]["message"], (body, answer)
    with pytest.raises(openai.BadRequestError, match="temperature: Input should be greater than or equal to 0"):
        client(url).completions.create(model="any", prompt=PROMPT, temperature=-0.5)
    assert completion(url, max_tokens=3, temperature=0)[1] == "length"  # and the server goes on


# ---- the script ----

def test_serve_py_serves_until_interrupted(text_checkpoint, tmp_path, capsys):
    """python serve.py --port=0: it says where it listens, answers there, and Ctrl-C stops it after a graceful shutdown
    (exit code 130, as the project's scripts end on Ctrl-C)."""
    greedy = sample_text(text_checkpoint, capsys, 10, 0)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = start_script("serve.py", f"--out_dir={text_checkpoint}", "--port=0", stdout=subprocess.DEVNULL,
                            stderr=stderr)
    try:
        wait_until(lambda: proc.poll() is None and "on http://" in log.read_text())
        url = re.search(r"on (http://[\d.]+:\d+) ", log.read_text()).group(1)
        assert request(f"{url}/health")[0] == 200  # it listens already: this waits for uvicorn to accept
        assert client(url).models.list().data[0].id == str(text_checkpoint)
        assert completion(url, max_tokens=10, temperature=0)[0] == greedy
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text()
    said = log.read_text()
    assert "Application shutdown complete" in said and said.endswith("interrupted\n") and "Traceback" not in said


@pytest.mark.parametrize("option, message", [
    ("--port=70000", "--port=70000: must be in 0..65535"),
    ("--queue_size=0", "--queue_size=0: must be at least 1"),
    ("--init_from=gpt2", "unknown --init_from=gpt2"),
    ("--out_dir=/no/such/dir", "no checkpoint at /no/such/dir/ckpt.pt"),
    ("--port={taken}", "cannot listen on 127.0.0.1:{taken}"),
])
def test_bad_options(option, message, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit:
            run_main(lambda: serve.main(["--port=0", option.format(taken=port)]))
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and out == ""
    assert err.startswith(f"error: {message.format(taken=port)}") and err.count("\n") == 1, err
