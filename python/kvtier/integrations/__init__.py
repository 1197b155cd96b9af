"""Integrations of kvtier with inference frameworks (import each submodule explicitly)."""
