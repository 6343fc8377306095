"""CPU feature detection from /proc/cpuinfo text."""

from __future__ import annotations

from noisecraft.hardware import cpu_info, native_bf16, parse_cpuinfo

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16
processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu
"""
OLD_XEON = "model name\t: Intel Xeon E5\nflags\t\t: fpu avx2 fma\n"
SPR = "model name\t: Intel Xeon Platinum 8480\nflags\t\t: avx512f amx_tile amx_bf16\n"


def test_parse_first_processor():
    model, flags = parse_cpuinfo(EPYC)
    assert model == "AMD EPYC 9R14" and "avx512_bf16" in flags and "fpu" in flags


def test_native_bf16_flags(tmp_path):
    for text, native, amx in ((EPYC, True, False), (OLD_XEON, False, False), (SPR, True, True)):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        info = cpu_info(path)
        assert native_bf16(path) is native and info.native_bf16 is native and info.amx is amx
        assert info.as_dict()["cpu_model"] == parse_cpuinfo(text)[0]


def test_missing_cpuinfo_is_conservative(tmp_path):
    info = cpu_info(tmp_path / "absent")
    assert not info.native_bf16 and info.logical_cpus >= 1 and info.model
