"""The Triton model's continuous batching (Scheduler), run on a tiny random GPT-2 without Triton.

Each test feeds fake requests to a Scheduler of a host standing for TritonPythonModel and compares
what every request got in a batch with what the same request gets alone.
"""

from __future__ import annotations

import itertools
import string
import threading
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402

from bench.engines import load_model_module  # noqa: E402

FINAL = 1
WAIT_S = 60
VOCAB = string.ascii_letters + string.digits + "_-"  # 64 single-character tokens: decode joins them with spaces
NEVER = -1  # an eos id no model emits


# --- a stand-in for Triton's triton_python_backend_utils ---------------------------------------


class FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


class FakeResponse:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors, error


class FakeError:
    def __init__(self, message):
        self.message = message

    def __str__(self):
        return self.message


def _fake_pb_utils() -> types.ModuleType:
    fake = types.ModuleType("triton_python_backend_utils")
    fake.get_input_tensor_by_name = lambda request, name: (
        None if request.inputs.get(name) is None else FakeTensor(name, request.inputs[name])
    )
    fake.Tensor = FakeTensor
    fake.InferenceResponse = FakeResponse
    fake.TritonError = FakeError
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    return fake


@pytest.fixture(scope="module")
def model_module() -> types.ModuleType:
    # Import model.py under a name of its own with the fake in sys.modules, then put back whatever
    # was there (test_foreground installs an empty module of the same name), in either order.
    fake = _fake_pb_utils()
    module = load_model_module(fake, "triton_model_scheduler_under_test")
    module.pb_utils = fake
    return module


# --- fake requests -------------------------------------------------------------------------------


class Sender:
    """Records (tokens, finish_reason, flags, error) of each response; `final` is set on the last."""

    def __init__(self, hook=None):
        self.responses, self.final, self.after_final, self.hook = [], threading.Event(), 0, hook

    def send(self, response=None, flags=0):
        if self.final.is_set():
            self.after_final += 1
        if response.error is not None:
            self.responses.append(([], "", flags, str(response.error)))
        else:
            tensors = {t.name: t.as_numpy() for t in response.output_tensors}
            finish = tensors["FINISH_REASON"].reshape(-1)[0]
            self.responses.append((tensors["TOKEN_IDS"].tolist(), finish.decode(), flags, None))
        if flags & FINAL:
            self.final.set()
        if self.hook is not None:
            self.hook(self)

    @property
    def tokens(self):
        return [token for response in self.responses for token in response[0]]

    @property
    def finish(self):
        return self.responses[-1][1]

    @property
    def error(self):
        return self.responses[-1][3]


class Request:
    def __init__(
        self,
        prompt,
        max_tokens=24,
        temperature=0.0,
        top_p=1.0,
        seed=0,
        stop=None,
        stream=True,
        background=False,
        cancel_after=None,
        hook=None,
    ):
        self.args = dict(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            stream=stream,
            background=background,
            cancel_after=cancel_after,
        )
        self.inputs = {
            "INPUT_IDS": np.asarray(prompt, dtype=np.int32),
            "MAX_TOKENS": np.array([max_tokens], dtype=np.int32),
            "TEMPERATURE": np.array([temperature], dtype=np.float32),
            "TOP_P": np.array([top_p], dtype=np.float32),
            "SEED": np.array([seed], dtype=np.uint64),
            "STOP": None if stop is None else np.array([s.encode() for s in stop], dtype=np.object_),
            "STREAM": np.array([stream], dtype=bool),
            "BACKGROUND": np.array([background], dtype=bool),
        }
        self.cancel_after = cancel_after
        self.sender = Sender(hook)

    def clone(self, **changes):
        return Request(**{**self.args, **changes})

    def get_response_sender(self):
        return self.sender

    def is_cancelled(self):
        return self.cancel_after is not None and len(self.sender.tokens) >= self.cancel_after


def _prompt(seed, length):
    return np.random.default_rng(seed).integers(0, len(VOCAB), size=length).tolist()


# --- the host: what TritonPythonModel.initialize sets, without Triton ------------------------------


