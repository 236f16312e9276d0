"""The YAML configs shipped with attn-rerank, installed as the package data of ``rerank.configs``."""
