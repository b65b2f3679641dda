"""Sequential calibration engine and decoder-layer discovery (specs/pruning.md §1, §9 tests 9 and 11)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from callbacks.calibration.engine import SequentialEngine, estimate_cache_bytes, unwrap_output
from callbacks.calibration.layers import (
    DecoderLayersNotFoundError,
    compressible_linears,
    find_decoder_layers,
    set_weight_matrix,
    weight_matrix,
)
from tests.tiny_models import VOCAB_SIZE, build_tiny_model

EXPECTED_PATHS = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers", "gemma": "model.layers",
                  "opt": "model.decoder.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}
# T=24 exceeds the tiny Qwen2 (8) and Mistral (16) sliding windows, so sliding masks really differ from causal ones.
N, T = 3, 24
GiB = 2**30


def _ids(n: int = N, t: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB_SIZE, (n, t), generator=torch.Generator().manual_seed(seed))


def _last_layer_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The full model's own output of its last decoder layer (the final norm's input)."""
    _, layers = find_decoder_layers(model)
    seen = []
    handle = layers[-1].register_forward_hook(lambda m, i, o: seen.append(unwrap_output(o)))
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    return seen[0]


def _noop(index, name, layer, forward) -> None:
    forward()


def _zero_first_weight(index, name, layer, forward) -> None:
    """Compress layer 0 only: zero one input column of its first linear (sorted order)."""
    forward()
    if index == 0:
        first = next(iter(compressible_linears(layer).values()))
        weight_matrix(first)[:, 0] = 0.0


# ------------------------------------------------------------------ discovery


def test_find_decoder_layers_expected_path(arch):
    model = build_tiny_model(arch)
    name, layers = find_decoder_layers(model)
    assert name == EXPECTED_PATHS[arch]
    assert layers is model.get_submodule(EXPECTED_PATHS[arch]) and len(layers) == 2


class _NoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])


def test_find_decoder_layers_raises_clearly_and_accepts_override():
    model = _NoLayers()
    with pytest.raises(DecoderLayersNotFoundError, match="layers_path") as err:
        find_decoder_layers(model)
    assert "blocks: 2 x Linear" in str(err.value) and "transformer.h" in str(err.value)
    assert find_decoder_layers(model, layers_path="blocks") == ("blocks", model.blocks)
    with pytest.raises(DecoderLayersNotFoundError, match="points to a Linear"):
        find_decoder_layers(model, layers_path="blocks.0")


def test_compressible_linears_and_weight_view():
    gpt2_block = find_decoder_layers(build_tiny_model("gpt2"))[1][0]
    linears = compressible_linears(gpt2_block)
    assert list(linears) == sorted(linears) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    c_fc = linears["mlp.c_fc"]
    assert isinstance(c_fc, Conv1D)
    x = torch.randn(5, c_fc.weight.shape[0])
    with torch.no_grad():
        assert torch.allclose(nn.functional.linear(x, weight_matrix(c_fc), c_fc.bias), c_fc(x), atol=1e-6)
        new = torch.randn_like(weight_matrix(c_fc))
        set_weight_matrix(c_fc, new)
    assert torch.equal(c_fc.weight, new.t())
    with pytest.raises(ValueError, match="shape"):
        set_weight_matrix(c_fc, new.t())
    llama_layer = find_decoder_layers(build_tiny_model("llama"))[1][0]
    names = list(compressible_linears(llama_layer))
    assert names == sorted(names) and "self_attn.q_proj" in names and "mlp.down_proj" in names


# ------------------------------------------------------------------ fidelity (§9.9)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_engine_reproduces_final_hidden_states(arch, batch_size):
    model = build_tiny_model(arch)
    ids = _ids()
    expected = _last_layer_output(model, ids)
    layers = list(find_decoder_layers(model)[1])
    out = SequentialEngine(model, ids, batch_size=batch_size, progress=False).run(_noop)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-5)
    assert model.config.use_cache is True
    assert list(find_decoder_layers(model)[1]) == layers  # recorders removed


def test_qwen2_layers_get_their_own_masks():
    """Layer 1 of the tiny Qwen2 is a sliding layer: its recorded mask must not be layer 0's causal one."""
    engine = SequentialEngine(build_tiny_model("qwen2"), _ids(), progress=False)
    with engine.session():
        engine.capture()
        full, sliding = engine.layer_call(0).kwargs["attention_mask"], engine.layer_call(1).kwargs["attention_mask"]
    assert sliding is not None and (full is None or not torch.equal(full, sliding))


def test_all_ones_mask_accepted_and_padding_refused():
    model = build_tiny_model("llama")
    ids = _ids()
    ones = torch.ones_like(ids)
    out = SequentialEngine(model, ids, attention_mask=ones, progress=False).run(_noop)
    assert torch.allclose(out, _last_layer_output(model, ids), atol=1e-5)
    ones[1, -2:] = 0
    with pytest.raises(ValueError, match=r"windows \[1\] contain padding"):
        SequentialEngine(model, ids, attention_mask=ones)


