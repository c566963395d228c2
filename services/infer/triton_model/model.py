"""Triton Python-backend model: streams tokens from any local Hugging Face causal LM (decoupled mode).

Copied by the infer service into each model version's directory of the Triton repository, beside
`hf/` (the version's artifacts). Self-contained: it imports only torch, transformers, tokenizers,
numpy and Triton's backend utilities.

Inputs:  INPUT_IDS int32[-1], MAX_TOKENS int32[1], TEMPERATURE fp32[1] (0 = greedy), TOP_P fp32[1],
         SEED uint64[1], STOP string[-1], STREAM bool[1] (default true), BACKGROUND bool[1] (default
         false: a mirrored request, which yields the CPU to the others) (all optional but INPUT_IDS)
Outputs: streaming, one response per generated token with TOKEN_IDS int32[1], then a final response
         with TOKEN_IDS int32[0] and FINISH_REASON ("length", "stop" or "eos"); not streaming, only
         the final response, carrying every generated token (each response costs the backend an IPC
         round trip, several times the compute of one token of a small model).
Tally:   each stub counts the tokens it generated, the requests it stopped on a cancel and the
         sequences queued and running now in a file of its own (see Tally), which the infer
         service exports as metrics: a cancel that did not stop the generation, or a queue, shows.
Batching (parameter max_batch > 0, the default 32): one scheduler thread steps every running client
         sequence in one forward pass (continuous batching, see Scheduler), another, of lower CPU
         priority, the mirrored ones; max_batch 0: one thread per request, each its own batch of
         one (the model before batching, kept to compare).
"""

import contextlib
import json
import mmap
import os
import queue
import struct
import threading
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

CANCEL_CHECK_S = 0.05
YIELD_POLL_S = 0.002
YIELD_MAX_S = 0.05  # a background request still makes a token this often, so it never starves


class Every:
    def __init__(self, seconds, wait_first=False):
        self.seconds, self.next = seconds, time.monotonic() + seconds if wait_first else 0.0

    def due(self):
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + self.seconds
        return True


class Foreground:
    """Foreground requests running now, across the stubs sharing a Triton repository.

    A background request (a mirrored copy for a shadow candidate) runs on a thread of lower CPU
    priority and waits between tokens while any foreground request runs (up to YIELD_MAX_S per
    token), so that it mostly uses CPU the clients' requests leave idle: niceness alone still lets it
    share the cores with them. Each stub publishes its own count in a small memory-mapped file named
    after its pid; stale files of dead stubs are removed by the next stub that looks.
    """

    def __init__(self, folder):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.lock, self.count = folder, threading.Lock(), 0
        path = os.path.join(folder, str(os.getpid()))
        with open(path, "wb") as f:
            f.write(bytes(8))
        with open(path, "r+b") as f:
            self.mine = mmap.mmap(f.fileno(), 8)
        self.others, self.refreshed = {}, 0.0

    def enter(self, delta):
        with self.lock:
            self.count += delta
            self.mine[:8] = struct.pack("q", self.count)

    def busy(self):
        now = time.monotonic()
        if now - self.refreshed > 1.0:
            self._refresh()
            self.refreshed = now
        return any(struct.unpack("q", view[:8])[0] > 0 for view in self.others.values())

    def _refresh(self):
        for name in os.listdir(self.folder):
            if name == str(os.getpid()) or name in self.others:
                continue
            path = os.path.join(self.folder, name)
            if not os.path.exists(f"/proc/{name}"):
                os.unlink(path)
                continue
            with open(path, "rb") as f:
                self.others[name] = mmap.mmap(f.fileno(), 8, access=mmap.ACCESS_READ)
        self.others = {name: view for name, view in self.others.items() if os.path.exists(f"/proc/{name}")}


def _scalar(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0].item()


def _stop_strings(request):
    tensor = pb_utils.get_input_tensor_by_name(request, "STOP")
    if tensor is None:
        return []
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in tensor.as_numpy().reshape(-1)]


