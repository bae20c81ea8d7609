"""Pure domain: entities, the retraining plan and the training state machine. No I/O here."""
