"""Data plane: model adapters, stage workers, router, multimodal cache, launcher."""
