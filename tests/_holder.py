"""A minimal stateful object (like a loader) for the checkpoint tests and their worker processes:
``state_dict``/``load_state_dict`` of an arbitrary tree, saved as it is."""


class Holder:
    """Holds ``value``; its state is the value itself."""

    def __init__(self, value=None):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, value):
        self.value = value
