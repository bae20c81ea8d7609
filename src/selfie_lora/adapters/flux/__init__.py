"""FLUX on this machine with diffusers + peft: the offline tiny model, loading a real FLUX.1
folder, the LoRA training loop, the trainer (in a child process) and the generator."""
