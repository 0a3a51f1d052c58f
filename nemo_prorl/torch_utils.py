"""Small torch helpers shared by the backends."""

import torch

# Names accepted by `model.dtype`.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
