"""bf16 on a CPU without bf16 instructions is emulated (100x slower here): detected from the CPU flags, warned once."""

import logging

from causvid.train.precision import cpu_bf16_is_native, warn_if_emulated_bf16

EPYC_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def _file(tmp_path, text):
    p = tmp_path / "cpuinfo"
    p.write_text(text)
    return str(p)


def test_flags_decide(tmp_path):
    assert cpu_bf16_is_native(_file(tmp_path, EPYC_AVX2)) is False
    assert cpu_bf16_is_native(_file(tmp_path, SAPPHIRE)) is True
    assert cpu_bf16_is_native(_file(tmp_path, GRAVITON)) is True
    assert cpu_bf16_is_native(str(tmp_path / "missing")) is None
    assert cpu_bf16_is_native(_file(tmp_path, "processor\t: 0\n")) is None


def test_warns_only_for_bf16_on_an_emulating_cpu(tmp_path, caplog):
    avx2, amx = _file(tmp_path, EPYC_AVX2), str(tmp_path / "amx")
    open(amx, "w").write(SAPPHIRE)
    with caplog.at_level(logging.WARNING, logger="causvid.train"):
        assert warn_if_emulated_bf16("bf16", "cpu", avx2)
        assert not warn_if_emulated_bf16("no", "cpu", avx2)
        assert not warn_if_emulated_bf16("bf16", "cuda", avx2)
        assert not warn_if_emulated_bf16("bf16", "cpu", amx)
        assert not warn_if_emulated_bf16("bf16", "cpu", str(tmp_path / "missing"))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "train.mixed_precision=no" in warnings[0]
