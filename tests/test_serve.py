"""The OpenAI-compatible server: a real `python -m anllm_jax.serve` on a free loopback port, driven by the `openai`
client (and raw HTTP where the client hides what is checked), against `anllm_jax.generate` as the reference.

The model is tiny and random, over a byte-level BPE trained here on a few sentences, with "." and a quarter of the
vocabulary as anchors, so greedy decoding generates anchors and the anchor cache compacts while other requests
share the batch.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from anllm_jax import anchors, checkpoints, kvcache, masks, serve
from anllm_jax import generate as gen_lib
from anllm_jax.config import preset
from anllm_jax.model import init_model
from anllm_jax.tokenizer import Tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = [
    "The cat sat on the mat. The dog ran home. Then a bird sang!",
    "Rain fell all night. The river rose. By morning the bridge was gone.",
    "Why is the sky blue? Light scatters. Short waves scatter more than long ones.",
]
SHORT = "The cat sat on the mat. The dog"  # one prefill chunk
LONG = " ".join(TEXT) + " The town"  # several chunks of PREFILL_CHUNK
PREFILL_CHUNK = 16
SLOTS, MAX_QUEUE = 4, 8
# One xdist worker runs the whole module, so the module-scoped server starts once per run.
pytestmark = pytest.mark.xdist_group("serve")


def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE of ~300 tokens trained on TEXT, with an end token and the chat template."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>", "<|im_start|>"], initial_alphabet=alphabet)
    bpe.train_from_iterator(TEXT * 10, trainer)
    return Tokenizer(bpe=bpe, eos_id=0, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    tok = tiny_tokenizer()
    anchor_ids = tuple(sorted({*tok.anchor_ids("ep"), *range(3, tok.vocab_size, 4)}))
    cfg = preset("tiny", vocab_size=tok.vocab_size, eos_id=0, anchor_mode="ep", anchor_ids=anchor_ids)
    path = str(tmp_path_factory.mktemp("serve") / "tiny")
    checkpoints.save(init_model(cfg, seed=3), tok, path)
    return path


def start_server(*args: str, timeout: float = 240) -> tuple[subprocess.Popen, str]:
    """A server subprocess and its base URL, read from the line it prints once it listens."""
    cmd = [sys.executable, "-m", "anllm_jax.serve", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            found = re.search(r"http://[\d.]+:\d+", proc.stdout.readline())
            if found:
                return proc, found.group(0)
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.stderr.read()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM shuts the server down gracefully (uvicorn then ends the process with that signal)."""
    proc.terminate()
    try:
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM), proc.stderr.read()[-3000:]
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    args = ["--checkpoint", tiny_checkpoint, "--slots", str(SLOTS), "--cache-memory", "2"]
    proc, url = start_server(*args, "--max-queue", str(MAX_QUEUE), "--prefill-chunk", str(PREFILL_CHUNK))
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return checkpoints.load(tiny_checkpoint)


