"""hessext: fast, exact second-order derivatives of neural-network losses.

Native C++/CUDA kernels serve MLPs of Linear layers with elementwise activations (ReLU, LeakyReLU,
Sigmoid, SiLU, GELU, Softplus, ELU, Tanh) and the MSE, Huber, BCE-with-logits, cross-entropy and
NLL-after-LogSoftmax losses; any other model or loss goes through torch.func with the same API and
the same answers (`hessext.plan(model, loss_fn).reason` says why)."""

from hessext import linalg, optim
from hessext.curvature import ggn_diag, ggn_vp, hessian_diag, hutchinson_diag, hvp
from hessext.hessians import hessian, input_hessian, laplacian, value_gradient_laplacian
from hessext.kfac import kfac_factors
from hessext.operator import HessianOperator
from hessext.pinn import GramianOperator, pinn_ggn_vp
from hessext.plan import Plan, plan

__all__ = [
    "hvp",
    "ggn_vp",
    "hessian_diag",
    "ggn_diag",
    "hutchinson_diag",
    "kfac_factors",
    "hessian",
    "input_hessian",
    "laplacian",
    "value_gradient_laplacian",
    "plan",
    "Plan",
    "optim",
    "HessianOperator",
    "linalg",
    "GramianOperator",
    "pinn_ggn_vp",
]
__version__ = "0.1.0"
