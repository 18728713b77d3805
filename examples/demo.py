"""The 1-16-1 Tanh network and loss, as its user wrote them: Hessian-vector products through hessext's
native kernel and through torch.func, their agreement, and the speed-up (median times)."""

import torch
import torch.nn as nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils.benchmark import Timer

import hessext


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(1, 16)
        self.fc2 = nn.Linear(16, 1)
        self.af = nn.Tanh()

    def forward(self, x):
        x = self.fc1(x)
        x = self.af(x)
        x = self.fc2(x)
        return x.squeeze(-1)


def loss_fn(outputs, targets):
    return torch.mean((outputs - targets) ** 2, dim=0)


def median_us(fn):
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median * 1e6


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    net = Model().double()
    batch_size = 100
    targets = torch.randn(batch_size, dtype=torch.float64)
    inputs = torch.randn(batch_size, 1, dtype=torch.float64)
    params = {k: p.detach() for k, p in net.named_parameters()}
    plan = hessext.plan(net, loss_fn)
    print(f"model: Linear(1,16)-Tanh-Linear(16,1), batch {batch_size}, float64; hessext backend: {plan.backend}")

    def compute_loss(p):
        return loss_fn(functional_call(net, p, (inputs,)), targets)

    for K in (1, 16):
        vectors = {k: torch.randn((K,) + p.shape, dtype=torch.float64) for k, p in params.items()}
        ours = lambda: hessext.hvp(net, loss_fn, inputs, targets, vectors)  # noqa: E731
        theirs = lambda: vmap(lambda v: jvp(grad(compute_loss), (params,), (v,))[1])(vectors)  # noqa: E731
        a, b = ours(), theirs()
        err = max((a[k] - b[k]).abs().max().item() for k in params)
        scale = max(b[k].abs().max().item() for k in params)
        t_ours, t_theirs = median_us(ours), median_us(theirs)
        print(
            f"K={K:2d} vectors: max |hessext - torch.func| = {err:.2e} (largest entry {scale:.2e}); "
            f"hessext {t_ours:7.1f} us, torch.func {t_theirs:8.1f} us -> {t_theirs / t_ours:5.1f}x faster"
        )


if __name__ == "__main__":
    main()