class Tally:
    """What this stub computed and holds: `<folder>/<model>.<pid>` holds four int64, the tokens it
    generated, the requests it stopped on a cancel (both counters), the sequences queued (waiting for
    a place in the batch or for their prefill) and those running (both now), updated in place
    (memory-mapped). Triton's custom metrics API costs an IPC round trip per update, and a stub
    crashed when models sharing a metric family were unloaded; a file costs neither. Files of stubs
    that ended stay: the counters are the repository's (the infer service skips their gauges)."""

    def __init__(self, folder, model_name):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{model_name}.{os.getpid()}")
        with open(path, "wb") as f:
            f.write(bytes(32))
        with open(path, "r+b") as f:
            self.view = mmap.mmap(f.fileno(), 32)
        self.lock, self.generated, self.cancelled = threading.Lock(), 0, 0
        self.occupied = {}  # who reports (a scheduler, the threads) -> (queued, running)

    def add(self, tokens, cancelled):
        with self.lock:
            self.generated += tokens
            self.cancelled += cancelled
            self.view[:16] = struct.pack("qq", self.generated, self.cancelled)

    def occupancy(self, source, queued, running):
        with self.lock:
            self.occupied[source] = (queued, running)
            self.view[16:32] = struct.pack("qq", *map(sum, zip(*self.occupied.values(), strict=True)))


