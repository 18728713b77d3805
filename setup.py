"""Build hessext._C with torch.utils.cpp_extension and ninja: a CppExtension on a CPU-only torch, a
CUDAExtension when torch has CUDA and sees a GPU, or when HESSEXT_FORCE_CUDA=1 (the CUDA sources then
compile with no GPU present)."""
import importlib.util
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

_spec = importlib.util.spec_from_file_location(
    "hessext_build", os.path.join(os.path.dirname(os.path.abspath(__file__)), "hessext", "_build.py")
)
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def sources(cuda):
    """The sources relative to this directory, as setuptools requires of a [project] build."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [os.path.relpath(f, here) for f in build.sources(cuda)]


def extension():
    cuda = build.want_cuda()
    kwargs = dict(include_dirs=[build.CSRC], extra_compile_args={"cxx": build.CXX_FLAGS},
                  extra_link_args=build.LINK_FLAGS)
    if cuda:
        kwargs["extra_compile_args"]["nvcc"] = build.NVCC_FLAGS
        return CUDAExtension("hessext._C", sources(True), define_macros=[("WITH_CUDA", None)], **kwargs)
    return CppExtension("hessext._C", sources(False), **kwargs)


class Build(BuildExtension.with_options(use_ninja=True)):
    def build_extension(self, ext):
        super().build_extension(ext)
        path = os.path.join(self.build_lib, self.get_ext_filename(self.get_ext_fullname(ext.name)))
        build.check_shared_libstdcxx(path)


setup(  # the metadata is pyproject.toml's [project]; here, the extension and its build
    ext_modules=[extension()],
    cmdclass={"build_ext": Build},
)
