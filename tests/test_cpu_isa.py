"""tools/cpu_isa.py: a process and the processes it starts see the profile's CPU; real faults still end them; and
where the CPU or kernel cannot fault on CPUID, the mask refuses instead of running on the whole CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from models.runtime import cpu_features, kernel_cpu_flags
from tools.cpu_isa import MaskError, environment

FLAGS = kernel_cpu_flags()  # the kernel's view, unmasked: cpuid_fault is no CPUID bit
pytestmark = pytest.mark.skipif("avx2" not in FLAGS, reason="an x86-64 Linux CPU with AVX2")

# What a process sees (torch's capability, and every flag torch's cpuinfo reads from CPUID), as JSON.
SEES = (
    "import json, torch; print(json.dumps({'capability': torch.backends.cpu.get_cpu_capability(), "
    "'flags': sorted(k for k, v in torch.cpu.get_capabilities().items() if v is True)}))"
)
# ...and what a child it starts sees.
PARENT = f"import subprocess, sys; {SEES}; subprocess.run([sys.executable, '-c', {SEES!r}], check=True)"
# What the avx512 profile keeps of this CPU, as torch names it (this test process is not masked).
ZEN4 = {name for name in ("avx512_f", "avx512_vnni", "avx512_bf16") if cpu_features().get(name) is True}


def masked(profile: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv], env=environment(profile), capture_output=True, text=True, timeout=300
    )


def probe(profile: str) -> list[dict] | None:
    """What a masked process and its child see; None (after checking the refusal) without CPUID faulting."""
    result = masked(profile, "-c", PARENT)
    if "cpuid_fault" not in FLAGS:
        assert result.returncode == 2 and "no CPUID faulting" in result.stderr, result.stderr
        return None
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_avx2_hides_avx512_amx_and_vnni_from_a_process_and_its_children():
    for view in probe("avx2") or ():
        assert view["capability"] == "AVX2"
        assert "avx2" in view["flags"] and "fma3" in view["flags"]
        assert not [f for f in view["flags"] if "avx512" in f or "amx" in f or "vnni" in f or "avx10" in f]


def test_avx512_keeps_what_zen4_has_and_hides_amx():
    for view in probe("avx512") or ():
        assert not [f for f in view["flags"] if "amx" in f or f in ("avx512_fp16", "avx_vnni", "avx10_1")]
        assert set(view["flags"]) >= ZEN4


def test_a_real_fault_still_ends_the_process_through_pythons_handler():
    """The mask's SIGSEGV handler answers CPUID only; faulthandler (installed after it) still reports a crash."""
    result = masked("avx2", "-X", "faulthandler", "-c", "import ctypes; ctypes.string_at(0)")
    if "cpuid_fault" not in FLAGS:
        assert result.returncode == 2
        return
    assert result.returncode == -11
    assert "Fatal Python error: Segmentation fault" in result.stderr and "string_at" in result.stderr


@pytest.mark.parametrize("profile", ["avx", "AVX2", "", "sse4"])
def test_an_unknown_profile_is_refused_naming_the_choices(profile):
    with pytest.raises(MaskError, match="avx2, avx512"):
        environment(profile)
    result = subprocess.run(
        [sys.executable, "-c", "pass"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment("avx2"), "PETCLF_CPUID_PROFILE": profile or "?"},
    )
    assert result.returncode == 2 and "is not one of avx2, avx512" in result.stderr