class Recorder:
    """The model, recording each forward: ("decode", batch size) for a batch's step (a mask over a
    cache), ("prefill", token positions) for a prefill (a prompt piece alone, or whole prompts
    left-padded together: rows x width)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, input_ids, **kwargs):
        if "attention_mask" in kwargs and kwargs.get("past_key_values") is not None:
            self.calls.append(("decode", input_ids.shape[0]))
        else:
            self.calls.append(("prefill", input_ids.numel()))
        return self.model(input_ids=input_ids, **kwargs)

    def decodes(self):
        return [size for kind, size in self.calls if kind == "decode"]


@pytest.fixture(scope="module")
def tiny(tiny_gpt2):
    assert tiny_gpt2.config.vocab_size == len(VOCAB)
    return tiny_gpt2, Tokenizer(WordLevel(vocab={c: i for i, c in enumerate(VOCAB)}, unk_token="-"))


@pytest.fixture
def make_host(model_module, tiny, tmp_path):
    model, tokenizer = tiny
    serial = itertools.count()

    def make(eos_id=NEVER):
        folder = tmp_path / f"host{next(serial)}"
        host = model_module.TritonPythonModel.__new__(model_module.TritonPythonModel)
        host.model = Recorder(model)
        host.tokenizer = tokenizer
        host.device = torch.device("cpu")
        host.eos_id = eos_id
        host.context = model.config.n_positions
        host.foreground = model_module.Foreground(str(folder / ".foreground"))
        host.tally = model_module.Tally(str(folder / ".tally"), "tiny-v1")
        host.serving, host.serving_lock = 0, threading.Lock()
        host.background_niceness = 15
        host.threads, host.scheduler, host.mirrors = [], None, None
        return host

    return make


def _run(module, host, requests, max_batch=16, prefill_tokens=256, later=()):
    """Hand `requests` to the host's schedulers (the clients' and the mirrors') before their threads
    start (so that they meet in the first turn), wait for every final response (of `later` too:
    requests that hooks submit meanwhile), stop them."""
    host.scheduler = module.Scheduler(host, max_batch, prefill_tokens)
    host.mirrors = module.Scheduler(host, max_batch, prefill_tokens, background=True)
    host.execute(requests)
    host.scheduler.start()
    host.mirrors.start()
    try:
        for request in [*requests, *later]:
            assert request.sender.final.wait(WAIT_S), f"no final response for {request.args}"
    finally:
        host.scheduler.stop()
        host.mirrors.stop()
    assert not host.scheduler.is_alive() and not host.mirrors.is_alive()


@pytest.fixture
def alone(model_module, make_host):
    """The tokens and finish reason of a request (a copy of it) run by a scheduler of its own."""

    def run(request, eos_id=NEVER, **changes):
        copy = request.clone(**changes)
        _run(model_module, make_host(eos_id), [copy], prefill_tokens=1024)
        return copy.sender.tokens, copy.sender.finish

    return run


def _lone(module, host, request):
    """The one-request path (max_batch 0) of a copy of `request`, not streamed: (tokens, finish)."""
    seq = module.Sequence(request.clone(stream=False), host)
    finish = host._generate(seq)
    return seq.generated, finish


# --- the tests -------------------------------------------------------------------------------------


def test_greedy_batch_gives_every_request_its_lone_tokens(model_module, make_host, alone):
    lengths = np.random.default_rng(0).permutation(np.linspace(3, 40, 12).astype(int))  # rows join shorter and longer
    requests = [Request(_prompt(i, int(n)), max_tokens=24) for i, n in enumerate(lengths)]
    expected = [alone(request) for request in requests]
    for request in requests[::5]:  # the one-request path (max_batch 0) agrees
        assert _lone(model_module, make_host(), request) == (expected[requests.index(request)][0], "length")

    host = make_host()
    _run(model_module, host, requests, max_batch=16)

    for request, (tokens, finish) in zip(requests, expected, strict=True):
        assert (request.sender.tokens, request.sender.finish) == (tokens, finish)
        assert len(tokens) == 24
    assert max(host.model.decodes()) > 4  # they were stepped together
    assert host.tally.generated == 12 * 24


def test_sampled_tokens_follow_each_request_seed(model_module, make_host):
    def batch(seeds):
        requests = [
            Request(_prompt(10 + i, 5 + 3 * i), max_tokens=16, temperature=0.9, top_p=0.9, seed=seed)
            for i, seed in enumerate(seeds)
        ]
        _run(model_module, make_host(), requests)
        return [request.sender.tokens for request in requests]

    first, again = batch(range(1, 7)), batch(range(1, 7))
    other = batch(range(101, 107))
    assert first == again
    assert all(len(tokens) == 16 for tokens in first)
    assert sum(a != b for a, b in zip(first, other, strict=True)) >= 1
    assert len({tuple(tokens) for tokens in first + other}) > 1


def test_each_request_ends_on_its_own_without_disturbing_the_others(model_module, make_host, alone, monkeypatch):
    monkeypatch.setattr(model_module, "CANCEL_CHECK_S", 0.0)  # look at is_cancelled() every step
    # Lone greedy runs of a pool of prompts: one whose 3rd token is new gives the eos id; the prompts
    # that never emit it serve the other ends.
    pool = [_prompt(100 + i, 4 + i % 9) for i in range(24)]
    runs = []
    for prompt in pool:
        runs.append(_lone(model_module, make_host(), Request(prompt, max_tokens=12))[0])
    eos_index = next((i for i, run in enumerate(runs) if run[2] not in run[:2]), None)
    assert eos_index is not None, "no prompt emits a new token third"
    eos = runs[eos_index][2]
    clean = [i for i, run in enumerate(runs) if eos not in run]
    assert len(clean) >= 5, "too few prompts never emit the eos token"
    cancel_i, stop_i, length_i, *others = clean[:5]
    stop_token = runs[stop_i][2]
    stop_at = runs[stop_i].index(stop_token)

    host = make_host(eos)
    eos_req = Request(pool[eos_index], max_tokens=12)
    cancel_req = Request(pool[cancel_i], max_tokens=12, cancel_after=3)
    stop_req = Request(pool[stop_i], max_tokens=12, stop=["", VOCAB[stop_token]])
    length_req = Request(pool[length_i], max_tokens=2)
    other_reqs = [Request(pool[i], max_tokens=12) for i in others]
    expected_others = [alone(request, eos_id=eos) for request in other_reqs]

    _run(model_module, host, [eos_req, cancel_req, stop_req, length_req, *other_reqs])

    assert (eos_req.sender.tokens, eos_req.sender.finish) == (runs[eos_index][:2], "eos")
    assert (cancel_req.sender.tokens, cancel_req.sender.finish) == (runs[cancel_i][:3], "cancelled")
    assert cancel_req.sender.after_final == 0
    assert (stop_req.sender.tokens, stop_req.sender.finish) == (runs[stop_i][: stop_at + 1], "stop")
    assert (length_req.sender.tokens, length_req.sender.finish) == (runs[length_i][:2], "length")
    for i, request, expected in zip(others, other_reqs, expected_others, strict=True):
        assert (request.sender.tokens, request.sender.finish) == expected == (runs[i], "length")
    everyone = [eos_req, cancel_req, stop_req, length_req, *other_reqs]
    assert all(request.sender.after_final == 0 for request in everyone)
    assert max(host.model.decodes()) == 6
    assert host.tally.cancelled == 1
    assert host.tally.generated == sum(len(request.sender.tokens) for request in everyone)


def test_streaming_sends_each_token_and_not_streaming_sends_them_all_at_the_end(model_module, make_host):
    streamed = Request(_prompt(200, 7), max_tokens=8, stream=True)
    whole = Request(_prompt(200, 7), max_tokens=8, stream=False)
    _run(model_module, make_host(), [streamed, whole])

    tokens = whole.sender.tokens
    assert len(tokens) == 8
    assert streamed.sender.responses == [([token], "", 0, None) for token in tokens] + [([], "length", FINAL, None)]
    assert whole.sender.responses == [(tokens, "length", FINAL, None)]


def test_at_most_max_batch_run_and_the_rest_wait(model_module, make_host, alone):
    requests = [Request(_prompt(300 + i, 20 - 2 * i), max_tokens=10) for i in range(8)]  # later ones join shorter
    expected = [alone(request) for request in requests]
    host = make_host()
    occupancy = []  # what the clients' scheduler reports to the infer service's metrics, each turn
    host.tally.occupancy = lambda source, *counts: source == "llmesh-scheduler" and occupancy.append(counts)
    _run(model_module, host, requests, max_batch=3)

    for request, (tokens, finish) in zip(requests, expected, strict=True):
        assert (request.sender.tokens, request.sender.finish) == (tokens, finish)
    decodes = host.model.decodes()
    assert max(decodes) == 3
    assert sum(decodes) == 8 * 9  # each request's first token comes from its prefill
    assert occupancy[0] == (8, 0)  # all submitted before the first turn
    assert (5, 3) in occupancy and max(running for _, running in occupancy) == 3


def test_prompts_arriving_together_are_prefilled_in_one_pass(model_module, make_host, alone):
    requests = [Request(_prompt(800 + i, 5 + i), max_tokens=6, stream=i % 2 == 0) for i in range(6)]
    expected = [alone(request) for request in requests]
    host = make_host()
    _run(model_module, host, requests)

    assert [call for call in host.model.calls if call[0] == "prefill"] == [("prefill", 6 * 10)]  # left-padded to 10
    for request, answer in zip(requests, expected, strict=True):
        assert (request.sender.tokens, request.sender.finish) == answer


def test_padding_counts_against_the_prefill_budget(model_module, make_host, alone):
    short, long = Request(_prompt(820, 2), max_tokens=4), Request(_prompt(821, 12), max_tokens=4)
    expected = [alone(short), alone(long)]
    host = make_host()
    _run(model_module, host, [short, long], prefill_tokens=16)

    # together they would cost 2 x 12 = 24 positions, over the budget: the long one is prefilled alone
    assert host.model.calls[:3] == [("prefill", 12), ("prefill", 2), ("decode", 2)]
    assert [(request.sender.tokens, request.sender.finish) for request in (short, long)] == expected


def test_a_long_prompt_joins_in_pieces_between_the_running_steps(model_module, make_host, alone):
    long = Request(_prompt(400, 100), max_tokens=8)

    def join(sender):  # the long request arrives while the short ones decode
        if len(sender.tokens) == 3 and not sender.final.is_set():  # once: the response with its 3rd token
            host.scheduler.submit(long)

    shorts = [Request(_prompt(410 + i, n), max_tokens=40, hook=join if i == 0 else None) for i, n in enumerate((3, 4, 4, 4))]
    expected_long = alone(long)
    expected_shorts = [alone(request) for request in shorts]
    assert _lone(model_module, make_host(), long)[0] == expected_long[0]

    host = make_host()
    _run(model_module, host, shorts, prefill_tokens=16, later=[long])

    calls = host.model.calls
    assert calls[:2] == [("prefill", 4 * 4), ("decode", 4)]  # the four short prompts, one pass (16 positions)
    between = 0
    for kind, size in calls[1:]:
        if kind == "decode":
            assert between <= 16
            between = 0
        else:
            between += size
    pieces = [i for i, (kind, _) in enumerate(calls) if i >= 1 and kind == "prefill"]
    assert sum(calls[i][1] for i in pieces) == 100
    assert len(pieces) == 7
    assert all(calls[i + 1] == ("decode", 4) for i in pieces[:-1])  # the others kept stepping meanwhile
    assert calls[pieces[-1] + 1] == ("decode", 5)
    assert (long.sender.tokens, long.sender.finish) == expected_long
    for request, expected in zip(shorts, expected_shorts, strict=True):
        assert (request.sender.tokens, request.sender.finish) == expected


def test_mirrors_wait_while_client_requests_run(model_module, make_host, alone, monkeypatch):
    monkeypatch.setattr(model_module, "YIELD_MAX_S", 3600.0)  # a mirror never forces its turn
    sent = []  # whose response each send was, in order
    clients = [Request(_prompt(500 + i, 4 + i), max_tokens=8, hook=lambda _: sent.append("client")) for i in range(3)]
    mirror = Request(_prompt(510, 6), max_tokens=8, background=True, hook=lambda _: sent.append("mirror"))
    expected = alone(mirror, background=False)
    host = make_host()
    _run(model_module, host, [*clients, mirror])

    assert sent == ["client"] * 3 * 9 + ["mirror"] * 9  # 8 tokens and a final response each
    assert (mirror.sender.tokens, mirror.sender.finish) == expected
    assert host.foreground.count == 0


def test_a_mirror_still_steps_while_a_client_request_runs(model_module, make_host, alone, monkeypatch):
    monkeypatch.setattr(model_module, "YIELD_MAX_S", 0.0)  # its turn is forced every time
    mirror = Request(_prompt(520, 6), max_tokens=8, background=True)

    def hold(sender):  # the client's first token waits for the mirror's end: the client stays busy meanwhile
        if len(sender.responses) == 1:
            assert mirror.sender.final.wait(WAIT_S), "the mirror starved"

    client = Request(_prompt(521, 5), max_tokens=4, hook=hold)
    expected = alone(mirror, background=False)
    _run(model_module, make_host(), [client, mirror])

    assert (mirror.sender.tokens, mirror.sender.finish) == expected
    assert (len(client.sender.tokens), client.sender.finish) == (4, "length")


def test_an_invalid_request_gets_an_error_and_the_scheduler_goes_on(model_module, make_host):
    host = make_host()
    scheduler = model_module.Scheduler(host, 4, 64)
    scheduler.start()
    try:
        invalid = Request([], max_tokens=4)
        scheduler.submit(invalid)
        assert invalid.sender.final.wait(WAIT_S)
        assert invalid.sender.responses == [([], "", FINAL, "generation failed: INPUT_IDS is empty")]
        valid = Request(_prompt(600, 5), max_tokens=4)
        scheduler.submit(valid)
        assert valid.sender.final.wait(WAIT_S)
        assert (len(valid.sender.tokens), valid.sender.finish) == (4, "length")
        assert scheduler.is_alive()
    finally:
        scheduler.stop()


def test_the_one_thread_path_answers_as_the_scheduler_does(model_module, make_host, alone, monkeypatch):
    monkeypatch.setattr(model_module, "CANCEL_CHECK_S", 0.0)  # look at is_cancelled() every token
    requests = [Request(_prompt(700 + i, 6 + i), max_tokens=10, stream=i % 2 == 0) for i in range(4)]
    expected = [alone(request) for request in requests]
    cancelled = Request(_prompt(710, 6), max_tokens=40, cancel_after=3)
    invalid = Request([], max_tokens=4)
    host = make_host()  # no scheduler: max_batch 0, a thread per request
    host.execute([*requests, cancelled, invalid])
    for request in [*requests, cancelled, invalid]:
        assert request.sender.final.wait(WAIT_S), f"no final response for {request.args}"
    host.finalize()

    for request, answer in zip(requests, expected, strict=True):
        assert (request.sender.tokens, request.sender.finish) == answer
    assert (len(cancelled.sender.tokens), cancelled.sender.finish) == (3, "cancelled")
    assert invalid.sender.responses == [([], "", FINAL, "generation failed: INPUT_IDS is empty")]
    assert host.serving == 0
    assert (host.tally.cancelled, host.tally.generated) == (1, 4 * 10 + 3)


def test_requests_held_when_the_model_is_unloaded_get_a_final_error(model_module, make_host):
    """Triton finalizes the model (an unload) with requests queued or running: each ends at once with
    an error instead of leaving its client to wait for the deadline."""
    host = make_host()
    scheduler = model_module.Scheduler(host, 4, 64)
    held = [Request(_prompt(800 + i, 5), max_tokens=4) for i in range(3)]
    for request in held:
        scheduler.submit(request)  # never started: all still in the inbox
    scheduler.stopping = True
    scheduler.start()
    scheduler.stop()

    for request in held:
        assert request.sender.final.is_set(), f"no final response for {request.args}"
        assert "unloaded" in request.sender.responses[-1][3]
    assert host.foreground.count == 0
