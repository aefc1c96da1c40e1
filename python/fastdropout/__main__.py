"""Command line: ``python -m fastdropout {bench,demo,info}``."""
from __future__ import annotations

import sys
from typing import List, Optional

USAGE = """usage: python -m fastdropout [--version] COMMAND [options]

commands:
  bench   time fastdropout's kernels next to NumPy (and PyTorch / JAX when installed)
  demo    train a small MLP on scikit-learn's digits with and without dropout
  info    print the backend, the CPU features and the thread count

`python -m fastdropout COMMAND --help` describes each command's options."""


def info() -> int:
    import fastdropout as fd

    from ._platform import describe_cpu

    print(f"fastdropout {fd.__version__}")
    print(f"cpu               : {describe_cpu()}")
    print(f"backend           : {fd.backend()}")
    print(f"available backends: {', '.join(fd.available_backends())}")
    print(f"cpu features      : {fd._core.cpu_features()}")
    print(f"gemm path         : {fd._core.gemm_path()[1]}")
    print(f"bfloat16 gemm     : {fd._core.bf16_gemm()[1]}")
    print(f"threads           : {fd.get_num_threads()} (OpenMP: {'yes' if fd._core.has_openmp() else 'no'})")
    if fd._core.has_openmp():
        from ._runtime import wait_policy

        print(f"OpenMP runtime    : {fd._core.openmp_runtime() or 'unknown'}")
        print(f"idle threads wait : {wait_policy.get('why', 'unknown')}")
        adapting = fd._core.neighbours()["adapting"]
        print("neighbours        : " + (
            "threads give way: while other libraries' threads hold our cores (a thread of ours lost over half "
            "of a parallel region), problems that one thread finishes sooner run on one thread "
            "(FASTDROPOUT_ADAPT_THREADS=0 turns this off)" if adapting else
            "threads do not give way (FASTDROPOUT_ADAPT_THREADS=0, or no per-thread CPU clock here)"))
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch layer       : torch is not installed")
    else:
        from ._torch_native import describe

        print(f"torch layer       : {describe()}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        import fastdropout as fd

        print(f"fastdropout {fd.__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from ._bench import main as bench_main

        return bench_main(rest)
    if command == "demo":
        from ._demo import main as demo_main

        return demo_main(rest)
    if command == "info":
        import argparse

        argparse.ArgumentParser(prog="python -m fastdropout info", description="Print the CPU, the SIMD backend "
                                "and why, the GEMM path, the threads and the OpenMP runtime in use.").parse_args(rest)
        return info()
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
