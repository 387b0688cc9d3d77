"""What comes in: the architecture registry, the base model, the prefix checkpoint, PEFT's prefix KV."""
