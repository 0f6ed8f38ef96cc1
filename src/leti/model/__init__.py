"""The model: where the base model comes from (`sources`), the LETI tokens (`tokens`), the device
and dtype a policy runs in (`device`), and the GPUs a job may take (`gpus`). Importing this package
imports no torch."""
