"""Generation for the chat: continuous batching on one decoding thread per loaded model.

One concern per module, as in nano-vllm's engine:
- ``sampling``: ``SamplingParams`` and the batched sampler;
- ``request``: a ``Request``, its ``FinishReason`` and its ``TextStream``;
- ``decoders``: the forward passes (``SlotDecoder`` for Llama-style models, ``LoopDecoder``
  for the rest) and the slot KV cache;
- ``scheduler``: which waiting request starts next, fairly across clients, and when to
  refuse one (``Busy``);
- ``engine``: the thread and its step.
"""

from assistant.engine.decoders import LAYOUTS_MAX_BYTES, LoopDecoder, SlotDecoder, fast_path_supported
from assistant.engine.engine import Engine, EngineStats
from assistant.engine.request import Busy, ContextTooLong, FinishReason, Request, TextStream
from assistant.engine.sampling import SamplingParams, sample_batch
from assistant.engine.scheduler import Limits, Scheduler

__all__ = ["LAYOUTS_MAX_BYTES", "Busy", "ContextTooLong", "Engine", "EngineStats", "FinishReason", "Limits",
           "LoopDecoder", "Request", "SamplingParams", "Scheduler", "SlotDecoder", "TextStream",
           "fast_path_supported", "sample_batch"]
