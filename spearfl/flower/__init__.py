"""Flower apps: thin adapters from Flower messages to spearfl's client update and server loop (flwr >= 1.42)."""
