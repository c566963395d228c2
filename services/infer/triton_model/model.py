"""Triton Python-backend model: streams tokens from any local Hugging Face causal LM (decoupled mode).

Copied by the infer service into each model version's directory of the Triton repository, beside
`hf/` (the version's artifacts). Self-contained: it imports only torch, transformers, tokenizers,
numpy and Triton's backend utilities.

Inputs:  INPUT_IDS int32[-1], MAX_TOKENS int32[1], TEMPERATURE fp32[1] (0 = greedy), TOP_P fp32[1],
         SEED uint64[1], STOP string[-1] (all optional but INPUT_IDS)
Outputs: one response per generated token with TOKEN_IDS int32[1]; the final response carries
         TOKEN_IDS int32[0] and FINISH_REASON ("length", "stop" or "eos").
"""

import json
import os
import threading

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


def _scalar(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0].item()


def _stop_strings(request):
    tensor = pb_utils.get_input_tensor_by_name(request, "STOP")
    if tensor is None:
        return []
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in tensor.as_numpy().reshape(-1)]


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
        self.threads = []

    def execute(self, requests):
        for request in requests:
            thread = threading.Thread(target=self._serve, args=(request,), daemon=True)
            thread.start()
            self.threads.append(thread)
        self.threads = [t for t in self.threads if t.is_alive()]
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            finish = self._generate(request, sender)
            sender.send(_response([], finish), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as err:  # report to the client instead of killing the stub
            sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {err}")),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )

    @torch.inference_mode()
    def _generate(self, request, sender):
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
        past, generated = None, []
        for _ in range(budget):
            if request.is_cancelled():
                return "length"
            out = self.model(input_ids=x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = self._sample(out.logits[0, -1, :].float(), temperature, top_p, generator)
            if token == self.eos_id:
                return "eos"
            generated.append(token)
            sender.send(_response([token]))
            if stops and self._hit_stop(generated, stops):
                return "stop"
            x = torch.tensor([[token]], device=self.device)
        return "length"

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
