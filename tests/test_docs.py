"""The examples in the public docstrings run and print what they show (doctest), and every public
name is documented in the API reference page."""

import doctest
import os

import pytest

import hessext
from hessext import curvature, hessians

PUBLIC = [
    hessext.hvp,
    hessext.ggn_vp,
    hessext.hessian_diag,
    hessext.hessian,
    hessext.input_hessian,
    hessext.laplacian,
    hessext.value_gradient_laplacian,
]


@pytest.mark.parametrize("fn", PUBLIC, ids=lambda f: f.__name__)
def test_docstring_example_runs(fn):
    assert "Example:" in fn.__doc__ and "Args:" in fn.__doc__ or fn is hessext.ggn_vp
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(fn, fn.__name__, globs={})
    assert tests and tests[0].examples, f"{fn.__name__} has no example"
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{fn.__name__}'s example failed ({runner.failures} of {runner.tries})"


def test_every_public_name_is_in_the_reference():
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "reference.md")) as f:
        page = f.read()
    for name in hessext.__all__:
        if name not in ("optim", "linalg"):
            assert f"hessext.{name}" in page, name
    assert curvature.hvp is hessext.hvp and hessians.laplacian is hessext.laplacian


def test_the_readme_example_runs():
    """The README's example, as printed there, runs (and its PINN loss reaches the weights)."""
    import contextlib
    import io
    import re

    import torch

    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        code = re.search(r"## Example\n\n```python\n(.*?)```", f.read(), re.S).group(1)
    scope = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, "README.md", "exec"), scope)
    assert out.getvalue().strip() == "native"
    assert scope["H"].shape == (2751, 2751) and scope["top"].shape == (3,)
    assert torch.isfinite(scope["model"][0].weight.grad).all() and scope["model"][0].weight.grad.abs().sum() > 0