def client(url: str, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def http(url: str, path: str, body: bytes | None = None) -> tuple[int, dict, str]:
    """Status, headers and body text of one plain HTTP call (POST when there is a body)."""
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def metric(url: str, name: str) -> float:
    """A value of /metrics; 0 for a labelled series not yet created."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", http(url, "/metrics")[2], re.M)
    return float(found.group(1)) if found else 0.0


def library(model, tok, ids: list[int], n: int, policy: str | masks.Policy = "anchor", **kw) -> gen_lib.Generation:
    return gen_lib.generate(model, [ids], policy=policy, max_new_tokens=n, stop_ids=[tok.eos_id], tokenizer=tok, **kw)


def assert_same_as(choice, want: gen_lib.Generation, tok: Tokenizer) -> None:
    """A completions choice (with logprobs) holds the library's tokens, log-probs, text and finish reason."""
    ids = [i for i in want.tokens[0] if i != tok.eos_id]
    assert choice.logprobs.tokens == [tok.decode([i]) for i in ids]
    np.testing.assert_allclose(choice.logprobs.token_logprobs, want.logprobs[0][: len(ids)], atol=1e-4)
    assert choice.text == want.text[0]
    assert choice.finish_reason == want.finish_reason[0]


def test_greedy_and_seeded_requests_equal_generate_whatever_else_is_in_the_batch(server, reference):
    """Greedy requests (one prefill chunk, and several chunks interleaved with decoding) and a seeded sampled one
    give the library's tokens while other requests of other lengths decode in the same batch."""
    model, tok = reference
    c = client(server)
    jobs = {
        "short": dict(prompt=SHORT, max_tokens=24, temperature=0),
        "long": dict(prompt=LONG, max_tokens=24, temperature=0),
        "seeded": dict(prompt=SHORT, max_tokens=24, temperature=0.9, top_p=0.8, seed=7),
    }
    others = [dict(prompt=t, max_tokens=40, temperature=1.0) for t in TEXT]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {k: pool.submit(c.completions.create, model="tiny", logprobs=1, **kw) for k, kw in jobs.items()}
        background = [pool.submit(c.completions.create, model="tiny", **kw) for kw in others]
        got = {k: f.result().choices[0] for k, f in futures.items()}
        assert all(f.result().choices[0].finish_reason in ("stop", "length") for f in background)
    short, long = (anchors.encode_prompt(p, tok, "ep") for p in (SHORT, LONG))
    assert len(short) <= PREFILL_CHUNK < 2 * PREFILL_CHUNK < len(long)
    assert_same_as(got["short"], library(model, tok, short, 24), tok)
    assert_same_as(got["long"], library(model, tok, long, 24, chunk_size=PREFILL_CHUNK), tok)
    assert_same_as(got["seeded"], library(model, tok, short, 24, temperature=0.9, top_p=0.8, seed=7), tok)
    generated = library(model, tok, short, 24).tokens[0] + library(model, tok, long, 24).tokens[0]
    assert set(generated) & set(model.cfg.anchor_ids)  # decoding met anchors: the batched cache compacted


@pytest.mark.parametrize("cache", ["full", "streaming:sinks=2,window=12"])
def test_full_and_bounded_cache_servers_equal_generate_with_that_cache(tiny_checkpoint, reference, cache):
    """The full cache; and a streaming cache in slots of 32 entries, fewer than the long prompt's tokens: a bounded
    policy admits any prompt whose prefill chunk fits, and its bound is passed many times over."""
    model, tok = reference
    long_ids = anchors.encode_prompt(LONG, tok, "ep")
    if cache == "full":
        policy, flags = "full", ("--cache", "full")
    else:
        policy = masks.parse_policy(cache)
        mib = (32 * 3 * kvcache.bytes_per_entry(model.cfg) + 1) / 2**20  # 2 slots + the prefill row, 32 entries
        flags = ("--cache", "streaming", "--sinks", "2", "--window", "12", "--slots", "2", "--cache-memory", str(mib))
    proc, url = start_server("--checkpoint", tiny_checkpoint, *flags, "--prefill-chunk", str(PREFILL_CHUNK))
    try:
        c = client(url)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            kw = dict(model="tiny", max_tokens=16, temperature=0, logprobs=1)
            short, long = pool.map(lambda p: c.completions.create(prompt=p, **kw).choices[0], (SHORT, LONG))
        health = json.loads(http(url, "/health")[2])
        if cache == "full":
            assert health["capacity"] >= len(long_ids)
        else:
            assert health["capacity"] == 32 < len(long_ids)
        assert health["active_slots"] == 0 and health["cache_entries"] == 0
    finally:
        stop_server(proc)
    assert_same_as(short, library(model, tok, anchors.encode_prompt(SHORT, tok, "ep"), 16, policy), tok)
    want = library(model, tok, long_ids, 16, policy, chunk_size=PREFILL_CHUNK)
    assert_same_as(long, want, tok)
    if cache != "full":
        assert want.stats["cache_entries"] <= policy.bound < len(long_ids) // 4


def test_greedy_request_equals_the_generate_cli(server, tiny_checkpoint):
    cmd = [sys.executable, "-m", "anllm_jax.generate", "--checkpoint", tiny_checkpoint, "--prompt", SHORT]
    out = subprocess.run([*cmd, "--max-new-tokens", "16", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    want = json.loads(out.stdout)
    got = client(server).completions.create(model="tiny", prompt=SHORT, max_tokens=16, temperature=0, logprobs=1)
    choice = got.choices[0]
    assert choice.text == want["text"] and choice.finish_reason == want["finish_reason"]
    np.testing.assert_allclose(
        choice.logprobs.token_logprobs, want["logprobs"][: len(choice.logprobs.tokens)], atol=1e-4
    )
    assert got.usage.prompt_tokens == want["prompt_tokens"] and got.usage.completion_tokens == len(want["tokens"])


def test_streaming_and_chat(server, reference):
    """Streamed deltas add up to the plain answer; chat renders the checkpoint's template; stop strings cut the
    text, streamed or not; the raw stream is server-sent events ending in [DONE]."""
    model, tok = reference
    c = client(server)
    plain = c.completions.create(model="tiny", prompt=SHORT, max_tokens=20, temperature=0).choices[0]
    chunks = list(c.completions.create(model="tiny", prompt=SHORT, max_tokens=20, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == plain.text
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == plain.finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1]) and len(chunks) > 2

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    ids = anchors.encode_prompt(serve.chat_renderer(CHAT_TEMPLATE, tok)(messages), tok, "ep")
    assert chat.choices[0].message.content == library(model, tok, ids, 12).text[0]
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens == len(ids)
    stream = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == chat.choices[0].message.content

    stop = plain.text[5:8]  # a stop string inside the greedy answer
    cut = plain.text[: plain.text.index(stop)]
    stopped = c.completions.create(model="tiny", prompt=SHORT, max_tokens=20, temperature=0, stop=[stop, "zzz"])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (cut, "stop")
    streamed = c.completions.create(model="tiny", prompt=SHORT, max_tokens=20, temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == cut

    body = json.dumps({"prompt": SHORT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}})
    status, headers, text = http(server, "/v1/completions", body.encode())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 3


def test_bad_requests_get_openai_errors_and_the_server_lives_on(server):
    too_long = json.dumps({"prompt": "The cat sat on the mat " * 200, "max_tokens": 4})
    cases = {
        b"{not json": None,
        b"[1, 2]": None,
        b'{"prompt": "hi", "max_tokens": "5"}': "max_tokens",
        b'{"prompt": "hi", "max_tokens": -3}': "max_tokens",
        b'{"prompt": "hi", "temperature": "hot"}': "temperature",
        b'{"prompt": "hi", "stream": 1}': "stream",
        b'{"prompt": "hi", "n": 2}': "n",
        b'{"prompt": [5, 100000]}': "prompt",
        b'{"max_tokens": 4}': "prompt",
        too_long.encode(): "prompt",
    }
    for body, param in cases.items():
        status, _, text = http(server, "/v1/completions", body)
        error = json.loads(text)["error"]
        assert status == 400 and set(error) == {"message", "type", "param", "code"}, (body, text)
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert "cache entries" in json.loads(http(server, "/v1/completions", too_long.encode())[2])["error"]["message"]
    status, _, text = http(server, "/v1/chat/completions", b'{"messages": []}')
    assert status == 400 and json.loads(text)["error"]["param"] == "messages"
    status, _, text = http(server, "/v1/completions", b'{"model": "other", "prompt": "hi"}')
    assert status == 404 and json.loads(text)["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(server).completions.create(model="tiny", prompt="hi", max_tokens=-1)
    assert http(server, "/health")[0] == 200
    assert client(server).models.list().data[0].id == "tiny"


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, reference):
    """While streaming, the anchor cache holds fewer entries than the prompt; closing the connection frees the slot
    long before max_tokens would have been reached."""
    before = metric(server, "anllm_generated_tokens_total")
    prompt = " ".join(TEXT * 3)
    body = json.dumps({"prompt": prompt, "max_tokens": 400, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(server + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.readline().startswith(b"data: ")
        health = json.loads(http(server, "/health")[2])
        assert health["active_slots"] == 1 and 0 < health["cache_entries"] < len(reference[1].encode(prompt))
    assert_slots_freed(server, before, 400)


def assert_slots_freed(url: str, generated_before: float, max_tokens: int) -> None:
    """Every slot frees within seconds, before its request generated max_tokens tokens."""
    deadline = time.monotonic() + 20
    while metric(url, "anllm_active_slots") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(url, "anllm_active_slots") == 0
    assert metric(url, "anllm_generated_tokens_total") - generated_before < max_tokens


def test_a_client_that_disconnects_while_waiting_for_a_plain_answer_frees_its_slot(server):
    before = metric(server, "anllm_generated_tokens_total")
    body = json.dumps({"prompt": " ".join(TEXT * 3), "max_tokens": 400, "temperature": 0}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        conn.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 20
        while not metric(server, "anllm_active_slots") and time.monotonic() < deadline:
            time.sleep(0.02)
    assert_slots_freed(server, before, 400)


def test_bounded_load_every_request_answers_or_gets_a_clean_429(server):
    """64 concurrent requests on 4 slots and a queue of 8: each ends with its whole answer or a 429 with
    Retry-After, within the time limit, and the slots and queue are empty afterwards."""
    c = client(server, timeout=90)

    def one(i: int) -> str:
        kw = dict(model="tiny", prompt=TEXT[i % 3], max_tokens=6, temperature=0.7, seed=i)
        try:
            if i % 2:
                chunks = list(c.completions.create(stream=True, **kw))
                assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            else:
                out = c.completions.create(**kw)
                assert out.choices[0].finish_reason in ("stop", "length") and 1 <= out.usage.completion_tokens <= 6
            return "ok"
        except openai.RateLimitError as e:
            assert e.response.headers["retry-after"] == "1" and e.body["code"] == "queue_full"
            return "429"

    rejected = 'anllm_requests_total{path="/v1/completions",status="429"}'
    rejected_before = metric(server, rejected)
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        outcomes = list(pool.map(one, range(64), timeout=150))
    assert time.monotonic() - start < 150
    assert outcomes.count("ok") + outcomes.count("429") == 64
    assert outcomes.count("ok") >= SLOTS + MAX_QUEUE and outcomes.count("429") > 0
    assert metric(server, rejected) - rejected_before == outcomes.count("429")
    assert metric(server, "anllm_active_slots") == 0 and metric(server, "anllm_queue_depth") == 0


def nan_copy(checkpoint: str, dest) -> str:
    """The checkpoint with a NaN in its weights, written with orbax directly (checkpoints.save refuses it)."""
    import shutil

    import orbax.checkpoint as ocp
    from flax import nnx

    model, _ = checkpoints.load(checkpoint)
    shutil.copytree(checkpoint, dest, ignore=shutil.ignore_patterns("params"))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["final_norm"] = params["final_norm"] * np.nan
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(str(dest / "params"), params)
    return str(dest)


def test_cli_bad_input_is_one_error_line(tiny_checkpoint, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = {
        ("--checkpoint", tiny_checkpoint, "--port", str(busy.getsockname()[1])): "pick another --port",
        ("--checkpoint", nan_copy(tiny_checkpoint, tmp_path / "nan")): "non-finite (NaN/Inf) parameters",
        ("--slots", "0"): "--slots=0 must be at least 1",
        ("--checkpoint", str(tmp_path / "missing")): "does not exist",
        ("--checkpoint", tiny_checkpoint, "--cache-memory", "0.001"): "raise --cache-memory",
        ("--checkpoint", tiny_checkpoint, "--chat-template", str(tmp_path / "none.jinja")): "--chat-template",
        ("--checkpoint", tiny_checkpoint, "--cache", "full", "--window", "8"): "--window applies to none",
        ("--checkpoint", tiny_checkpoint, "--cache", "sepllm", "--separators", "xyzzy-not-one-token"): "not one token",
    }
    for args, message in cases.items():
        out = subprocess.run([sys.executable, "-m", "anllm_jax.serve", *args], capture_output=True, text=True)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert lines[0].startswith("anllm_jax.serve: error: ") and message in lines[0]
    busy.close()


def test_real_smollm2_chat_equals_generate():
    """The packaged SmolLM2-135M-Instruct with "." anchors: its GGUF chat template drives chat, and a greedy answer
    is the library's."""
    model, tok = checkpoints.load("smollm2", dtype="float32")
    checkpoints.set_anchor_mode(model, tok, "ep")
    proc, url = start_server("--checkpoint", "smollm2", "--anchor-mode", "ep", "--dtype", "float32", "--slots", "2",
                             "--cache-memory", "64")  # fmt: skip
    try:
        messages = [{"role": "user", "content": "Name a colour. Answer in one word."}]
        got = client(url).chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
    finally:
        stop_server(proc)
    ids = anchors.encode_prompt(serve.chat_renderer(tok.chat_template, tok)(messages), tok, "ep")
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    want = library(model, tok, ids, 8)
    assert got.choices[0].message.content == want.text[0] and want.text[0].strip()


def test_the_chat_template_survives_native_and_hf_tokenizer_files(tmp_path):
    tok = tiny_tokenizer()
    tok.save(str(tmp_path / "native"))
    assert Tokenizer.load(str(tmp_path / "native")).chat_template == CHAT_TEMPLATE
    hf = tmp_path / "hf"
    tok.hf_tokenizer_files(str(hf))
    (hf / "anllm_tokenizer.json").unlink()  # read as an HF model directory: tokenizer_config.json
    assert Tokenizer.load(str(hf)).chat_template == CHAT_TEMPLATE
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 1 }}"}]
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.load(str(hf)).chat_template == "{{ 1 }}"
    (hf / "chat_template.jinja").write_text("{{ 2 }}")
    assert Tokenizer.load(str(hf)).chat_template == "{{ 2 }}"
    tok.chat_template = None
    tok.save(str(tmp_path / "plain"))
    assert Tokenizer.load(str(tmp_path / "plain")).chat_template is None
