"""Adapters: implementations of the ports in ``selfie_lora.services.ports``."""
