"""Adapters that expose the reranker to other frameworks (optional extras, imported on demand)."""