def _response(token_ids, finish_reason=""):
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("TOKEN_IDS", np.asarray(token_ids, dtype=np.int32)),
            pb_utils.Tensor("FINISH_REASON", np.array([finish_reason.encode()], dtype=np.object_)),
        ]
    )


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        hf_dir = params.get("hf_dir") or os.path.join(args["model_repository"], args["model_version"], "hf")
        threads = int(params.get("torch_threads", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{args.get('model_instance_device_id', 0)}" if gpu else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir).to(self.device).eval()
        self.tokenizer = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
        cfg = self.model.config
        self.eos_id = cfg.eos_token_id
        self.context = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 2048)
        self.background_niceness = int(params.get("background_niceness", "15") or 0)
        self.threads = []
        shared = os.path.dirname(args["model_repository"])
        self.foreground = Foreground(os.path.join(shared, ".foreground"))
        self.tally = Tally(os.path.join(shared, ".tally"), args["model_name"])
        self.serving, self.serving_lock = 0, threading.Lock()  # requests running (one-thread path)
        max_batch = int(params.get("max_batch", "32") or 0)
        self.scheduler = self.mirrors = None
        if max_batch > 0:
            prefill_tokens = int(params.get("prefill_tokens", "256") or 256)
            self.scheduler = Scheduler(self, max_batch, prefill_tokens)
            self.mirrors = Scheduler(self, max_batch, prefill_tokens, background=True)
            self.scheduler.start()
            self.mirrors.start()

    def execute(self, requests):
        for request in requests:
            if self.scheduler is not None:
                (self.mirrors if _scalar(request, "BACKGROUND", False) else self.scheduler).submit(request)
                continue
            thread = threading.Thread(target=self._serve, args=(request,), daemon=True)
            thread.start()
            self.threads.append(thread)
        self.threads = [t for t in self.threads if t.is_alive()]
        return None

    def _serve(self, request):
        try:
            seq = Sequence(request, self)
        except Exception as err:  # report to the client instead of killing the stub
            pb_utils_error(request.get_response_sender(), err)
            return
        if seq.background:
            os.setpriority(os.PRIO_PROCESS, 0, self.background_niceness)  # on Linux: this thread only
        else:
            self.foreground.enter(1)
        self._count_serving(1)
        finish = ""
        try:
            finish = self._generate(seq)
            final = [] if seq.stream else seq.generated  # streamed tokens were sent one by one already
            seq.sender.send(_response(final, finish), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as err:
            pb_utils_error(seq.sender, err)
        finally:
            self.tally.add(len(seq.generated), finish == "cancelled")
            self._count_serving(-1)
            if not seq.background:
                self.foreground.enter(-1)

    def _count_serving(self, delta):
        with self.serving_lock:
            self.serving += delta
            self.tally.occupancy("threads", 0, self.serving)

    @torch.inference_mode()
    def _generate(self, seq):
        """Generate `seq` alone, a batch of one; return the finish reason."""
        if seq.budget <= 0:
            return "length"
        x = torch.tensor([seq.prompt], device=self.device)
        past = None
        while True:
            if not self._take_turn(seq):
                return "cancelled"
            out = self.model(input_ids=x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = self._sample(out.logits[0, -1, :].float(), seq.temperature, seq.top_p, seq.generator)
            finish = seq.take(token, self)
            if finish:
                return finish
            x = torch.tensor([[token]], device=self.device)

    def _take_turn(self, seq):
        """Wait until `seq` may compute its next token; False when it was cancelled."""
        give_up = time.monotonic() + YIELD_MAX_S
        while True:
            if seq.cancelled():
                return False
            if not seq.background or time.monotonic() >= give_up or not self.foreground.busy():
                return True
            time.sleep(YIELD_POLL_S)

    @staticmethod
    def _sample(logits, temperature, top_p, generator):
        if temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p
            sorted_probs = sorted_probs * keep
            choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=generator))

    def _hit_stop(self, generated, stops):
        tail = self.tokenizer.decode(generated[-32:])
        return any(stop in tail for stop in stops)

    def finalize(self):
        if self.scheduler is not None:
            self.scheduler.stop()
            self.mirrors.stop()
        for thread in self.threads:
            thread.join(timeout=10)
        for source in list(self.tally.occupied):
            self.tally.occupancy(source, 0, 0)


class Sequence:
    """One request in the scheduler: its sampling, its own generator, what it generated."""

    def __init__(self, request, model):
        self.request = request
        self.sender = request.get_response_sender()
        self.stream = bool(_scalar(request, "STREAM", True))
        self.background = bool(_scalar(request, "BACKGROUND", False))
        ids = pb_utils.get_input_tensor_by_name(request, "INPUT_IDS").as_numpy().reshape(-1).astype(np.int64)
        if ids.size == 0:
            raise ValueError("INPUT_IDS is empty")
        self.prompt = ids.tolist()
        self.budget = min(int(_scalar(request, "MAX_TOKENS", 16)), model.context - ids.size)
        self.temperature = float(_scalar(request, "TEMPERATURE", 1.0))
        self.top_p = float(_scalar(request, "TOP_P", 1.0))
        seed = int(_scalar(request, "SEED", 0)) % (2**63)
        self.generator = torch.Generator(device=model.device).manual_seed(seed)
        self.stops = [s for s in _stop_strings(request) if s]
        self.generated = []
        self.prefilled = 0  # prompt tokens in its cache so far (a long prompt is prefilled in pieces)
        self.cache = None  # its own cache while prefilling; then its row of the batch's
        self.length = 0  # tokens in the cache
        # is_cancelled() is a blocking round trip to tritonserver, dearer than a token: ask now and then.
        self.cancel_check = Every(CANCEL_CHECK_S)

    def cancelled(self):
        return self.cancel_check.due() and self.request.is_cancelled()

    def take(self, token, model):
        """Add `token` (streamed to the client at once); the finish reason when the sequence ended
        with it, '' while it goes on."""
        if token == model.eos_id:
            return "eos"
        self.generated.append(token)
        if self.stream:
            self.sender.send(_response([token]))
        if self.stops and model._hit_stop(self.generated, self.stops):
            return "stop"
        if len(self.generated) >= self.budget:
            return "length"
        return ""


class Batch:
    """Running sequences and one KV cache for them all, left-padded to a common length; `mask`
    marks the real positions. Rows join (padded to the batch's length, or the batch to theirs) and
    leave (dropped; columns that are padding in every row are cut) between steps."""

    def __init__(self):
        self.seqs, self.cache, self.mask = [], None, None

    def __len__(self):
        return len(self.seqs)

    @classmethod
    def prefilled(cls, model, seqs, device):
        """A batch of `seqs` whose whole prompts went through one forward pass together (left-padded,
        as `generate` does), and the logits of each row's first token."""
        width = max(len(seq.prompt) for seq in seqs)
        ids = torch.tensor([[0] * (width - len(seq.prompt)) + seq.prompt for seq in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(seq.prompt)) + [1] * len(seq.prompt) for seq in seqs], device=device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        batch = cls()
        batch.seqs, batch.cache, batch.mask = list(seqs), out.past_key_values, mask
        for seq in seqs:
            seq.prefilled = seq.length = len(seq.prompt)
        return batch, out.logits[:, -1, :].float()

    def add(self, seq):
        """Join `seq`, prefilled alone in its own cache."""
        joining = Batch()
        joining.seqs, joining.cache, seq.cache = [seq], seq.cache, None
        joining.mask = torch.ones(1, seq.length, dtype=torch.long, device=joining.cache.layers[0].keys.device)
        self.join(joining)

    def join(self, other):
        """Take every row of `other`, padding its rows or these on the left to a common length."""
        if not len(other):
            return
        if self.cache is None:
            self.seqs, self.cache, self.mask = list(other.seqs), other.cache, other.mask
            return
        width, theirs = self.mask.shape[1], other.mask.shape[1]
        pad_row, pad_batch = max(0, width - theirs), max(0, theirs - width)
        for mine, joining in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, pad_batch), _pad_left(joining.keys, pad_row)])
            mine.values = torch.cat([_pad_left(mine.values, pad_batch), _pad_left(joining.values, pad_row)])
        mask = torch.nn.functional.pad(self.mask, (pad_batch, 0))
        self.mask = torch.cat([mask, torch.nn.functional.pad(other.mask, (pad_row, 0))])
        self.seqs.extend(other.seqs)

    def keep(self, kept):
        """Keep the rows of `kept` (sequences of this batch, in order)."""
        if not kept:
            self.seqs, self.cache, self.mask = [], None, None
            return
        if len(kept) == len(self.seqs):
            return
        rows = torch.tensor([self.seqs.index(seq) for seq in kept], device=self.mask.device)
        self.mask = self.mask.index_select(0, rows)
        cut = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns padding in every row
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, rows)[:, :, cut:]
            layer.values = layer.values.index_select(0, rows)[:, :, cut:]
        self.mask = self.mask[:, cut:]
        self.seqs = list(kept)

    def step(self, model):
        """One forward pass of every row's last token; the logits of each row's next token."""
        device = self.mask.device
        tokens = torch.tensor([[seq.generated[-1]] for seq in self.seqs], device=device)
        positions = torch.tensor([[seq.length] for seq in self.seqs], device=device)
        self.mask = torch.cat([self.mask, torch.ones(len(self.seqs), 1, dtype=torch.long, device=device)], 1)
        out = model(
            input_ids=tokens, past_key_values=self.cache, attention_mask=self.mask, position_ids=positions, use_cache=True
        )
        self.cache = out.past_key_values
        for seq in self.seqs:
            seq.length += 1
        return out.logits[:, -1, :].float()


