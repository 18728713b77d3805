"""hessext: fast, exact second-order derivatives of neural-network losses.

Native C++ kernels serve MLPs of Linear and Tanh layers with an MSE loss; any other model or loss
goes through torch.func with the same API and the same answers."""
from hessext import optim
from hessext.curvature import ggn_diag, ggn_vp, hessian_diag, hutchinson_diag, hvp
from hessext.hessians import hessian, input_hessian, laplacian
from hessext.plan import Plan, plan

__all__ = ["hvp", "ggn_vp", "hessian_diag", "ggn_diag", "hutchinson_diag", "hessian", "input_hessian", "laplacian",
           "plan", "Plan", "optim"]
__version__ = "0.1.0"
