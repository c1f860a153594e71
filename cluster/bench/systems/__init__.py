"""The systems a bench run measures, one module each: vLLM's own server (`vllm_server`), the engine in-process
(`in_process`) and a local modelfleet cluster (`modelfleet`), over the process handling they share (`process`).

Import the modules themselves: this package imports none of them, so `python -m
cluster.bench.systems.in_process` runs its module once.
"""
