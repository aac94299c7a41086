"""The episodic-memory algorithm in pure torch: no vLLM, no pydantic.

These modules take plain numbers and tensors, so they run (and are tested) without
an inference engine, and on machines where only torch is installed.
"""
