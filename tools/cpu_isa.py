"""Run a command as on an older x86-64 CPU, at this CPU's speed: every library in it (PyTorch's ATen and oneDNN,
ONNX Runtime's MLAS, the CPU-flag probes) sees the profile's CPUID, so each picks the kernels it would pick there.

    python -m tools.cpu_isa avx2 -- python -m scripts.benchmark --untrained resnet50 ...
    python -m tools.cpu_isa avx512 -- python -c "import torch; print(torch.cpu.get_capabilities())"

Profiles: `avx2` hides AVX-512, AMX and AVX-VNNI (a Haswell..Comet Lake or AMD Zen 1-3 core); `avx512` hides AMX,
AVX512-FP16 and AVX-VNNI and keeps AVX-512 with VNNI and BF16 (an AMD Zen 4 core, like the EPYC of issue 22).
ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA hold PyTorch back only; ONNX Runtime reads CPUID and has no such
setting. How: tools/cpuid_mask.c, compiled once per source into the temporary folder and preloaded; it needs Linux,
a C compiler and a CPU with CPUID faulting (`cpuid_fault` in /proc/cpuinfo), and refuses to run without them.
Only the extensions differ: caches, core and clock stay this CPU's, so figures are "this CPU held to <profile>".
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NoReturn

PROFILES = ("avx2", "avx512")
SOURCE = Path(__file__).with_name("cpuid_mask.c")


class MaskError(RuntimeError):
    """The mask cannot be built or used on this machine (why, and what it needs)."""


def library() -> Path:
    """The compiled mask for the current source (built once into the temporary folder); raises MaskError."""
    source = SOURCE.read_bytes()
    built = Path(tempfile.gettempdir()) / f"petclf-cpuid-mask-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if built.is_file():
        return built
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise MaskError("no C compiler (cc or gcc; or set CC) to build tools/cpuid_mask.c")
    partial = built.with_suffix(f".{os.getpid()}.tmp")
    result = subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(SOURCE), "-ldl"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise MaskError(f"{compiler} could not build {SOURCE}: {result.stderr.strip()}")
    partial.replace(built)  # atomic: concurrent builders each rename a whole library
    return built


def environment(profile: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) plus what runs a process, and every process it starts, as on `profile`."""
    if profile not in PROFILES:
        raise MaskError(f"unknown CPU profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if not Path("/proc/self").exists():
        raise MaskError("CPUID faulting needs Linux")
    env = dict(os.environ if base is None else base)
    preload = [str(library()), *filter(None, env.get("LD_PRELOAD", "").split(":"))]
    env.update(LD_PRELOAD=":".join(preload), PETCLF_CPUID_PROFILE=profile)
    return env


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", choices=PROFILES, help="the CPU to appear as")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    return parser


def main(args: argparse.Namespace) -> NoReturn:
    """Exec the command under the profile (this process becomes it); exits with the reason when it cannot."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("no command: python -m tools.cpu_isa PROFILE -- COMMAND ...")
    try:
        env = environment(args.profile)
    except MaskError as exc:
        raise SystemExit(f"tools.cpu_isa: {exc}") from None
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
