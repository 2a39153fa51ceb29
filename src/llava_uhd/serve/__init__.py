"""Serving LLaVA-UHD v3 through vLLM (docs/serving.md)."""
