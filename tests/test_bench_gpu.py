"""bench/gpu.py --tiny, run as the operator runs it: every row measured, the table and the JSON agree.

On the CPU the rows are tiny-sd and tiny-sdxl at 64x64, the compiled row with torch.compile's
``eager`` backend (dynamo traces, nothing is code-generated), and the HTTP part starts two real
gunicorn servers on a saved copy of tiny-sd. The numbers mean nothing here; that each one is
there and sane is what counts, so a one-shot run on a GPU can't fail on the script itself.
"""

from __future__ import annotations

import json

import pytest

from tests.benches import run_bench

# Its servers run on a SQLite file of their own.
pytestmark = pytest.mark.own_database
BATCHES = ("b1", "b4")


@pytest.fixture(scope="module")
def bench(tiny_model_dirs, tmp_path_factory) -> tuple[str, dict]:  # noqa: ANN001
    tmp = tmp_path_factory.mktemp("bench-gpu")
    out = tmp / "gpu.json"
    env = {
        "HF_HOME": str(tmp / "hf-home"),
        "MODEL_CATALOG_FILE": "",
        # The fast path is off on the CPU by default; switched on, its rows and ablations run too.
        "CHANNELS_LAST": "on",
        "FUSE_QKV": "on",
    }
    args = ["--tiny", "--repeats", "1", "--steps", "2", "-n", "6", "--clients", "3", "--json", str(out)]
    proc = run_bench("gpu.py", *args, drop=("HF_", "DEVICE", "TORCH_DTYPE"), env=env)
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_every_row_is_measured_with_sane_numbers(bench):
    text, results = bench
    rows = {(r["model"], r["variant"]): r for r in results["rows"]}
    expected = [
        (model, variant)
        for model in ("sd15", "sdxl")
        for variant in ("diffusers fp32", "engine eager", "engine compiled (default, eager backend)")
    ]
    expected += [("sd15", "engine eager, channels_last off"), ("sd15", "engine eager, fused QKV off")]
    assert list(rows) == expected  # in the order they ran: the important ones first
    for key, row in rows.items():
        assert "error" not in row, key
        assert (row["size"], row["steps"]) == (64, 2)
        for batch in BATCHES:
            cell = row[batch]
            assert "error" not in cell, (key, batch)
            assert cell["s_per_image"] > 0 and cell["it_per_s"] > 0 and cell["peak_mib"] > 0, (key, batch)
            assert len(cell["times_s"]) == 1
            assert cell["s_per_image"] == pytest.approx(cell["times_s"][0] / cell["batch"], abs=1e-3)
            assert cell["it_per_s"] == pytest.approx(
                2 / cell["times_s"][0], rel=0.01, abs=0.006
            )  # it/s is rounded to 0.01
            if "compiled" in key[1]:
                assert cell["warmup_s"] > 0
            else:
                assert "warmup_s" not in cell
    assert results["skipped"] == []
    assert results["plan"]["channels_last"] is True and results["plan"]["fuse_qkv"] is True
    assert results["environment"]["torch"] and results["elapsed_s"] > 0


@pytest.mark.slow
def test_http_throughput_with_batching_off_and_on(bench):
    _, results = bench
    http = results["http"]
    assert (http["requests"], http["clients"], http["size"], http["steps"]) == (6, 3, 64, 2)
    for label, batch_max in (("off", 1), ("on", 8)):
        run = http[label]
        assert "error" not in run, run
        assert run["batch_max_images"] == batch_max
        assert run["images_per_s"] > 0 and run["wall_s"] > 0
        assert 0 < run["p50_s"] <= run["p95_s"]
    assert http["on_off_ratio"] == pytest.approx(http["on"]["images_per_s"] / http["off"]["images_per_s"], rel=0.01)


@pytest.mark.slow
def test_the_table_has_every_row_and_the_http_lines(bench):
    text, results = bench
    table = text[text.index("| model | row |") :]
    for row in results["rows"]:
        line = next(line for line in table.splitlines() if f"| {row['model']} 64² | {row['variant']} |" in line)
        assert f"{row['b1']['s_per_image']:.3f}" in line and f"{row['b4']['s_per_image']:.3f}" in line
    assert "| off | 1 |" in table and "| on | 8 |" in table
    assert "batching on / off:" in table


def test_a_budget_that_is_spent_skips_the_rest_and_still_writes_the_table(tiny_model_dirs, tmp_path):
    out = tmp_path / "gpu.json"
    proc = run_bench("gpu.py", "--tiny", "--budget", "0.001", "--json", str(out), timeout=300)
    results = json.loads(out.read_text())
    assert results["rows"] == [] and results["http"] == {}
    assert "sd15: build" in results["skipped"] and "http" in results["skipped"]
    assert "not measured (budget): sd15: build" in proc.stdout
