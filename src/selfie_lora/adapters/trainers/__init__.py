"""Training backends: implementations of the ``Trainer`` port."""
