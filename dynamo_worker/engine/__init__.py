"""The vLLM engine side of a worker, one module per concept.

``args`` (engine arguments and our defaults), ``protocol`` (the ``generate`` wire format),
``handlers`` (``generate``, ``clear_kv_blocks``), ``metrics`` (latency histograms, load gauges,
the engine processes' metrics directory), ``load`` (the stat logger publishing ``load_metrics``),
``kv_events`` (vLLM's KV-cache events relayed to ``kv_events``), ``lora`` (adapters and their
endpoints), ``sleep`` (``/engine/sleep`` and ``/engine/wake_up``), ``publication`` (the
``generate`` discovery record as it changes), ``kv_transfer`` (KV connectors for disaggregated
serving), ``role`` (the hooks the decode and prefill roles share).

Modules here import vLLM only inside functions, so importing them stays cheap.
"""
