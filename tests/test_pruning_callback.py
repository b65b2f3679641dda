from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import AutoModelForCausalLM

from callbacks.calibration.distributed import refuse_unsupported_strategy
from callbacks.pruning.callback import Pruning
from tests.pruning_helpers import calibration, corpus, linear_weights, validate


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4", "4:8"])
def test_every_method_prunes_exactly_and_leaves_other_modules_alone(tmp_path, tiny_model_dir, method, sparsity_type):
    path = corpus(tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    callback = Pruning(method=method, sparsity_type=sparsity_type, calibration=calibration(path), progress=False)
    module, metrics = validate(tiny_model_dir("llama"), path, [callback], tmp_path)
    summary = callback.report["summary"]
    assert summary["sparsity"] == pytest.approx(0.5) and summary["nm_violations"] == 0
    for name, weight in linear_weights(module.model).items():
        assert (weight == 0).float().mean() >= 0.5, name
    # Embeddings, norms and the LM head are bit-identical (§9 test 11).
    pruned = dict(module.model.named_parameters())
    for name, param in dense.named_parameters():
        if "proj" not in name:
            assert torch.equal(param, pruned[name]), name
    assert metrics["val/ppl"] > 0
    report = json.loads((tmp_path / "sparsity_report.json").read_text())
    assert report["summary"] == summary and len(report["modules"]) == 2 * 7
    if method == "magnitude":
        assert report["calibration"] is None  # magnitude needs no data
    else:
        assert report["calibration"]["nsamples"] == 6 and len(report["calibration"]["sha256"]) == 64


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "opt", "gpt2", "gpt_neox"])
def test_barber_runs_on_every_architecture_and_keeps_row_sparsity(tmp_path, tiny_model_dir, arch):
    path = corpus(tmp_path)
    init = Pruning(method="wanda", calibration=calibration(path), progress=False)
    init_module, _ = validate(tiny_model_dir(arch), path, [init], tmp_path / "init")
    callback = Pruning(method="wanda", barber=True, barber_threshold=0.5, calibration=calibration(path),
                       progress=False)
    module, _ = validate(tiny_model_dir(arch), path, [callback], tmp_path / "barber")
    swaps = 0
    for name, weight in linear_weights(module.model).items():
        before = linear_weights(init_module.model)[name]
        # output1 granularity: every row keeps its pruned count (§9 test 5).
        assert torch.equal((weight == 0).sum(1), (before == 0).sum(1)), name
        swaps += int(((weight == 0) != (before == 0)).sum())
    assert swaps > 0
    records = callback.report["modules"]
    assert all("block_mse_before" in r and "block_mse_after" in r for r in records)


def test_barber_with_zero_threshold_keeps_the_init_mask_on_dense_weights(tmp_path, tiny_model_dir):
    path = corpus(tmp_path)
    dense = linear_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")))
    init = Pruning(method="sparsegpt", calibration=calibration(path), progress=False)
    init_module, _ = validate(tiny_model_dir("llama"), path, [init], tmp_path / "init")
    barber = Pruning(method="sparsegpt", barber=True, barber_threshold=0.0, calibration=calibration(path),
                     progress=False)
    module, _ = validate(tiny_model_dir("llama"), path, [barber], tmp_path / "barber")
    for name, weight in linear_weights(module.model).items():
        mask = linear_weights(init_module.model)[name] == 0
        # τ = 0: same mask, weights reset to dense, SparseGPT's updates dropped (§9 test 4).
        assert torch.equal(weight, dense[name].masked_fill(mask, 0)), name


def test_barber_lowers_the_block_error_on_average(tmp_path, tiny_model_dir):
    path = corpus(tmp_path)
    callback = Pruning(method="magnitude", barber=True, barber_threshold=0.3, barber_granularity="layer",
                       calibration=calibration(path), progress=False)
    validate(tiny_model_dir("llama"), path, [callback], tmp_path)
    summary = callback.report["summary"]
    assert summary["mean_block_mse_after"] < summary["mean_block_mse_before"]


