"""Use cases. They talk to adapters only through the ports in ``services.ports``."""
