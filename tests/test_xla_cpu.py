"""jpeft.xla_cpu.configure: appends its defaults, keeps the user's flags, can be turned off."""

from jpeft import xla_cpu


def test_configure_appends_keeps_and_opts_out(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.delenv("JPEFT_XLA_CPU_DEFAULTS", raising=False)
    got = xla_cpu.configure()
    assert got.split() == ["--xla_force_host_platform_device_count=8", *xla_cpu.DEFAULT_FLAGS]
    assert xla_cpu.configure() == got  # idempotent
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert xla_cpu.configure() == "--xla_cpu_experimental_ynn_fusion_type=dot"  # the user's value wins
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JPEFT_XLA_CPU_DEFAULTS", "0")
    assert xla_cpu.configure() == ""
