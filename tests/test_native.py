"""Loading the native module: build facts, and the torch.func fallback (with one warning) when
neither the prebuilt module nor a JIT build is available."""

import os
import shutil
import subprocess
import sys

import pytest

import hessext
from hessext import _native


def test_build_facts():
    status = _native.status()
    assert status["loaded"] and status["error"] is None
    assert status["with_cuda"] in (True, False)
    assert status["torch_version"]
    report = __import__("hessext.info").info.report()
    assert "native kernels: usable" in report and "CPU scratch kept between calls by this thread" in report


def test_missing_native_module_warns_once_and_falls_back():
    code = """
import sys, warnings
sys.modules["hessext._C"] = None          # the prebuilt module is missing
import torch, torch.nn as nn, hessext
m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
v = torch.randn(2, 26, dtype=torch.float64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    plan = hessext.plan(m, nn.MSELoss())
    a = hessext.hvp(m, nn.MSELoss(), x, y, v)
    b = hessext.hvp(m, nn.MSELoss(), x, y, v)
print(plan.backend, "|", plan.reason)
print(sum("native kernels unavailable" in str(w.message) for w in caught), "warning")
print(float((a - b).abs().max()))
"""
    env = dict(os.environ, HESSEXT_NO_JIT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("torch.func | the native module is unavailable")
    assert "HESSEXT_NO_JIT" in lines[0]
    assert lines[1] == "1 warning"
    assert float(lines[2]) == 0.0
    assert hessext.plan(__import__("torch").nn.Linear(2, 2), __import__("torch").nn.MSELoss()).backend == "native"


@pytest.mark.skipif(not (shutil.which("g++") and shutil.which("ldd")), reason="needs g++ and ldd")
def test_a_build_with_a_static_libstdcxx_is_refused(tmp_path):
    """A compiler that links libstdc++ statically made an extension that crashed formatting numbers
    in its error messages; the build refuses such a library and accepts a dynamically linked one."""
    from hessext import _build

    src = tmp_path / "s.cpp"
    src.write_text("#include <sstream>\nstd::string f(long x) { std::ostringstream s; s << x; return s.str(); }\n")
    for flags, ok in (([], True), (["-static-libstdc++"], False)):
        lib = tmp_path / f"lib{len(flags)}.so"
        subprocess.run(["g++", "-shared", "-fPIC", *flags, str(src), "-o", str(lib)], check=True)
        if ok:
            _build.check_shared_libstdcxx(str(lib))
        else:
            with pytest.raises(RuntimeError, match="does not link libstdc"):
                _build.check_shared_libstdcxx(str(lib))
