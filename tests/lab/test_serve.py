"""``dpn serve``: OpenAI's own client talks to it; concurrent requests batch and answer as alone."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import save_tiny_dpn

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from dpn.lab.engine.answering import Answer, Answerer, Question  # noqa: E402
from dpn.lab.chat import ChatSession  # noqa: E402
from dpn.lab.cli import main  # noqa: E402
from dpn.lab.data.synthetic import generate_split  # noqa: E402
from dpn.lab.engine.loading import load_model  # noqa: E402
from dpn.lab.serve import Batcher, Job, RequestError, ServeOptions, Settings, start_in_thread  # noqa: E402

MAX_TOKENS = 6
SAMPLES = 8
CONCURRENT = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    generate_split(root, "test", SAMPLES, seed=0)
    save_tiny_dpn(root / "model")
    return root


@pytest.fixture(scope="module")
def server(root):
    model, processor = load_model(str(root / "model"), "saved")
    running = start_in_thread(model, processor, ServeOptions(model=str(root / "model"), name="tiny", port=0,
                                                             image_folder=str(root), batch_window_ms=50))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _records(root) -> list[dict]:
    return json.loads((root / "test.json").read_text())


def _question(record: dict) -> str:
    return record["conversations"][0]["value"].replace("<image>", "").strip()


def _data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _messages(root, record: dict, image_url: str | None = None) -> list[dict]:
    url = image_url or _data_url(root / record["image"])
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": _question(record)}]}]


def _ask(client, root, record: dict, **kwargs):
    return client.chat.completions.create(model="tiny", messages=_messages(root, record), max_tokens=MAX_TOKENS,
                                          temperature=0, **kwargs)


@pytest.mark.parametrize("pyramid", ["saved", "none"])
def test_a_request_is_answered_as_dpn_chat_answers(root, client, pyramid):
    record = _records(root)[0]
    session = ChatSession(*load_model(str(root / "model"), pyramid), max_new_tokens=MAX_TOKENS)
    session.show(root / record["image"])
    expected = session.ask(_question(record))
    extra = {"extra_body": {"dpn": {"pyramid": "off"}}} if pyramid == "none" else {}
    response = _ask(client, root, record, **extra)
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.prompt_tokens == expected.prompt_tokens
    dpn = response.to_dict()["dpn"]
    assert dpn["visual_tokens"] == expected.visual_tokens
    assert dpn["flops_ratio"] == (None if expected.flops_ratio is None else pytest.approx(expected.flops_ratio))
    if pyramid == "saved":
        assert dpn["visual_tokens"][0] == 144 and dpn["flops_ratio"] < 1


def test_streaming_sends_the_same_answer_in_pieces(root, client):
    record = _records(root)[1]
    whole = _ask(client, root, record).choices[0]
    chunks = list(_ask(client, root, record, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].to_dict()["dpn"]["visual_tokens"][0] == 144


def test_concurrent_requests_run_batched_and_answer_as_alone(root, client):
    records = _records(root)
    alone = [_ask(client, root, r) for r in records]  # one at a time
    assert all(a.to_dict()["dpn"]["batch_size"] == 1 for a in alone)
    jobs = [records[i % SAMPLES] for i in range(CONCURRENT)]
    with ThreadPoolExecutor(CONCURRENT) as pool:
        together = list(pool.map(lambda r: _ask(client, root, r), jobs))
    assert len(together) == CONCURRENT
    for i, response in enumerate(together):
        expected = alone[i % SAMPLES]
        assert response.choices[0].message.content == expected.choices[0].message.content
        assert response.to_dict()["dpn"]["visual_tokens"] == expected.to_dict()["dpn"]["visual_tokens"]
    assert max(r.to_dict()["dpn"]["batch_size"] for r in together) > 1  # they did share batches


def test_local_images_only_inside_the_allowed_folder(root, client, tmp_path):
    record = _records(root)[0]
    inside = client.chat.completions.create(model="tiny", messages=_messages(root, record, record["image"]),
                                            max_tokens=MAX_TOKENS)
    assert inside.choices[0].message.content == _ask(client, root, record).choices[0].message.content
    outside = tmp_path / "x.png"
    outside.write_bytes((root / record["image"]).read_bytes())
    for url in (str(outside), f"file://{outside}", "../" * 8 + str(outside)):
        with pytest.raises(openai.BadRequestError, match="outside the allowed image folder"):
            client.chat.completions.create(model="tiny", messages=_messages(root, record, url), max_tokens=2)


class _Response:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self.body = status, body

    def json(self):
        return json.loads(self.body)


def _http(server, path: str, body: bytes | None = None) -> _Response:
    request = urllib.request.Request(f"{server.url}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return _Response(response.status, response.read())
    except urllib.error.HTTPError as err:
        return _Response(err.code, err.read())


def _post(server, body, raw: bool = False) -> _Response:
    return _http(server, "/v1/chat/completions", (body if raw else json.dumps(body)).encode())


def test_malformed_requests_get_4xx_errors_and_the_server_stays_healthy(root, server, client):
    record = _records(root)[0]
    image = {"type": "image_url", "image_url": {"url": _data_url(root / record["image"])}}
    good = {"model": "tiny", "messages": _messages(root, record), "max_tokens": 2}
    bad = {
        "not json": ("{", 400, "not JSON"),
        "a list": ([1, 2], 400, "JSON object"),
        "unknown model": ({**good, "model": "gpt-9"}, 404, "does not exist"),
        "no messages": ({"model": "tiny"}, 400, "non-empty list"),
        "empty messages": ({**good, "messages": []}, 400, "non-empty list"),
        "bad role": ({**good, "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        "assistant last": ({**good, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message"),
        "too many images": ({**good, "messages": [{"role": "user", "content": [image] * 5 + [
            {"type": "text", "text": "?"}]}]}, 400, "at most 4"),
        "missing image": ({**good, "messages": _messages(root, record, "images/none.png")}, 400, "no image at"),
        "remote image": ({**good, "messages": _messages(root, record, "https://example.com/a.png")}, 400, "remote"),
        "bad base64": ({**good, "messages": _messages(root, record, "data:image/png;base64,@@@")}, 400, "base64"),
        "not an image": ({**good, "messages": _messages(root, record, "data:image/png;base64,aGVsbG8=")}, 400,
                         "not a readable image"),
        "bad part": ({**good, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "parts must"),
        "prompt too long": ({**good, "max_tokens": 10 ** 6}, 400, "positions"),
        "zero tokens": ({**good, "max_tokens": 0}, 400, "at least 1"),
        "string tokens": ({**good, "max_tokens": "many"}, 400, "integer"),
        "hot": ({**good, "temperature": 5}, 400, "temperature"),
        "n=2": ({**good, "n": 2}, 400, "'n'"),
        "stop": ({**good, "stop": ["."]}, 400, "not supported"),
        "no model": ({"messages": good["messages"]}, 400, "'model' is required"),
        "unknown field": ({**good, "temprature": 0.5}, 400, "unrecognized request argument(s): temprature"),
        "frequency penalty": ({**good, "frequency_penalty": 0.5}, 400, "'frequency_penalty' other than 0"),
        "presence penalty": ({**good, "presence_penalty": -1}, 400, "'presence_penalty' other than 0"),
        "top_p": ({**good, "top_p": 0.9}, 400, "'top_p' other than 1"),
        "logit bias": ({**good, "logit_bias": {"5": 10}}, 400, "'logit_bias' is not supported"),
        "seed": ({**good, "seed": 3}, 400, "'seed' is not supported"),
        "seed 0": ({**good, "seed": 0}, 400, "'seed' is not supported"),
        "usage without stream": ({**good, "stream_options": {"include_usage": True}}, 400, "only allowed with stream"),
        "bad stream options": ({**good, "stream": True, "stream_options": {"usage": True}}, 400, "'stream_options'"),
        "NaN bias": ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "dpn": {"router_bias": NaN}}',
                     400, "finite number"),
        "bad pyramid choice": ({**good, "dpn": {"pyramid": "maybe"}}, 400, "dpn.pyramid"),
        "unknown dpn key": ({**good, "dpn": {"budget": 2}}, 400, "'dpn' must be"),
        "bias without pyramid": ({**good, "dpn": {"pyramid": "off", "router_bias": 1}}, 400, "pyramid on"),
        "placeholder mismatch": ({**good, "messages": [{"role": "user", "content": "<image> what?"}]}, 400,
                                 "placeholders"),
    }
    for name, (body, status, message) in bad.items():
        response = _post(server, body, raw=isinstance(body, str))
        assert response.status_code == status, name
        error = response.json()["error"]
        assert message in error["message"], (name, error)
        assert error["type"] == "invalid_request_error"
    assert _http(server, "/v1/nothing").status_code == 404
    assert _http(server, "/v1/chat/completions").status_code == 405
    assert _http(server, "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert _post(server, good).status_code == 200


def test_parameters_that_leave_the_answer_alone_are_accepted(root, client):
    record = _records(root)[3]
    plain = _ask(client, root, record).choices[0].message.content
    neutral = _ask(client, root, record, frequency_penalty=0, presence_penalty=0, top_p=1, n=1, logit_bias={},
                   stop=None, user="someone", metadata={"run": "a"})
    assert neutral.choices[0].message.content == plain


def test_a_stream_ends_with_the_usage_when_asked(root, client):
    record = _records(root)[4]
    whole = _ask(client, root, record)
    chunks = list(_ask(client, root, record, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.to_dict() == whole.usage.to_dict()
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    assert all(c.usage is None for c in _ask(client, root, record, stream=True))  # not asked: none sent


def test_router_bias_per_request_compresses_more(root, client):
    record = _records(root)[2]
    plain = _ask(client, root, record).to_dict()["dpn"]
    strong = _ask(client, root, record, extra_body={"dpn": {"router_bias": 100.0}}).to_dict()["dpn"]
    weak = _ask(client, root, record, extra_body={"dpn": {"router_bias": -100.0}}).to_dict()["dpn"]
    assert weak["flops_ratio"] > strong["flops_ratio"]
    assert weak["visual_tokens"][-1] > strong["visual_tokens"][-1]
    again = _ask(client, root, record).to_dict()["dpn"]  # the saved bias is back
    assert (again["visual_tokens"], again["flops_ratio"]) == (plain["visual_tokens"], plain["flops_ratio"])


class _BlockingAnswerer:
    """Answers only when released; says when a batch has started."""

    model = None

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()

    def answer(self, prepared, on_token=None):
        self.started.set()
        self.release.wait(30)
        return [Answer("ok", [1], "stop", 1, None, None, 0.0) for _ in prepared]


def test_a_full_queue_answers_503_and_nothing_is_lost():
    answerer = _BlockingAnswerer()
    batcher = Batcher(answerer, window_seconds=0, max_batch_size=8, max_queue=2)
    finished = []

    def job() -> Job:
        return Job(prepared=None, settings=Settings(pyramid=False), on_token=None,
                   finish=lambda answer, err, size: finished.append((answer.text, size)))

    batcher.submit(job())
    assert answerer.started.wait(30)  # the first batch runs (and blocks)
    batcher.submit(job())
    batcher.submit(job())
    with pytest.raises(RequestError) as refused:
        batcher.submit(job())
    assert refused.value.status == 503 and "--max-queue 2" in refused.value.message
    answerer.release.set()
    batcher.close()
    assert finished == [("ok", 1), ("ok", 2), ("ok", 2)]  # the two that waited ran as one batch


class _FailingOnceAnswerer:
    model = None

    def __init__(self) -> None:
        self.calls = 0

    def answer(self, prepared, on_token=None):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("out of memory")
        return [Answer("ok", [1], "stop", 1, None, None, 0.0) for _ in prepared]


def test_a_failed_batch_fails_its_requests_and_the_next_batch_runs():
    batcher = Batcher(_FailingOnceAnswerer(), window_seconds=0, max_batch_size=1, max_queue=4)
    outcomes = []
    for _ in range(2):
        batcher.submit(Job(prepared=None, settings=Settings(pyramid=False), on_token=None,
                           finish=lambda answer, err, size: outcomes.append(repr(err) if err else answer.text)))
    batcher.close()
    assert outcomes == ["RuntimeError('out of memory')", "ok"]


def test_sampling_follows_the_temperature(root):
    model, processor = load_model(str(root / "model"), "saved")
    answerer = Answerer(model, processor)
    record = _records(root)[0]
    from PIL import Image

    image = Image.open(root / record["image"]).convert("RGB")
    messages = [{"role": "user", "content": _question(record)}]
    greedy = answerer.prepare(Question(messages, [image], 4, temperature=0.0))
    hot = answerer.prepare(Question(messages, [image], 4, temperature=50.0))
    texts = {tuple(answerer.answer([greedy, hot])[1].token_ids) for _ in range(4)}
    assert len(texts) > 1  # a near-uniform temperature draws different tokens
    alone = answerer.answer([greedy])[0]
    assert all(answerer.answer([greedy, hot])[0].token_ids == alone.token_ids for _ in range(2))


def test_bad_serve_arguments_are_clear_errors(root, tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "no model at" in capsys.readouterr().err
    assert main(["serve", "--model", str(root / "model"), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--model", str(root / "model"), "--image-folder", str(tmp_path / "none")]) == 2
    assert "is not a directory" in capsys.readouterr().err



def test_serve_bench_reports_every_row(root, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["serve-bench", "--model", str(root / "model"), "--data", str(root / "test.json"),
                 "--concurrency", "1", "4", "--requests", "8", "--max-tokens", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["pyramid"], r["concurrency"]) for r in rows] == [("saved", 1), ("saved", 4), ("none", 1), ("none", 4)]
    for row in rows:
        assert row["requests"] == 8 and row["requests_per_second"] > 0 and row["p95_ms"] >= row["p50_ms"] > 0
    assert rows[0]["mean_batch"] == 1 and rows[2]["flops_ratio"] == 1.0 > rows[0]["flops_ratio"]
    assert "requests/s" in capsys.readouterr().out
    assert main(["serve-bench", "--model", str(root / "model"), "--data", str(root / "test.json"),
                 "--concurrency", "0"]) == 2
    assert "--concurrency must be at least 1" in capsys.readouterr().err


def test_serve_bench_measures_a_server_that_is_already_running(root, server, tmp_path, capsys):
    """--url: any OpenAI-compatible server (here a dpn serve started by the test, serving "tiny");
    the columns only dpn serve reports are left empty, as for vllm serve."""
    out = tmp_path / "bench.json"
    assert main(["serve-bench", "--url", server.url, "--model", "tiny", "--label", "running", "--data",
                 str(root / "test.json"), "--concurrency", "1", "3", "--requests", "6", "--max-tokens", "2",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["pyramid"], r["concurrency"]) for r in rows] == [("running", 1), ("running", 3)]
    assert all(r["requests"] == 6 and r["p95_ms"] >= r["p50_ms"] > 0 for r in rows)
    assert rows[0]["mean_batch"] == 1  # a dpn serve still reports its own fields
    assert main(["serve-bench", "--url", server.url, "--model", "tiny", "--data", str(root / "test.json"),
                 "--pyramid", "none"]) == 2
    assert "with --url the running server decides" in capsys.readouterr().err
