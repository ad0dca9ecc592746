"""`personal.method: none`: one global adapter answers every client, as a federation without personalization does."""

from spearfl.personal.base import PersonalMethod


class NoPersonalization(PersonalMethod):
    """Every default of `PersonalMethod`: the global update, sent whole; no personal adapter."""