def _pad_left(tensor, columns):
    return tensor if columns == 0 else torch.nn.functional.pad(tensor, (0, 0, columns, 0))


class Scheduler(threading.Thread):
    """Continuous batching: one thread steps every running sequence of its kind together.

    Each turn: newcomers are prefilled, at most `prefill_tokens` token positions a turn, padding
    counted (whole prompts that fit go through one left-padded pass together; a longer prompt goes
    alone, in pieces over several turns, so that it does not stall the streams running), and each
    one that is through joins the batch with its first token; then one decode step for the whole
    batch. A sequence leaves as soon as it ends (length, eos, stop, cancel); beyond `max_batch`
    running, newcomers wait in the queue.

    Each stub runs two: one for the clients' requests and one (`background`) for mirrored requests,
    on a thread of lower CPU priority whose turns wait while any client request runs, here or in
    another stub, for at most YIELD_MAX_S, so that a shadow costs the clients next to nothing and
    still never starves.

    Greedy decoding gives the same tokens in a batch as alone (a batched pass differs from a lone
    one only in float rounding, which the tests check does not change the argmax of the demo
    model); a sampled sequence draws from its own seeded generator."""

    def __init__(self, model, max_batch, prefill_tokens, background=False):
        super().__init__(daemon=True, name="llmesh-mirrors" if background else "llmesh-scheduler")
        self.model, self.max_batch, self.prefill_tokens = model, max_batch, prefill_tokens
        self.background = background
        self.inbox = queue.Queue()
        self.waiting = []  # accepted, not yet through prefill
        self.batch = Batch()
        self.forced = Every(YIELD_MAX_S, wait_first=True)
        self.stopping = False

    def submit(self, request):
        if not self.background:
            self.model.foreground.enter(1)  # at once: mirrors yield to a client request from its arrival
        self.inbox.put(request)

    def stop(self):
        """Stop stepping; every request still held gets a final error (the model is being unloaded),
        so that no client waits for its deadline."""
        self.stopping = True
        self.inbox.put(None)
        self.join(timeout=10)
        if self.is_alive():
            return  # still inside a step: its sequences are not ours to touch
        self._accept(0)
        unloaded = RuntimeError("the model was unloaded before this request finished; retry")
        for seq in [*self.waiting, *self.batch.seqs]:
            self._fail(seq, unloaded)
        self.waiting, self.batch = [], Batch()

    def run(self):
        if self.background:
            os.setpriority(os.PRIO_PROCESS, 0, self.model.background_niceness)  # on Linux: this thread only
        while not self.stopping:
            self.model.tally.occupancy(self.name, len(self.waiting) + self.inbox.qsize(), len(self.batch))
            self._accept(0 if len(self.batch) or self.waiting else 1.0)  # with nothing to run, wait for requests
            try:
                with torch.inference_mode():
                    worked = self._turn()
            except Exception as err:  # report to every client of this turn instead of killing the stub
                for seq in [*self.waiting, *self.batch.seqs]:
                    self._fail(seq, err)
                self.waiting, self.batch = [], Batch()
                continue
            if not worked:  # mirrors, yielding to the clients' requests
                self._accept(YIELD_POLL_S)

    def _accept(self, timeout):
        """Open the requests submitted meanwhile, waiting up to `timeout` seconds for the first."""
        try:
            request = self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
            while True:
                if request is not None:
                    self._open(request)
                request = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _open(self, request):
        try:
            seq = Sequence(request, self.model)
        except Exception as err:
            pb_utils_error(request.get_response_sender(), err)
            self._left()
            return
        if seq.budget <= 0:
            self._finish(seq, "length")
            return
        self.waiting.append(seq)

    def _turn(self):
        """Prefill newcomers, then step the batch; False when nothing could run."""
        if self.background and self._clients_busy() and not self.forced.due():
            return False
        worked = self._prefill()
        if len(self.batch):
            self._decode()
            worked = True
        return worked

    def _clients_busy(self):
        return self.model.foreground.count > 0 or self.model.foreground.busy()

    def _prefill(self):
        budget = self.prefill_tokens
        running = len(self.batch)
        for seq in [seq for seq in self.waiting if seq.cancelled()]:  # queued ones too, not only those let in
            self.waiting.remove(seq)
            self._finish(seq, "cancelled")
        together = []  # whole prompts, prefilled in one pass
        for seq in list(self.waiting):
            if budget <= 0 or running >= self.max_batch:
                break
            width = max([len(s.prompt) for s in together], default=0)
            cost = max(width, len(seq.prompt)) * (len(together) + 1) - width * len(together)  # padding costs too
            if seq.prefilled == 0 and cost <= budget:
                together.append(seq)
                budget -= cost
                running += 1
                continue
            piece = seq.prompt[seq.prefilled : seq.prefilled + budget]
            x = torch.tensor([piece], device=self.model.device)
            out = self.model.model(input_ids=x, past_key_values=seq.cache, use_cache=True)
            seq.cache, seq.prefilled, seq.length = out.past_key_values, seq.prefilled + len(piece), seq.length + len(piece)
            budget -= len(piece)
            if seq.prefilled < len(seq.prompt):
                continue
            self.waiting.remove(seq)
            running += 1
            if self._emit(seq, self._sampled(seq, out.logits[0, -1, :].float())):
                self.batch.add(seq)
        if together:
            self._join_together(together)
        return budget < self.prefill_tokens

    def _join_together(self, group):
        joining, logits = Batch.prefilled(self.model.model, group, self.model.device)
        for seq in group:
            self.waiting.remove(seq)
        joining.keep([seq for row, seq in enumerate(group) if self._emit(seq, self._sampled(seq, logits[row]))])
        self.batch.join(joining)

    def _decode(self):
        logits = self.batch.step(self.model.model)
        kept = []
        for row, seq in enumerate(self.batch.seqs):
            if seq.cancelled():
                self._finish(seq, "cancelled")
            elif self._emit(seq, self._sampled(seq, logits[row])):
                kept.append(seq)
        self.batch.keep(kept)

    def _sampled(self, seq, logits):
        return self.model._sample(logits, seq.temperature, seq.top_p, seq.generator)

    def _emit(self, seq, token):
        """Hand `token` to the client; False when the sequence ended (and was answered)."""
        try:
            finish = seq.take(token, self.model)
        except Exception as err:  # this client's answer failed, not the batch's
            self._fail(seq, err)
            return False
        if finish:
            self._finish(seq, finish)
        return not finish

    def _finish(self, seq, finish):
        final = [] if seq.stream else seq.generated
        with contextlib.suppress(Exception):  # the client is gone (its stream closed): nothing left to answer
            seq.sender.send(_response(final, finish), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        self._done(seq, finish)

    def _fail(self, seq, err):
        with contextlib.suppress(Exception):
            pb_utils_error(seq.sender, err)
        self._done(seq, "")

    def _done(self, seq, finish):
        self.model.tally.add(len(seq.generated), finish == "cancelled")
        self._left()

    def _left(self):
        if not self.background:
            self.model.foreground.enter(-1)


def pb_utils_error(sender, err):
    sender.send(
        pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {err}")),
        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
    )