def test_engine_in_train_mode_runs_eval_and_restores_flags():
    model = build_tiny_model("opt").train()  # OPT has dropout 0.1: a training-mode forward would not be reproducible
    expected = _last_layer_output(model.eval(), _ids())
    model.train()
    out = SequentialEngine(model, _ids(), batch_size=2, progress=False).run(_noop)
    assert torch.allclose(out, expected, atol=1e-5)
    assert all(m.training for m in model.modules())


# ------------------------------------------------------------------ inference mode (§1.3.1)


def _grad_step_then_prune(index, name, layer, forward) -> None:
    """Like LLM-Barber: a hook needs autograd on the layer's input; then prune by the gradient-free magnitude."""
    target = next(iter(compressible_linears(layer).values()))
    grads = []

    def hook(module, inputs, output):
        with torch.enable_grad():
            x = inputs[0].detach().requires_grad_(True)
            nn.functional.linear(x, module.weight).pow(2).sum().backward()
            grads.append(x.grad.abs().sum())
    handle = target.register_forward_hook(hook)
    forward()
    handle.remove()
    assert grads and all(g > 0 for g in grads)
    w = weight_matrix(target)
    w[w.abs() < w.abs().median()] = 0.0
    target.zero_grad(set_to_none=True)


def test_engine_works_inside_inference_mode():
    ids = _ids()
    reference_model, model = build_tiny_model("llama"), build_tiny_model("llama")
    reference = SequentialEngine(reference_model, ids, progress=False).run(_grad_step_then_prune)
    with torch.inference_mode():
        inference_ids = ids.clone()
        out = SequentialEngine(model, inference_ids, batch_size=2, progress=False).run(_grad_step_then_prune)
    assert not out.is_inference()
    assert torch.allclose(out, reference, atol=1e-5)
    assert torch.allclose(out, _last_layer_output(model, ids), atol=1e-5)


# ------------------------------------------------------------------ propagation and untouched modules


def test_compressed_outputs_propagate(arch):
    """Editing layer 0 inside process_layer must show in layer 1's calibration inputs and the final stream,
    exactly as if the edit had been made to the full model."""
    model = build_tiny_model(arch)
    ids = _ids()
    dense = _last_layer_output(model, ids)
    seen_by_layer1 = []

    def process(index, name, layer, forward):
        _zero_first_weight(index, name, layer, forward)
        if index == 1:
            handle = layer.register_forward_pre_hook(lambda m, args: seen_by_layer1.append(args[0].clone()))
            forward()
            handle.remove()

    out = SequentialEngine(model, ids, batch_size=2, progress=False).run(process)
    layer1_inputs = []
    handle = find_decoder_layers(model)[1][1].register_forward_pre_hook(lambda m, a: layer1_inputs.append(a[0]))
    edited = _last_layer_output(model, ids)
    handle.remove()
    assert not torch.allclose(out, dense, atol=1e-4)
    assert torch.allclose(out, edited, atol=1e-5)
    assert torch.allclose(torch.cat(seen_by_layer1), layer1_inputs[0], atol=1e-5)


def _prune_half(index, name, layer, forward) -> None:
    forward()
    for module in compressible_linears(layer).values():
        w = weight_matrix(module)
        w[w.abs() <= w.abs().median()] = 0.0


