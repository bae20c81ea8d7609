"""Image generation backends: implementations of the ``Generator`` port."""
