"""Real test doubles for the API path: a local OpenAI-compatible server and a fault-injecting proxy.

- ``trainer.testing.serve.TransformersServer`` starts ``transformers serve`` on a local model
  directory, bound to 127.0.0.1 on a free port, offline (a real OpenAI-compatible endpoint).
- ``trainer.testing.fault_proxy.FaultProxy`` sits in front of it and injects 429s with
  ``Retry-After``, 500s, stalls, malformed JSON, dropped connections and added latency, and
  counts the requests in flight.
- ``trainer.testing.sglang_server.SGLangDouble`` serves the SGLang 0.5.x HTTP API (``/generate``, weight
  hand-over, LoRA adapters) with a local model in a subprocess: what the SGLang engine is tested against.
- ``trainer.testing.vllm_server.VLLMServer`` is no double: the real vLLM server (``.venv-vllm``) on loopback,
  started through the launcher's own launch code; ``trainer.testing.vllm_worker`` is a worker extension
  it loads (a weight reload that holds the engine, for the liveness-probe test).

Used by the tests and the benchmarks; nothing in the training path imports this package.
"""
