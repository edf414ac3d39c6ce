"""Dense: every valid token, through the same cache and kernel (a baseline, no summary)."""

from .base import Method, SelectionInputs


class Dense(Method):
    name = "dense"
    summary_mode = None

    def select(self, inputs: SelectionInputs):
        return None