def test_untouched_modules_are_bit_identical(arch):
    model = build_tiny_model(arch)
    layers_name, layers = find_decoder_layers(model)
    pruned = {f"{layers_name}.{i}.{n}.weight" for i, layer in enumerate(layers) for n in compressible_linears(layer)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    SequentialEngine(model, _ids(), progress=False).run(_prune_half)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        if key in pruned:
            assert (after[key] == 0).float().mean() >= 0.5, key
        else:
            assert torch.equal(after[key], value), key  # embeddings, lm_head, norms, biases, rotary buffers


# ------------------------------------------------------------------ offload (§1.5)


def test_offload_identical_and_moves_one_layer_at_a_time(monkeypatch):
    model = build_tiny_model("gpt_neox")
    ids = _ids()
    expected = SequentialEngine(build_tiny_model("gpt_neox"), ids, progress=False).run(_zero_first_weight)
    layers = find_decoder_layers(model)[1]
    moves: list[tuple[int, str]] = []
    original_to = nn.Module.to

    def spy_to(self, *args, **kwargs):
        for i, layer in enumerate(layers):
            if self is layer:
                moves.append((i, str(args[0] if args else kwargs.get("device"))))
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", spy_to)
    # "cpu:0" is the same memory as "cpu" but prints differently, so onloads and offloads are distinguishable.
    out = SequentialEngine(model, ids, batch_size=2, offload=True, device="cpu:0", cache_device="cpu",
                           progress=False).run(_zero_first_weight)
    assert torch.equal(out, expected)
    on, off = "cpu:0", "cpu"
    # Start: all offloaded; the return-convention probe onloads layer 0 once; then each layer on and off in
    # turn; end: every layer back on its original device.
    assert moves == [(0, off), (1, off), (0, on), (0, off), (0, on), (0, off), (1, on), (1, off), (0, off), (1, off)]
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cache_device", ["accelerator", "cpu"])
def test_offload_on_cuda(cache_device):
    model = build_tiny_model("llama").cuda()
    ids = _ids()
    expected = _last_layer_output(model, ids.cuda())
    layers = find_decoder_layers(model)[1]

    def check(index, name, layer, forward):
        assert next(layer.parameters()).is_cuda
        assert all(not next(other.parameters()).is_cuda for j, other in enumerate(layers) if j != index)
        forward()

    engine = SequentialEngine(model, ids, offload=True, cache_device=cache_device, progress=False)
    out = engine.run(check)
    assert out.device.type == ("cuda" if cache_device == "accelerator" else "cpu")
    assert torch.allclose(out.cuda(), expected, atol=1e-4)
    assert all(p.is_cuda for p in model.parameters())


def test_state_restored_when_process_layer_raises():
    model = build_tiny_model("llama").train()
    layers = list(find_decoder_layers(model)[1])

    def boom(index, name, layer, forward):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        SequentialEngine(model, _ids(), offload=True, progress=False).run(boom)
    assert list(find_decoder_layers(model)[1]) == layers
    assert model.config.use_cache is True and all(m.training for m in model.modules())


# ------------------------------------------------------------------ building blocks for two-stream methods


def test_manual_loop_with_two_streams_matches_run():
    """session/capture/new_stream/onloaded/run_layer are enough to build LLM-Barber's two streams (§3.6)."""
    ids = _ids()
    expected = SequentialEngine(build_tiny_model("qwen2"), ids, progress=False).run(_zero_first_weight)
    model = build_tiny_model("qwen2")
    engine = SequentialEngine(model, ids, batch_size=2, progress=False)
    with engine.session():
        dense = engine.capture()
        compressed = engine.new_stream()
        for index in range(len(engine.layers)):
            with engine.onloaded(index) as layer:
                engine.run_layer(index, dense)  # propagate before the edit
                _zero_first_weight(index, "", layer, lambda: None)
                engine.run_layer(index, compressed)
    assert torch.allclose(compressed, expected, atol=1e-5)
    assert not torch.allclose(dense, compressed, atol=1e-4)


# ------------------------------------------------------------------ tuple-returning layers, hidden states as kwarg


class _TupleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, hidden_states, scale=None):
        return (hidden_states + self.proj(hidden_states) * scale, None)


class _TupleModel(nn.Module):
    """An older-transformers-style model: layers return tuples and get `hidden_states=` as a keyword."""

    _no_split_modules = ["_TupleBlock"]

    def __init__(self) -> None:
        super().__init__()
        self.config = PretrainedConfig(num_hidden_layers=3, hidden_size=8, use_cache=True)
        self.embed = nn.Embedding(VOCAB_SIZE, 8)
        self.blocks = nn.ModuleList([_TupleBlock() for _ in range(3)])
        with torch.inference_mode():  # like a rotary table cached lazily during a Lightning validation loop
            self.scales = torch.arange(3.0) + 0.5

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=None):
        hidden = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            hidden = block(hidden_states=hidden, scale=self.scales[i])[0]
        return hidden


def test_tuple_convention_keyword_hidden_states_and_inference_kwargs():
    model = _TupleModel().eval()
    ids = _ids()
    with torch.no_grad():
        expected = model(ids)
    engine = SequentialEngine(model, ids, batch_size=2, progress=False)

    def grad_through_layer(index, name, layer, forward):
        call = engine.layer_call(index)
        assert not any(t.is_inference() for t in call.kwargs.values() if isinstance(t, torch.Tensor))
        with torch.enable_grad():  # saving an inference-mode `scale` for backward would raise here
            x = torch.randn(2, T, 8, requires_grad=True)
            unwrap_output(call.invoke(layer, x)).sum().backward()
        assert x.grad is not None
        forward()

    out = engine.run(grad_through_layer)
    assert torch.allclose(out, expected, atol=1e-6)


# ------------------------------------------------------------------ memory preflight (§1.6, §9.14)


def test_estimate_cache_bytes_matches_spec_table():
    assert estimate_cache_bytes(128, 2048, 4096, torch.float16) == 2 * GiB  # LLaMA-7B, one stream
    assert estimate_cache_bytes(128, 131072, 2048, torch.float16) == 64 * GiB  # wanda#44, Llama-3.2-1B
    assert estimate_cache_bytes(128, 131072, 4096, "float16") == 128 * GiB
    assert estimate_cache_bytes(128, 2048, 4096, torch.float16, streams=2) == 4 * GiB
    assert estimate_cache_bytes(128, 2048, 4096, torch.float16, streams=0) == 0
    with pytest.raises(ValueError, match="dtype"):
        estimate_cache_bytes(1, 1, 1, "half_precision")


def test_engine_cache_bytes_equals_allocated_stream():
    engine = SequentialEngine(build_tiny_model("gemma"), _ids(), progress=False)
    out = engine.run(_noop)
    assert engine.cache_bytes() == out.numel() * out.element_size()
