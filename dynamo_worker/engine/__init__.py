"""The vLLM engine side of a worker: engine arguments, the wire protocol, request handlers.

Modules here import vLLM only inside functions, so importing them stays cheap.
"""