def test_runs_once_and_the_done_flag_survives_a_checkpoint(tmp_path, tiny_model_dir):
    path = corpus(tmp_path)
    callback = Pruning(method="wanda", calibration=calibration(path), progress=False)
    module, _ = validate(tiny_model_dir("llama"), path, [callback], tmp_path)
    assert callback.done and callback.state_dict() == {"done": True}
    restored = Pruning(method="wanda", calibration=calibration(path), progress=False)
    restored.load_state_dict(callback.state_dict())
    assert restored.done and restored.state_key == callback.state_key
    assert Pruning(method="magnitude").state_key != callback.state_key


def test_export_reloads_to_identical_outputs(tmp_path, tiny_model_dir):
    path = corpus(tmp_path)
    callback = Pruning(method="sparsegpt", sparsity_type="2:4", calibration=calibration(path), progress=False,
                       export_dir=str(tmp_path / "export"))
    module, _ = validate(tiny_model_dir("gpt2"), path, [callback], tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        assert torch.equal(module.model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_composes_with_a_second_callback(tmp_path, tiny_model_dir):
    path = corpus(tmp_path)
    attention = Pruning(method="magnitude", ignore=[r"\.mlp\."], progress=False)
    mlp = Pruning(method="wanda", sparsity=0.25, ignore=[r"self_attn"], calibration=calibration(path), progress=False)
    module, _ = validate(tiny_model_dir("llama"), path, [attention, mlp], tmp_path)
    for name, weight in linear_weights(module.model).items():
        expected = 0.25 if ".mlp." in name else 0.5
        assert (weight == 0).float().mean().item() == pytest.approx(expected, abs=0.02), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.2}, r"sparsity=1.2"),
        ({"sparsity": 0.0}, r"sparsity=0.0"),
        ({"sparsity_type": "4:4"}, r"sparsity_type='4:4'"),
        ({"sparsity_type": "2:4", "sparsity": 0.3}, r"sparsity"),
        ({"method": "random"}, r"method='random'.*magnitude"),
        ({"barber": True, "sparsity_type": "1:4"}, r"N/M = 0.5"),
        ({"barber": True, "barber_threshold": 2.0}, r"barber_threshold=2.0"),
        ({"batch_size": 0}, r"batch_size=0"),
    ],
)
def test_bad_options_raise_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Pruning(**kwargs)


def test_calibration_seqlen_beyond_the_context_fails_before_pruning(tmp_path, tiny_model_dir):
    path = corpus(tmp_path)
    callback = Pruning(method="wanda", calibration=calibration(path, nsamples=2, seqlen=300), progress=False)
    with pytest.raises(ValueError, match=r"seqlen=300 exceeds the model's context of 256"):
        validate(tiny_model_dir("llama"), path, [callback], tmp_path)
    assert not callback.done


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from callbacks.calibration.layers import find_decoder_layers

    with pytest.raises(ValueError, match=r"(?is)llama.*gpt-2"):
        find_decoder_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_strategies_that_cannot_gather_are_refused_with_the_alternatives():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    with pytest.raises(MisconfigurationException, match=r"ModelParallelStrategy.*strategy='fsdp' or 'ddp'"):
        refuse_unsupported_strategy(ModelParallelStrategy(), "Pruning")
    deepspeed_like = type("DeepSpeedStrategy", (DDPStrategy,), {})  # DeepSpeed itself is not installed here
    with pytest.raises(MisconfigurationException, match=r"Quantization does not support the DeepSpeedStrategy"):
        refuse_unsupported_strategy(deepspeed_like(), "Quantization")
    with pytest.raises(MisconfigurationException, match=r"offload=True.*FSDPStrategy.*offload=False"):
        refuse_unsupported_strategy(FSDPStrategy(), "Pruning", offload=True)
    refuse_unsupported_strategy(FSDPStrategy(), "Pruning")  # gathered (tests/test_distributed.py, fsdp cases)
    refuse_unsupported_strategy(DDPStrategy(), "Pruning", offload=True)


def test_barber_leaves_ignored_modules_dense(tmp_path, tiny_model_dir):
    path = corpus(tmp_path)
    dense = linear_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2")))
    callback = Pruning(method="wanda", barber=True, barber_threshold=0.3, ignore=[r"o_proj"],
                       calibration=calibration(path), progress=False)
    module, _ = validate(tiny_model_dir("qwen2"), path, [callback], tmp_path)
    for name, weight in linear_weights(module.model).items():
        if "o_proj" in name:
            assert torch.equal(weight, dense[name]), name
        else:
            assert (weight == 0).float().mean().item() == pytest.approx(0.5), name
