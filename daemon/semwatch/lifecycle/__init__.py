"""The model's life in the lab: operators' labels, training from them, the registry and promotion."""
