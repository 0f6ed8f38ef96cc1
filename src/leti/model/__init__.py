"""The model: where the base model comes from (`sources`), the LETI tokens (`tokens`), and the device
and dtype a policy runs in (`device`). Importing this package imports no torch."""
