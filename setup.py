"""Builds the optional C kernels (fapm_cli/compute/_kernels.c); everything else is in pyproject.toml.

The extension is optional: where no C compiler is found the build warns and fapm runs its
torch path, which gives the same results, slower (see docs/benchmarks.md)."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# No -ffast-math and no contraction into fused multiply-adds: the kernels must perform exactly
# the IEEE operations of the torch path (see the comment at the top of _kernels.c).
FLAGS = {
    "unix": ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fvisibility=hidden"],
    "msvc": ["/O2", "/fp:precise"],
}


class BuildExt(build_ext):
    def build_extensions(self) -> None:
        flags = FLAGS.get(self.compiler.compiler_type, [])
        for ext in self.extensions:
            ext.extra_compile_args = [*ext.extra_compile_args, *flags]
        super().build_extensions()


setup(
    ext_modules=[Extension("fapm_cli.compute._kernels", ["fapm_cli/compute/_kernels.c"], optional=True)],
    cmdclass={"build_ext": BuildExt},
)
