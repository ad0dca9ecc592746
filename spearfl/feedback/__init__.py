"""Feedback on a completion: providers (`providers`), hint styles (`hints`) and the leak filter (`leaks`)."""
