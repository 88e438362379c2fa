"""`gpuvisor bench sampler` measures the real sampler against real worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from gpuvisor.bench.sampler import SamplerBenchConfig, run_sampler_bench, sampler_command
from gpuvisor.errors import ConfigError


def test_sampler_cost_is_measured_per_period(tmp_path: Path) -> None:
    config = SamplerBenchConfig(seconds=1.0, periods=(0.2,), workers=2)
    console = Console(record=True, width=160, color_system=None)
    assert sampler_command(config, tmp_path / "sampler.json", console) == 0
    saved = json.loads((tmp_path / "sampler.json").read_text())
    assert saved["benchmark"] == "sampler" and saved["machine"]["cpus"] >= 1
    (cost,) = saved["periods"]
    assert cost["period"] == 0.2
    assert 4 <= cost["samples"] <= 7  # one at start, then every 0.2 s of a 1 s run
    assert cost["sampler_cpu_ms_per_s"] > 0 and cost["cpu_ms_per_sample"] > 0
    assert cost["process_cpu_ms_per_s"] >= 0
    assert any(d.startswith("cpu-0") for d in saved["devices"])
    text = console.export_text()
    assert "sampler CPU ms/s" in text and "results written to" in text


def test_a_period_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ConfigError, match="--period must be > 0"):
        run_sampler_bench(SamplerBenchConfig(seconds=1.0, periods=(0.0,), workers=0))
