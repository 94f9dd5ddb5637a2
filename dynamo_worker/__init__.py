"""dynamo-worker: serve LLMs with vLLM as cooperating worker roles over NATS."""

__version__ = "0.1.0"
