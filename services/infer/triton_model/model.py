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
Tally:   each stub counts the tokens it generated and the requests it stopped on a cancel in a
         file of its own (see Tally), so that a cancel that did not stop the generation shows.
"""

import json
import mmap
import os
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
    def __init__(self, seconds):
        self.seconds, self.next = seconds, 0.0

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
    """What this stub computed: `<folder>/<pid>` holds two int64, the tokens it generated and the
    requests it stopped on a cancel, updated in place (memory-mapped). Triton's custom metrics API
    costs an IPC round trip per update, and a stub crashed when models sharing a metric family were
    unloaded; a file costs neither. Files of stubs that ended stay: the counts are the repository's."""

    def __init__(self, folder):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, str(os.getpid()))
        with open(path, "wb") as f:
            f.write(bytes(16))
        with open(path, "r+b") as f:
            self.view = mmap.mmap(f.fileno(), 16)
        self.lock, self.generated, self.cancelled = threading.Lock(), 0, 0

    def add(self, tokens, cancelled):
        with self.lock:
            self.generated += tokens
            self.cancelled += cancelled
            self.view[:16] = struct.pack("qq", self.generated, self.cancelled)


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
        self.tally = Tally(os.path.join(shared, ".tally"))

    def execute(self, requests):
        for request in requests:
            thread = threading.Thread(target=self._serve, args=(request,), daemon=True)
            thread.start()
            self.threads.append(thread)
        self.threads = [t for t in self.threads if t.is_alive()]
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        stream = bool(_scalar(request, "STREAM", True))
        background = bool(_scalar(request, "BACKGROUND", False))
        if background:
            os.setpriority(os.PRIO_PROCESS, 0, self.background_niceness)  # on Linux: this thread only
        else:
            self.foreground.enter(1)
        generated, finish = [], ""
        try:
            emit = (lambda token: sender.send(_response([token]))) if stream else None
            finish = self._generate(request, generated, emit, background)
            final = [] if stream else generated  # streamed tokens were sent one by one already
            sender.send(_response(final, finish), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as err:  # report to the client instead of killing the stub
            sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {err}")),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        finally:
            self.tally.add(len(generated), finish == "cancelled")
            if not background:
                self.foreground.enter(-1)

    @torch.inference_mode()
    def _generate(self, request, generated, emit, background):
        """Append the tokens to `generated` (and pass each to `emit` when streaming); return the finish reason."""
        ids = pb_utils.get_input_tensor_by_name(request, "INPUT_IDS").as_numpy().reshape(-1).astype(np.int64)
        if ids.size == 0:
            raise ValueError("INPUT_IDS is empty")
        max_tokens = int(_scalar(request, "MAX_TOKENS", 16))
        temperature = float(_scalar(request, "TEMPERATURE", 1.0))
        top_p = float(_scalar(request, "TOP_P", 1.0))
        seed = int(_scalar(request, "SEED", 0)) % (2**63)
        stops = [s for s in _stop_strings(request) if s]
        budget = min(max_tokens, self.context - ids.size)
        if budget <= 0:
            return "length"
        generator = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.from_numpy(ids).unsqueeze(0).to(self.device)
        past = None
        # is_cancelled() is a blocking round trip to tritonserver, dearer than a token: ask now and then.
        cancel_check = Every(CANCEL_CHECK_S)
        for _ in range(budget):
            if not self._take_turn(request, background, cancel_check):
                return "cancelled"
            out = self.model(input_ids=x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = self._sample(out.logits[0, -1, :].float(), temperature, top_p, generator)
            if token == self.eos_id:
                return "eos"
            generated.append(token)
            if emit is not None:
                emit(token)
            if stops and self._hit_stop(generated, stops):
                return "stop"
            x = torch.tensor([[token]], device=self.device)
        return "length"

    def _take_turn(self, request, background, cancel_check):
        """Wait until this request may compute its next token; False when it was cancelled."""
        give_up = time.monotonic() + YIELD_MAX_S
        while True:
            if cancel_check.due() and request.is_cancelled():
                return False
            if not background or time.monotonic() >= give_up or not self.foreground.busy():
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
        for thread in self.threads:
            thread.join(timeout=10)
