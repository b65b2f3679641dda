"""Sequential layer-wise calibration engine shared by the pruning and quantization callbacks (spec §1).

The model runs up to decoder layer 0 to record its inputs for every calibration window (the *stream*,
`[N, T, H]`) and the exact arguments of every decoder layer. Each layer in turn is then handed to a user
callback (hooks, calibration passes, weight rewrites) and re-run to push its possibly compressed outputs
into the stream. Pure PyTorch + transformers (no Lightning), so it is testable on a bare HF model.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from callbacks.calibration.layers import find_decoder_layers

log = logging.getLogger(__name__)

CacheDevice = Literal["accelerator", "cpu"]
#: `process_layer(index, name, layer, forward)`; `forward()` runs every calibration batch through `layer`.
ProcessLayer = Callable[[int, str, nn.Module, Callable[[], None]], None]

# Layer kwargs that would make a layer read or grow a KV cache; calibration is a plain forward.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
_FORCED_KWARGS = {"use_cache": False, "output_attentions": False}
Memo = dict[int, tuple[torch.Tensor, torch.Tensor]]  # id(source) -> (source, mapped)


class _StopForward(Exception):
    """Raised by a recorder to abandon the model's forward once the wanted layer inputs are stored."""


@dataclass
class LayerCall:
    """How the model called one decoder layer: everything except the hidden states, which live in the stream."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_as_kwarg: bool = False

    def invoke(self, layer: nn.Module, hidden: torch.Tensor) -> Any:
        """Call `layer` on `hidden` with the recorded arguments, in the model's own calling style."""
        if self.hidden_as_kwarg:
            return layer(*self.args, hidden_states=hidden, **self.kwargs)
        return layer(hidden, *self.args, **self.kwargs)


def estimate_cache_bytes(nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype | str,
                         streams: int = 1) -> int:
    """Activation-cache size `S × N × T × H × bytes(dtype)` of spec §1.6 (one buffer per stream).

    `dtype` is a torch dtype or its name (`"float16"`, `"bfloat16"`, ...). `streams` is 0 for magnitude,
    1 for Wanda/SparseGPT/GPTQ, 2 for LLM-Barber with a calibrated initial mask.
    """
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype or its name (e.g. 'float16', 'bfloat16')")
    itemsize = resolved.itemsize
    return int(streams) * int(nsamples) * int(seqlen) * int(hidden) * itemsize


def unwrap_output(out: Any) -> torch.Tensor:
    """Hidden states of a decoder-layer output: older/other layers return a tuple whose item 0 they are."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor], memo: Memo) -> Any:
    """Apply `fn` to every tensor in nested tuples/lists/dicts; a tensor shared by several kwargs maps once."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            # Keep the source alive too: a freed tensor's id can be reused by a different tensor.
            memo[id(obj)] = (obj, fn(obj))
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(x, fn, memo) for x in obj)
    if isinstance(obj, list):
        return [_map_tensors(x, fn, memo) for x in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, memo) for k, v in obj.items()}
    return obj


def _moved(call: LayerCall, device: torch.device, memo: Memo) -> LayerCall:
    """A copy of `call` with every tensor on `device` (no copy for tensors already there)."""
    args, kwargs = _map_tensors((call.args, call.kwargs), lambda t: t.to(device), memo)
    return LayerCall(args, kwargs, call.hidden_as_kwarg)


