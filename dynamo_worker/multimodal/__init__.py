"""The multimodal path: media loading, the tensor wire format, and what each model expects.

The roles (``processor``, ``encode``, ``ec-encoder``) and the decode worker's
``--enable-multimodal`` build on these modules; docs/multimodal.md describes the whole chain.
Nothing here imports torch, PIL or vLLM at module top.
"""
