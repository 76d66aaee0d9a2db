"""Build script for the native extension ``lwkd_fast._C``.

* The C++ CPU kernels (``csrc/ops.cpp``, ``csrc/cpu/*.cpp``) are always built.
* The CUDA kernels (``csrc/cuda/*.cu``) are built whenever the installed torch has CUDA and an
  ``nvcc`` is found -- a GPU is NOT needed to build them.  With no visible GPU the architectures
  default to ``TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"`` (override with the environment variable).
* ``LWKD_NO_EXT=1`` installs the pure-Python package (the reference backend then serves all ops).
* ``LWKD_NO_CUDA=1`` builds only the CPU kernels.

Metadata lives in ``pyproject.toml``; install with ``pip install --no-build-isolation -e .`` so the
extension is compiled against the torch that is already installed.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The toolkit that owns nvcc (``nvcc`` on PATH is often a wrapper script)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        # a wrapper such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
        try:
            with open(nvcc, "rb") as fh:
                head = fh.read(4096)
            if head.startswith(b"#!"):
                for tok in head.decode("utf-8", "ignore").split():
                    tok = tok.strip("'\"")
                    if tok.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def _nvidia_wheel_includes():
    """Headers shipped by the nvidia-* wheels that the CUDA build of torch depends on."""
    dirs = []
    for base in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in glob.glob(os.path.join(base, pattern)):
                if os.path.isdir(d) and d not in dirs:
                    dirs.append(d)
    return dirs


def get_extensions():
    if _truthy("LWKD_NO_EXT"):
        print("lwkd_fast: LWKD_NO_EXT=1, installing the pure-Python package", file=sys.stderr)
        return [], {}

    cuda_home = None
    want_cuda = not _truthy("LWKD_NO_CUDA")
    if want_cuda:
        cuda_home = _find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    use_cuda = bool(want_cuda and torch.version.cuda and cuda_home)
    reason = (
        "LWKD_NO_CUDA=1" if not want_cuda else
        "torch has no CUDA" if not torch.version.cuda else
        "nvcc not found" if not cuda_home else ""
    )
    print(
        f"lwkd_fast: building CPU kernels{' and CUDA kernels (CUDA_HOME=' + cuda_home + ')' if use_cuda else ''}"
        f"{'; CUDA skipped: ' + reason if reason else ''}",
        file=sys.stderr,
    )

    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra_link_args = ["-fopenmp"]

    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # no GPU to ask: Ampere and Hopper SASS plus PTX for anything newer
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("LWKD_WITH_CUDA", "1"))
        include_dirs += _nvidia_wheel_includes()
        ext = CUDAExtension(
            "lwkd_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=extra_link_args,
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "lwkd_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
            py_limited_api=True,
        )
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = get_extensions()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