def _sanitize_call(args: tuple, kwargs: dict, memo: Memo) -> LayerCall:
    """Split off the hidden states, drop KV caches, and make inference tensors usable outside inference mode."""
    kwargs = dict(kwargs)
    hidden_as_kwarg = not args
    args = tuple(None if isinstance(a, Cache) else a for a in args[1:])
    kwargs.pop("hidden_states", None)
    for key in _CACHE_KWARGS:
        if key in kwargs:
            kwargs[key] = None
    # Only override keys the model passed: adding unknown kwargs could break layers without **kwargs.
    kwargs.update({k: v for k, v in _FORCED_KWARGS.items() if k in kwargs})
    # Lightning's validation runs in inference_mode; tensors made there (e.g. lazily cached rotary tables)
    # cannot be used where autograd may record, which LLM-Barber's gradient step needs.
    def revive(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if t.is_inference() else t
    return LayerCall(_map_tensors(args, revive, memo), _map_tensors(kwargs, revive, memo), hidden_as_kwarg)


class _Recorder(nn.Module):
    """Stand-in for decoder layer `index`: reports its call to the engine, then passes the input through."""

    def __init__(self, target: nn.Module, index: int, on_call: Callable[[int, tuple, dict], Any]) -> None:
        super().__init__()
        # Kept out of `_modules` so the real layer is not registered twice while the recorder is installed.
        self.__dict__["_target"] = target
        self.__dict__["_on_call"] = on_call
        self.index = index

    def __getattr__(self, name: str) -> Any:
        """Fall back to the real layer, for models that read layer attributes (e.g. `attention_type`)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_target"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Delegate to the engine's callback (which records, and either raises `_StopForward` or passes through)."""
        return self._on_call(self.index, args, kwargs)


def _module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (or buffer); CPU for a module with neither."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _validate_inputs(input_ids: torch.Tensor, batch_size: int, cache_device: str,
                     attention_mask: torch.Tensor | None) -> None:
    """Fail before any model work, naming the option, the bad value and what is allowed."""
    if input_ids.ndim != 2 or input_ids.numel() == 0:
        raise ValueError(f"calib_input_ids must be a non-empty [N, T] tensor, got shape {list(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if cache_device not in ("accelerator", "cpu"):
        raise ValueError(f"cache_device must be 'accelerator' or 'cpu', got {cache_device!r}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {list(attention_mask.shape)} != calib_input_ids shape "
                         f"{list(input_ids.shape)}")
    padded = [] if attention_mask is None else (attention_mask == 0).any(dim=1).nonzero().flatten().tolist()
    if padded:
        # Recorded masks are reused for every batch of a shape, which is only right without padding.
        raise ValueError(f"calibration windows {padded[:8]} contain padding (attention_mask has zeros); "
                         "calibration needs fixed-length token windows without padding")


class SequentialEngine:
    """Runs calibration windows through a HF causal LM one decoder layer at a time (spec §1.3–1.5).

    Args:
        model: a HF `PreTrainedModel` (causal LM, or a VLM whose text decoder is found by `find_decoder_layers`).
        calib_input_ids: `[N, T]` token windows (fixed length, no padding).
        batch_size: calibration windows per layer call; the last batch may be smaller.
        offload: keep decoder layers on the CPU and move only the current one to `device`; placement is restored.
        device: compute device for the current layer; default: the device of the input embeddings.
        cache_device: where the `[N, T, H]` stream lives: `"accelerator"` (= `device`) or `"cpu"` (pinned on CUDA).
        progress: show a tqdm bar over the layers.
        attention_mask: optional `[N, T]` mask; it must be all ones (windows have no padding).
        layers_path: override for `find_decoder_layers`, e.g. `"model.layers"`.
    """

    def __init__(self, model: nn.Module, calib_input_ids: torch.Tensor, batch_size: int = 1, offload: bool = False,
                 device: torch.device | str | None = None, cache_device: CacheDevice = "accelerator",
                 progress: bool = True, attention_mask: torch.Tensor | None = None,
                 layers_path: str | None = None) -> None:
        _validate_inputs(calib_input_ids, batch_size, cache_device, attention_mask)
        self.model = model
        self.layers_name, self.layers = find_decoder_layers(model, layers_path)
        self.input_ids = calib_input_ids
        self.num_samples, self.seqlen = calib_input_ids.shape  # N windows of T tokens
        self.attention_mask = attention_mask
        self.batch_size = batch_size
        self.offload = offload
        embeddings = model.get_input_embeddings()
        self.input_device = _module_device(embeddings if embeddings is not None else model)
        self.device = torch.device(device) if device is not None else self.input_device
        self.cache_device = self.device if cache_device == "accelerator" else torch.device("cpu")
        self.progress = progress
        self.stream: torch.Tensor | None = None
        self._calls: dict[tuple[int, int], list[LayerCall]] = {}
        self._calls_on: dict[tuple[tuple[int, int], int, torch.device], LayerCall] = {}
        self._device_memo: dict[torch.device, Memo] = {}
        self._returns_tuple: bool | None = None
        self._in_session = False

    def batches(self) -> list[slice]:
        """Row slices of the stream, one per calibration batch, in order."""
        starts = range(0, self.num_samples, self.batch_size)
        return [slice(s, min(s + self.batch_size, self.num_samples)) for s in starts]

    def layer_call(self, index: int, batch_size: int | None = None) -> LayerCall:
        """Recorded arguments of decoder layer `index` for batches of `batch_size` rows (default: the full size).

        Available inside a session after `capture()`; e.g. to call a block copy with the layer's own masks.
        """
        rows = min(batch_size or self.batch_size, self.num_samples)
        return self._calls[(rows, self.seqlen)][index]

    def cache_bytes(self, streams: int = 1) -> int:
        """Preflight size of `streams` activation buffers for this model and data (spec §1.6)."""
        config = self.model.config.get_text_config()
        dtype = self.model.get_input_embeddings().weight.dtype
        return estimate_cache_bytes(self.num_samples, self.seqlen, config.hidden_size, dtype, streams)

    @contextmanager
    def session(self) -> Iterator[SequentialEngine]:
        """Calibration context: autograd-capable no_grad, eval mode, no KV cache, offloaded layers.

        Everything is restored on exit, also on error. `run` opens one; multi-stream methods open it themselves.
        """
        if self._in_session:
            raise RuntimeError("SequentialEngine.session() is not re-entrant")
        configs = {id(c): c for c in (self.model.config, self.model.config.get_text_config())}.values()
        use_cache = [(c, c.use_cache) for c in configs if hasattr(c, "use_cache")]
        training = [(m, m.training) for m in self.model.modules()]
        homes = [_module_device(layer) for layer in self.layers]
        self._in_session = True
        # inference_mode(False): Lightning calls hooks inside inference_mode, whose tensors cannot enter autograd.
        with torch.inference_mode(False), torch.no_grad():
            try:
                for c, _ in use_cache:
                    c.use_cache = False
                self.model.eval()
                if self.offload:
                    for layer in self.layers:
                        layer.to("cpu")
                yield self
            finally:
                if self.offload:
                    for layer, home in zip(self.layers, homes):
                        layer.to(home)
                for module, flag in training:
                    module.training = flag
                for c, value in use_cache:
                    c.use_cache = value
                self._calls.clear()
                self._calls_on.clear()
                self._device_memo.clear()
                self._returns_tuple = None
                self._in_session = False

    @contextmanager
    def onloaded(self, index: int) -> Iterator[nn.Module]:
        """Yield decoder layer `index`, on `device` for the duration when offloading (else where it is)."""
        layer = self.layers[index]
        if not self.offload:
            yield layer
            return
        layer.to(self.device)
        try:
            yield layer
        finally:
            layer.to("cpu")

    def _record(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                stop_at: int) -> tuple[torch.Tensor, list[LayerCall]]:
        """Run the model with recorders on all layers; return layer-0 hidden states and calls of layers 0..stop_at."""
        hidden: list[torch.Tensor] = []
        calls: list[LayerCall] = []
        memo: Memo = {}

        def on_call(index: int, args: tuple, kwargs: dict) -> Any:
            states = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                hidden.append(states)
            calls.append(_sanitize_call(args, kwargs, memo))
            if index >= stop_at:
                raise _StopForward
            # Pass-through: later layers' kwargs (masks, rotary tables) depend only on shapes, not values.
            return (states,) if self._returns_tuple else states

        originals = list(self.layers)
        try:
            for i, layer in enumerate(originals):
                self.layers[i] = _Recorder(layer, i, on_call)
            kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
            self.model(input_ids=input_ids, use_cache=False, **kwargs)
        except _StopForward:
            pass
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        if len(calls) != stop_at + 1:
            raise RuntimeError(f"{type(self.model).__name__} called {len(calls)} decoder layers at {self.layers_name!r}"
                               f" (expected {stop_at + 1}); set layers_path to the right ModuleList")
        return hidden[0], calls

    def _detect_convention(self, hidden: torch.Tensor, call: LayerCall) -> bool:
        """Run the real layer 0 once: True if decoder layers return tuples, False if they return a tensor."""
        with self.onloaded(0) as layer:
            dev = _module_device(layer)
            out = _moved(call, dev, {}).invoke(layer, hidden.to(dev))
        return isinstance(out, (tuple, list))

    def capture(self) -> torch.Tensor:
        """Record layer-0 inputs of all windows into a new `[N, T, H]` stream and every layer's call arguments.

        Must run inside `session()`. Per-layer arguments are recorded once per batch shape.
        """
        if not self._in_session:
            raise RuntimeError("SequentialEngine.capture() must run inside `with engine.session():`")
        stream: torch.Tensor | None = None
        last = len(self.layers) - 1
        for rows in self.batches():
            # clone(): normal tensors even when the caller made them under inference_mode.
            ids = self.input_ids[rows].to(self.input_device).clone()
            mask = None if self.attention_mask is None else self.attention_mask[rows].to(self.input_device).clone()
            shape = (ids.shape[0], ids.shape[1])
            if self._returns_tuple is None:
                hidden, calls = self._record(ids, mask, stop_at=0)
                self._returns_tuple = self._detect_convention(hidden, calls[0])
            hidden, calls = self._record(ids, mask, stop_at=0 if shape in self._calls else last)
            if shape not in self._calls:
                self._calls[shape] = calls
            if stream is None:
                stream = self._allocate_stream(hidden)
            stream[rows].copy_(hidden)
        self.stream = stream
        return stream

    def _allocate_stream(self, first: torch.Tensor) -> torch.Tensor:
        """Empty `[N, T, H]` buffer in the hidden-states dtype on the cache device (pinned CPU memory for CUDA)."""
        size = (self.num_samples, self.seqlen, first.shape[-1])
        nbytes = estimate_cache_bytes(*size, first.dtype)
        log.info("calibration stream: %s x %s on %s = %.1f MiB", list(size), first.dtype, self.cache_device,
                 nbytes / 2**20)
        pin = self.cache_device.type == "cpu" and self.device.type == "cuda"
        return torch.empty(size, dtype=first.dtype, device=self.cache_device, pin_memory=pin)

    def new_stream(self) -> torch.Tensor:
        """A second stream holding a copy of the current one (e.g. LLM-Barber's `A_init`/`A_reb`, spec §3.6)."""
        if self.stream is None:
            raise RuntimeError("call capture() before new_stream()")
        return self.stream.clone()

    def _call_on(self, shape: tuple[int, int], index: int, device: torch.device) -> LayerCall:
        """Layer `index`'s recorded call for batch `shape`, tensors on `device` (cached per session).

        One memo per device: a tensor shared by all layers (rotary cos/sin) is copied once, not per layer.
        """
        key = (shape, index, device)
        if key not in self._calls_on:
            memo = self._device_memo.setdefault(device, {})
            self._calls_on[key] = _moved(self._calls[shape][index], device, memo)
        return self._calls_on[key]

    def run_layer(self, index: int, stream: torch.Tensor, write: bool = True,
                  on_output: Callable[[slice, torch.Tensor], None] | None = None) -> None:
        """Run every calibration batch of `stream` through decoder layer `index` where that layer currently is.

        `write=True` overwrites `stream` in place with the layer's outputs (valid because each window's output
        depends only on that window). `on_output(rows, out)` sees each batch's output before it is written.
        """
        layer = self.layers[index]
        device = _module_device(layer)
        for rows in self.batches():
            # A copy, so a layer or hook that edits its input in place cannot corrupt the stream.
            hidden = stream[rows].to(device, non_blocking=True, copy=True)
            call = self._call_on((hidden.shape[0], hidden.shape[1]), index, device)
            out = unwrap_output(call.invoke(layer, hidden))
            if on_output is not None:
                on_output(rows, out)
            if write:
                stream[rows].copy_(out)

    def run(self, process_layer: ProcessLayer) -> torch.Tensor:
        """Calibrate layer by layer; return the stream after the last layer (the final norm's input).

        For each layer, in ascending order (so every rank issues collectives identically, spec §7.4):
        `process_layer(index, name, layer, forward)` may attach hooks, call `forward()` any number of times
        (outputs discarded) and rewrite weights; afterwards the layer is re-run and its outputs replace the
        stream, so the next layer sees the compressed model's activations.
        """
        with self.session():
            stream = self.capture()
            bar = tqdm(range(len(self.layers)), desc="calibrating layers", unit="layer", disable=not self.progress)
            for index in bar:
                with self.onloaded(index) as layer:
                    forward = functools.partial(self.run_layer, index, stream, False)
                    process_layer(index, f"{self.layers_name}.{index}", layer, forward)
                    self.run_layer(index, stream, write=True)
        self.stream = None  # release the engine's reference; the caller owns the result
        return stream
