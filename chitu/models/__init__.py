"""Model architectures. `registry.build_model` picks the class for a checkpoint's architecture."""
