"""Type aliases of the public API's arguments (for annotations and the documentation)."""

from typing import Callable, Mapping, Optional, Sequence, Union

import torch

Tensor = torch.Tensor
# A dict name -> tensor, a list or tuple in model.named_parameters() order, or a flat [P] tensor; each
# with an optional leading batch dimension K for K vectors at once.
Vectors = Union[Mapping[str, Tensor], Sequence[Tensor], Tensor]
# Tensors used instead of the module's parameters (a subset restricts the quantities to them).
Params = Optional[Mapping[str, Tensor]]
# A torch loss module or function of (output, targets).
LossFn = Callable[..., Tensor]
# A physics-informed loss term of (u, grad_u, lap_u, inputs).
PinnLossFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
