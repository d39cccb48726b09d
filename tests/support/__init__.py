"""Helpers the tests share: builders of tiny models, references, runners (no fixtures)."""
