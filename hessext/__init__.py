"""hessext: fast, exact second-order derivatives of neural-network losses.

Native C++ kernels serve MLPs of Linear and Tanh layers with an MSE loss; any other model or loss
goes through torch.func with the same API and the same answers."""
from hessext.curvature import hvp
from hessext.plan import Plan, plan

__all__ = ["hvp", "plan", "Plan"]
__version__ = "0.1.0"
