from __future__ import annotations

import json

import pytest
import torch

from callbacks.pruning.callback import Pruning
from callbacks.quantization.callback import Quantization
from tests.pruning_helpers import calibration, corpus, linear_weights, validate


def _run(tmp_path, tiny_model_dir, arch="llama", root="run", **kwargs):
    path = corpus(tmp_path)
    callback = Quantization(calibration=calibration(path), progress=False, **kwargs)
    module, metrics = validate(tiny_model_dir(arch), path, [callback], tmp_path / root)
    return callback, module, metrics


def _max_levels_per_row(weight: torch.Tensor) -> int:
    return max(len(torch.unique(row)) for row in weight)


@pytest.mark.parametrize("method", ["rtn", "gptq", "aptq"])
def test_every_method_puts_each_row_on_a_grid_of_the_requested_width(tmp_path, tiny_model_dir, method):
    callback, module, metrics = _run(tmp_path, tiny_model_dir, method=method, bits=3)
    assert callback.report["summary"]["avg_bits"] == 3
    for name, weight in linear_weights(module.model).items():
        assert _max_levels_per_row(weight) <= 2**3, name
    assert metrics["val/ppl"] > 0
    report = json.loads((tmp_path / "run" / "quant_report.json").read_text())
    record = report["modules"][0]
    assert {"bits", "hessian_trace", "weight_sq_error", "seconds", "unit"} <= set(record) or method == "rtn"


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gpt2", "opt", "gpt_neox", "gemma"])
def test_gptq_runs_on_every_architecture(tmp_path, tiny_model_dir, arch):
    callback, module, _ = _run(tmp_path, tiny_model_dir, arch=arch, method="gptq", bits=4, group_size=16)
    for name, weight in linear_weights(module.model).items():
        groups = weight.reshape(weight.shape[0], -1, 16)
        assert max(len(torch.unique(g)) for row in groups for g in row) <= 16, name


def test_gptq_beats_rtn_on_the_layer_outputs(tmp_path, tiny_model_dir):
    rtn, _, rtn_metrics = _run(tmp_path, tiny_model_dir, root="rtn", method="rtn", bits=2)
    gptq, _, gptq_metrics = _run(tmp_path, tiny_model_dir, root="gptq", method="gptq", bits=2)
    assert gptq_metrics["val/ppl"] != rtn_metrics["val/ppl"]
    assert all(r["gptq_loss"] is not None for r in gptq.report["modules"])


def test_aptq_without_attention_awareness_equals_gptq_bitwise(tmp_path, tiny_model_dir):
    _, gptq, _ = _run(tmp_path, tiny_model_dir, root="gptq", method="gptq", bits=3)
    _, aptq, _ = _run(tmp_path, tiny_model_dir, root="aptq", method="aptq", bits=3, attention_aware=False)
    a, b = linear_weights(gptq.model), linear_weights(aptq.model)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_attention_aware_hessian_changes_only_qkv(tmp_path, tiny_model_dir):
    _, gptq, _ = _run(tmp_path, tiny_model_dir, root="gptq", method="gptq", bits=3, true_sequential=False)
    callback, aptq, _ = _run(tmp_path, tiny_model_dir, root="aptq", method="aptq", bits=3, true_sequential=False)
    a, b = linear_weights(gptq.model), linear_weights(aptq.model)
    layer0 = [n for n in a if ".layers.0." in n]
    assert any(not torch.equal(a[n], b[n]) for n in layer0 if n.endswith(("q_proj", "k_proj", "v_proj")))
    # Layer 0 sees identical inputs in both runs, so its non-attention modules get identical Hessians.
    assert all(torch.equal(a[n], b[n]) for n in layer0 if n.endswith(("o_proj", "gate_proj", "up_proj")))
    flags = {r["name"]: r["attention_aware"] for r in callback.report["modules"]}
    assert flags["model.layers.0.self_attn.q_proj"] and not flags["model.layers.0.mlp.up_proj"]


@pytest.mark.parametrize("allocation, sensitivity", [("sensitivity", "loss"), ("sensitivity", "layer"),
                                                     ("by_type", "loss")])
