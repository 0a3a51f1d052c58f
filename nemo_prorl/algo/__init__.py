"""Algorithm math as pure functions: explicit tensors and scalars in, losses and metrics out.

Nothing here reads a config object, calls `.item()` or imports torch.distributed, so every function
can be golden-value tested and reused by any policy backend.
"""
