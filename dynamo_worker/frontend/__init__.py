"""The OpenAI-compatible HTTP frontend: tokenizes, routes to ``backend.generate`` workers found
through discovery, detokenizes. The ``frontend`` role (:mod:`dynamo_worker.roles.frontend`) only
registers hooks; everything it runs lives here, one module per concept:

* :mod:`.options`: the role's command-line flags and their validation;
* :mod:`.protocol`: request validation and OpenAI response shapes, :class:`.protocol.ApiError`;
* :mod:`.models`: the live model table built from discovery, with tokenizers;
* :mod:`.preprocess`: prompt -> token ids -> Dynamo ``PreprocessedRequest``;
* :mod:`.detokenizer`: incremental detokenization and stop strings;
* :mod:`.router`: picks a worker instance, retries, maps request-plane errors to HTTP ones;
* :mod:`.metrics`: the frontend's Prometheus metrics;
* :mod:`.app`: the aiohttp routes and the server's start and graceful stop.

Nothing here imports vLLM or torch; ``transformers`` is imported when a model first appears.
"""
