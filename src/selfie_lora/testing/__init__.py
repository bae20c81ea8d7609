"""Test helpers that ship with the package (stand-ins for remote services), used by the test
suite and by anyone who wants to run selfie-lora against a fake backend."""
