"""`dsv3 serve`: an OpenAI-compatible server over a continuous-batching engine and a paged latent cache.

The shape is nano-vllm's (scheduler, block manager, model runner), in plain Python over the model's public
calls: `cache` (fixed-size blocks of latent + rotary-key rows, the block manager), `runner` (one forward over
a packed batch of prefill chunks and decode tokens, attention gathering each sequence's blocks), `engine`
(requests, the scheduler, sampling, `Engine.step`), `worker` (the engine's thread), `protocol` (OpenAI request
checks and error JSON), `textgen` (a request's tokens turned into text, stop strings, cancellation), `metrics`
(Prometheus text), `app` (FastAPI routes) and `server` (uvicorn, signals, the ranks under torchrun).
"""
