"""Replicate: one client session and retry policy, the trainer (ostris/flux-dev-lora-trainer),
finding the LoRA in any output shape, the generator and Standard Webhooks."""
