"""The vLLM attention backend."""
