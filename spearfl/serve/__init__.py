"""The device service: people ask, judge and hint; the model answers with the latest global adapter."""