def test_mixed_precision_meets_the_budget_and_couples_fused_modules(tmp_path, tiny_model_dir, allocation,
                                                                    sensitivity):
    callback, module, _ = _run(tmp_path, tiny_model_dir, method="aptq", target_avg_bits=3.0,
                               candidate_bits=[2, 4], allocation=allocation, sensitivity=sensitivity)
    records = {r["name"]: r for r in callback.report["modules"]}
    assert callback.report["summary"]["avg_bits"] <= 3.0 + 1e-9
    assert {r["bits"] for r in records.values()} <= {2, 4}
    for layer in (0, 1):
        prefix = f"model.layers.{layer}."
        assert len({records[prefix + f"self_attn.{p}_proj"]["bits"] for p in "qkv"}) == 1
        assert records[prefix + "mlp.gate_proj"]["bits"] == records[prefix + "mlp.up_proj"]["bits"]
    assert all({"trace", "omega", "rtn_err"} <= set(r) for r in records.values())
    assert callback.report["summary"]["pass1_seconds"] > 0
    if allocation == "by_type":
        for kind in ("o_proj", "down_proj"):
            assert len({r["bits"] for n, r in records.items() if n.endswith(kind)}) == 1


def test_quantization_after_pruning_keeps_the_zeros(tmp_path, tiny_model_dir):
    path = corpus(tmp_path)
    prune = Pruning(method="wanda", calibration=calibration(path), progress=False)
    quant = Quantization(method="gptq", bits=4, calibration=calibration(path), progress=False)
    module, _ = validate(tiny_model_dir("llama"), path, [prune, quant], tmp_path)
    for name, weight in linear_weights(module.model).items():
        assert (weight == 0).float().mean().item() >= 0.5, name
        assert _max_levels_per_row(weight) <= 16, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5}, r"bits=5.*\[2, 3, 4, 8\]"),
        ({"target_avg_bits": 4.5, "candidate_bits": [2, 4]}, r"target_avg_bits=4.5.*2 <= target_avg_bits <= 4"),
        ({"target_avg_bits": 3.0, "candidate_bits": []}, r"candidate_bits=\[\] is empty"),
        ({"target_avg_bits": 3.0, "candidate_bits": [2, 6]}, r"unsupported widths \[6\]"),
        ({"method": "awq"}, r"method='awq'"),
        ({"group_size": 0}, r"group_size=0"),
        ({"sensitivity": "hutchinson"}, r"sensitivity='hutchinson'.*\['loss', 'layer'\]"),
        ({"probe_space": "v_out"}, r"probe_space='v_out'.*\['attn_out', 'o_proj_out'\]"),
    ],
)
def test_bad_options_raise_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Quantization(**kwargs)


def test_group_size_that_does_not_divide_in_features(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match=r"group_size=24 does not divide in_features=\d+ of layer 0"):
        _run(tmp_path, tiny_model_dir, method="gptq", group_size=24)


def test_aptq_refuses_a_model_it_cannot_probe(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match=r"attention_aware=False"):
        _run(tmp_path, tiny_model_dir, arch="gpt2", method="aptq")


def test_mixed_precision_export_reloads_in_transformers_with_identical_logits(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    callback, module, _ = _run(tmp_path, tiny_model_dir, method="aptq", target_avg_bits=3.0, candidate_bits=[2, 4],
                               symmetric=True, group_size=16, export_dir=str(tmp_path / "export"))
    assert {r["bits"] for r in callback.report["modules"]} == {2, 4}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.tensor([[3, 17, 42, 5, 99, 7, 1, 250]])
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
    config = json.loads((tmp_path / "export" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and len(config["config_groups"]) == 2


def test_loss_sensitivity_uses_the_fisher_traces_of_the_calibration_windows(tmp_path, tiny_model_dir):
    """``sensitivity="loss"``: each module's trace is (1/N)·Σ_n‖∂L_n/∂W‖² over the calibration windows, and the
    layer-output traces (``"layer"``) give a different plan input on the same model."""
    from transformers import AutoModelForCausalLM

    path = corpus(tmp_path)
    data = calibration(path)
    callback = Quantization(method="gptq", target_avg_bits=3.0, candidate_bits=[2, 4], calibration=data,
                            progress=False)
    validate(tiny_model_dir("llama"), path, [callback], tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()
    windows = data.calibration_windows()
    expected: dict[str, float] = {}
    for row in windows:
        model.zero_grad()
        model(input_ids=row[None], labels=row[None]).loss.backward()
        for name, module in model.named_modules():
            if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
                expected[name] = expected.get(name, 0.0) + float(module.weight.grad.double().square().sum())
    traces = {r["name"]: r["trace"] for r in callback.report["modules"]}
    assert traces.keys() == expected.keys()
    for name, trace in traces.items():
        assert trace == pytest.approx(expected[name] / len(windows), rel=1e-4), name
    layer, _, _ = _run(tmp_path, tiny_model_dir, root="layer", method="gptq", target_avg_bits=3.0,
                       candidate_bits=[2, 4], sensitivity="layer")
    assert {r["name"]: r["trace"] for r in layer.report["modules"]} != traces
