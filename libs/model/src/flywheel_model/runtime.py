"""ONNX Runtime sessions built from settings: the CUDA provider with its arena limits, or the CPU."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, Field

from flywheel_model.ggml_blocks import PREFILL_MODEL, fp32_activation_blocks
from flywheel_model.output_projection import CHECKED

log = logging.getLogger(__name__)


class OrtSettings(BaseModel):
    """Execution provider and its options; `auto` uses CUDA only where a GPU really is present."""

    provider: Literal["auto", "cuda", "cpu"] = "auto"
    device_id: int = Field(default=0, ge=0)
    # Bytes the CUDA memory arena may take; 0 means no limit.
    gpu_mem_limit: int = Field(default=0, ge=0)
    arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = "kSameAsRequested"
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "HEURISTIC"
    do_copy_in_default_stream: bool = True
    # 0 lets ONNX Runtime choose (one per physical core).
    intra_op_threads: int = Field(default=0, ge=0)
    inter_op_threads: int = Field(default=1, ge=0)
    # Keep the KV cache in the provider's memory between decode steps (ONNX Runtime I/O binding), so
    # a step copies only its tokens in and its logits out; `auto` binds on CUDA, where the cache's
    # round trip through host memory bounds decoding.
    io_binding: Literal["auto", "on", "off"] = "auto"
    # Decode several sequences in one step on CUDA too. Off: it failed there with the cache fed from
    # host memory (GroupQueryAttention could not allocate from its arena) and has not been measured
    # with the cache bound to the device; tests/gpu checks it when turned on (docs/inference.md).
    cuda_batching: bool = False
    # On the CPU, decode in one buffer per layer that GroupQueryAttention reads as the past and
    # writes as the present in place (SharedCache), instead of copying the whole cache into a new
    # present every step. Off: the stacked cache (StackedCache), which the CUDA path uses.
    shared_cache: bool = True
    # On the CPU, prefill the part every prompt starts with (instructions and template, given by
    # Decoder.cache_prefix) once, and each prompt from where it ends. Off: every prompt from its start.
    prefix_cache: bool = True
    # While one greedy sequence decodes alone, copy the tokens that followed its last words where
    # they appear earlier (in its prompt or answer) as drafts, and check them in one step
    # (generation.py, "Drafts"); where the graph and the cache allow it (Decoder.drafts). Off: one
    # token a step.
    drafts: bool = True


def cuda_device_count() -> int:
    """GPUs the CUDA driver reports; 0 where there is no driver or no device."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_provider_options(settings: OrtSettings) -> dict[str, str]:
    """The CUDA execution provider's options, as ONNX Runtime wants them (strings)."""
    options = {
        "device_id": str(settings.device_id),
        "arena_extend_strategy": settings.arena_extend_strategy,
        "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
        "do_copy_in_default_stream": "1" if settings.do_copy_in_default_stream else "0",
    }
    if settings.gpu_mem_limit:
        options["gpu_mem_limit"] = str(settings.gpu_mem_limit)
    return options


def choose_providers(settings: OrtSettings) -> list[Any]:
    """The provider list: CUDA (with options) then CPU as fallback, or CPU alone."""
    want_cuda = settings.provider == "cuda" or (settings.provider == "auto" and cuda_device_count() > 0)
    if not want_cuda:
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        log.warning("CUDA requested but this onnxruntime build has no CUDA provider: serving on CPU")
        return ["CPUExecutionProvider"]
    if cuda_device_count() == 0:
        log.warning("CUDA requested but no GPU is visible: serving on CPU")
        return ["CPUExecutionProvider"]
    # CUDA and cuDNN installed as pip packages (nvidia-*) are not on the loader's path: load them
    # first, or the session silently falls back to the CPU provider.
    ort.preload_dlls(msvc=False)
    return [("CUDAExecutionProvider", cuda_provider_options(settings)), "CPUExecutionProvider"]


@dataclass(frozen=True)
class DecoderSpec:
    """Shapes and names of a decoder with KV cache, read from the exported genai_config.json."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    context_length: int
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"

    @classmethod
    def load(cls, model_dir: Path) -> DecoderSpec:
        config = json.loads((model_dir / "genai_config.json").read_text())["model"]
        decoder = config["decoder"]
        eos = config["eos_token_id"]
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        generation_config = model_dir / "generation_config.json"
        if generation_config.is_file():
            extra = json.loads(generation_config.read_text()).get("eos_token_id")
            if extra is not None:
                eos_ids = tuple(dict.fromkeys([*eos_ids, *(extra if isinstance(extra, list) else [extra])]))
        pad = config.get("pad_token_id", eos_ids[0])
        return cls(
            num_layers=decoder["num_hidden_layers"],
            num_kv_heads=decoder["num_key_value_heads"],
            head_size=decoder["head_size"],
            eos_token_ids=eos_ids,
            pad_token_id=pad[0] if isinstance(pad, list) else pad,
            context_length=config.get("context_length", 2048),
            past_key=decoder["inputs"]["past_key_names"],
            past_value=decoder["inputs"]["past_value_names"],
            present_key=decoder["outputs"]["present_key_names"],
            present_value=decoder["outputs"]["present_value_names"],
        )


# A KV cache by past input name: numpy arrays on the host, or OrtValues in the provider's memory
# when the decoder binds its outputs there.
KV = dict[str, Any]


def release_memory() -> None:
    """Collects unreachable objects and hands the C heap's free pages back to the system (glibc's
    `malloc_trim`; elsewhere only the collection)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Decoder:
    """One ONNX decoder session: prefill a prompt, or decode one token for a batch of sequences."""

    def __init__(self, model_dir: Path, settings: OrtSettings) -> None:
        self.model_dir = Path(model_dir)
        self.spec = DecoderSpec.load(self.model_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = settings.inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = choose_providers(settings)
        self.session = ort.InferenceSession(str(self.model_dir / "model.onnx"), options, providers=providers)
        # A model stored as a GGUF's blocks has a graph of its own for prompts (fp32 layers, faster on
        # hundreds of positions); it fills the same cache the decode steps read.
        prefill_path = self.model_dir / PREFILL_MODEL
        self.prefill_session = (
            ort.InferenceSession(str(prefill_path), options, providers=providers)
            if prefill_path.is_file()
            else self.session
        )
        self.provider = self.session.get_providers()[0]
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if self.provider != wanted:
            log.warning("%s could not be loaded: serving on %s", wanted, self.provider)
        on_cuda = self.provider == "CUDAExecutionProvider"
        self.io_bound = settings.io_binding == "on" or (settings.io_binding == "auto" and on_cuda)
        self.batches = not on_cuda or settings.cuda_batching
        self.shares_cache = settings.shared_cache and not on_cuda
        self.caches_prefix = settings.prefix_cache and not self.io_bound
        # Tokens drafted ahead that one step can check (Decoder.check): where the cache is shared in
        # place, the graph projects a short run's every position (output_projection.CHECKED), and a
        # step of several positions costs little more than one.
        positions = self.session.get_outputs()[0].shape[1]
        drafting = self.shares_cache and settings.drafts and positions != 1
        self.drafts = (
            CHECKED - 1 if drafting and not fp32_activation_blocks(self.model_dir / "model.onnx") else 0
        )
        self._prefix: tuple[tuple[int, ...], KV] | None = None
        self._device = ("cuda", settings.device_id) if on_cuda else ("cpu", 0)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.kv_dtype = np.float16 if "float16" in inputs[self.spec.past_key % 0].type else np.float32
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._past_names = [
            (self.spec.past_key % i, self.spec.past_value % i) for i in range(self.spec.num_layers)
        ]
        self._present_to_past = {
            self.spec.present_key % i: self.spec.past_key % i for i in range(self.spec.num_layers)
        } | {self.spec.present_value % i: self.spec.past_value % i for i in range(self.spec.num_layers)}
        place = (
            ", past and present shared"
            if self.shares_cache
            else ", bound to the device"
            if self.io_bound
            else ""
        )
        log.info(
            "decoder %s on %s (kv %s%s)", self.model_dir, self.provider, np.dtype(self.kv_dtype).name, place
        )

    def close(self) -> None:
        """Lets the sessions and the prefix's cache go; the decoder cannot run after this."""
        del self.session, self.prefill_session
        self._prefix = None

    def new_cache(self, max_rows: int) -> BatchCache:
        """An empty cache for a batch of up to `max_rows` sequences, of the kind this decoder steps."""
        if not self.shares_cache:
            return StackedCache()
        shape = (self.spec.num_kv_heads, self.spec.head_size)
        names = [name for pair in self._past_names for name in pair]
        return SharedCache(names, shape, self.kv_dtype, max_rows, self.spec.context_length)

    def empty_kv(self, batch: int = 1) -> KV:
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_size)
        return {name: np.zeros(shape, self.kv_dtype) for pair in self._past_names for name in pair}

    def _run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, kv: KV, session: Any = None
    ) -> tuple[np.ndarray, KV]:
        session = session or self.session
        if self.io_bound:
            outputs = self._run_bound(session, input_ids, attention_mask, kv)
        else:
            outputs = session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask, **kv})
        logits = np.asarray(outputs[0], dtype=np.float32)[:, -1, :]
        present = {
            self._present_to_past[n]: v for n, v in zip(self._output_names[1:], outputs[1:], strict=True)
        }
        return logits, present

    def _run_bound(
        self, session: Any, input_ids: np.ndarray, attention_mask: np.ndarray, kv: KV
    ) -> list[Any]:
        """One run whose present cache stays on the device; the logits come back to the host."""
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        for name, value in kv.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:  # a cache stacked on the host, or the empty one: copied to the device once
                binding.bind_cpu_input(name, value)
        binding.bind_output(self._output_names[0], "cpu")
        for name in self._output_names[1:]:
            binding.bind_output(name, *self._device)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return [outputs[0].numpy(), *outputs[1:]]

    def cache_prefix(self, token_ids: Sequence[int]) -> None:
        """Prefills `token_ids` once, so that a prompt starting with them prefills only the rest.

        Every prompt that starts with the prefix is split at the same place, whatever ran before it,
        so an answer does not depend on timing. Not done where the cache lives on the device
        (`prefix_cache` off, or I/O binding).
        """
        self._prefix = None
        if not self.caches_prefix or not token_ids:
            return
        ids = np.asarray([token_ids], dtype=np.int64)
        _, kv = self._run(ids, np.ones_like(ids), self.empty_kv(), self.prefill_session)
        self._prefix = (tuple(int(t) for t in token_ids), kv)
        log.info(
            "decoder %s: the %d tokens every prompt starts with are prefilled once",
            self.model_dir,
            len(token_ids),
        )

    @property
    def prefix_length(self) -> int:
        """Positions of the cached prefix (0 without one)."""
        return len(self._prefix[0]) if self._prefix else 0

    def prefill(self, token_ids: list[int]) -> tuple[np.ndarray, KV]:
        """Runs a prompt; returns the last position's logits [vocab] and the KV cache of all of it.

        A prompt that starts with the cached prefix (and goes on past it) runs from where it ends,
        its past being the prefix's cache; ONNX Runtime only reads a past, so the prefix stays intact.
        """
        past, start = self.empty_kv(), 0
        if self._prefix is not None:
            prefix, kv = self._prefix
            if len(token_ids) > len(prefix) and tuple(token_ids[: len(prefix)]) == prefix:
                past, start = kv, len(prefix)
        ids = np.asarray([token_ids[start:]], dtype=np.int64)
        mask = np.ones((1, len(token_ids)), dtype=np.int64)
        logits, kv = self._run(ids, mask, past, self.prefill_session)
        return logits[0], kv

    def decode(self, tokens: np.ndarray, lengths: np.ndarray, cache: BatchCache) -> np.ndarray:
        """One step for a batch: `lengths[b]` tokens of row b are in the right-padded cache, and the
        step's token goes to position `lengths[b]`. Returns the logits [batch, vocab]."""
        ids = tokens.reshape(-1, 1).astype(np.int64)
        if isinstance(cache, SharedCache):
            width = int(lengths.max()) + 1
            cache.reserve(width)
            return self._run_in_place(ids, _attention_mask(lengths, width), cache)[:, -1, :]
        assert cache.kv is not None
        logits, cache.kv = self._run(ids, _attention_mask(lengths, kv_width(cache.kv) + 1), cache.kv)
        return logits

    def check(self, tokens: list[int], length: int, cache: BatchCache) -> np.ndarray:
        """One step for a shared cache of one sequence that holds `length` positions: `tokens` (its
        last token and up to `drafts` drafted after it) go to positions `length` on, and each one's
        logits come back [len(tokens), vocab]. A drafted token the logits before it reject leaves
        its position in the cache, past the sequence's length, where the next step overwrites it."""
        if not isinstance(cache, SharedCache) or cache.rows != 1 or not 0 < len(tokens) <= self.drafts + 1:
            raise ValueError(f"a step checks 1 to {self.drafts + 1} tokens of one sequence in a shared cache")
        width = length + len(tokens)
        cache.reserve(width)
        ids = np.asarray([tokens], dtype=np.int64)
        return self._run_in_place(ids, np.ones((1, width), dtype=np.int64), cache)[0]

    def _run_in_place(self, input_ids: np.ndarray, mask: np.ndarray, cache: SharedCache) -> np.ndarray:
        """One step whose present is bound to the same memory as its past (the cache's rows); the
        logits of the positions the graph projects [rows, positions, vocab]."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        rows = {name: ort.OrtValue.ortvalue_from_numpy(view) for name, view in cache.views().items()}
        for name, value in rows.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self._output_names[0], "cpu")
        for name in self._output_names[1:]:
            binding.bind_ortvalue_output(name, rows[self._present_to_past[name]])
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.get_outputs()[0].numpy(), dtype=np.float32)


def _attention_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    """Row b attends to its `lengths[b]` cached positions and the new one, of `width` columns."""
    return (np.arange(width)[None, :] <= lengths[:, None]).astype(np.int64)


def kv_width(kv: KV) -> int:
    """Positions held by a cache (its third axis), on the host or on the device."""
    value = next(iter(kv.values()))
    return int((value.shape() if isinstance(value, ort.OrtValue) else value.shape)[2])


def _host(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, ort.OrtValue) else value


def stack_kv(parts: list[tuple[KV, int]]) -> KV:
    """Stacks per-sequence caches (each with its valid length) into one right-padded batch cache.

    Done on the host: a cache bound to the device is copied back once, when the batch changes, and
    the next decode step binds the stacked cache to the device again.
    """
    width = max(length for _, length in parts)
    out: KV = {}
    for name in parts[0][0]:
        arrays = []
        for kv, length in parts:
            array = _host(kv[name])[:, :, :length]
            if length < width:
                pad = np.zeros((*array.shape[:2], width - length, array.shape[3]), array.dtype)
                array = np.concatenate([array, pad], axis=2)
            arrays.append(array)
        out[name] = np.concatenate(arrays, axis=0)
    return out


def select_rows(kv: KV, rows: list[int], width: int) -> KV:
    """Keeps the given batch rows of a cache, trimmed to `width` positions."""
    index = np.asarray(rows)
    return {name: np.ascontiguousarray(_host(array)[index, :, :width]) for name, array in kv.items()}


class StackedCache:
    """The batch cache as one right-padded array per past input, replaced by each step's present.

    The CUDA path: there the present stays in device memory from step to step (I/O binding), and
    comes back to the host to be stacked or trimmed only when the batch changes.
    """

    def __init__(self) -> None:
        self.kv: KV | None = None

    def append(self, kv: KV, length: int) -> None:
        parts = [(kv, length)]
        if self.kv is not None:
            parts.insert(0, (self.kv, kv_width(self.kv)))
        self.kv = stack_kv(parts)

    def keep(self, rows: list[int], lengths: list[int]) -> list[int]:
        """Keeps the given rows, in their order, trimmed to the longest; returns them."""
        self.kv = select_rows(self.kv, rows, max(lengths[r] for r in rows)) if rows and self.kv else None
        return rows

    def clear(self) -> None:
        self.kv = None


class SharedCache:
    """The batch cache as one buffer per past input, shaped (rows, kv heads, capacity, head size).

    Rows [0, n) hold the running sequences, each from position 0 to its length. A decode step binds
    every buffer as both its past input and its present output, so GroupQueryAttention runs in its
    shared-buffer mode (past and present are the same memory) and writes each row's new position in
    place; with separate buffers it copies the whole cache into a new present on every step, which
    at 16 rows of ~500 positions costs more than the step's matrix products. A sequence joins by
    copying its prefilled cache into row n; one that ends is overwritten by the last row. The
    capacity grows by `GROW` positions (a copy of the rows in use) when a step needs more, and the
    buffers are let go when the batch empties.
    """

    GROW = 128

    def __init__(
        self, names: list[str], shape: tuple[int, int], dtype: Any, max_rows: int, context_length: int
    ) -> None:
        self._names = names
        self._shape = shape
        self._dtype = dtype
        self._max_rows = max_rows
        self._context_length = context_length
        self._buffers: dict[str, np.ndarray] = {}
        self.rows = 0
        self.capacity = 0

    def reserve(self, positions: int) -> None:
        """Makes room for `positions` positions per row, keeping what the rows hold."""
        if positions <= self.capacity:
            return
        if positions > self._context_length:
            raise ValueError(f"{positions} positions do not fit the context of {self._context_length}")
        capacity = min(self._context_length, -(-positions // self.GROW) * self.GROW)
        heads, size = self._shape
        buffers = {}
        for name in self._names:
            # np.zeros maps pages lazily: rows never used cost no memory.
            buffer = np.zeros((self._max_rows, heads, capacity, size), self._dtype)
            if name in self._buffers:
                buffer[: self.rows, :, : self.capacity] = self._buffers[name][: self.rows]
            buffers[name] = buffer
        self._buffers, self.capacity = buffers, capacity

    def append(self, kv: KV, length: int) -> None:
        """Copies one sequence's cache (batch 1, at least `length` positions) into a new last row."""
        if self.rows == self._max_rows:
            raise RuntimeError(f"the cache holds {self._max_rows} rows at most")
        self.reserve(length + 1)
        for name, buffer in self._buffers.items():
            buffer[self.rows, :, :length] = _host(kv[name])[0, :, :length]
        self.rows += 1

    def keep(self, rows: list[int], lengths: list[int]) -> list[int]:
        """Keeps the given rows (`lengths`: every row's positions in use); the last rows move into
        the gaps. Returns the kept rows' old indices in their new order."""
        order = list(range(self.rows))
        for row in sorted(set(order) - set(rows), reverse=True):
            last = len(order) - 1
            if row != last:
                width = lengths[order[last]]
                for buffer in self._buffers.values():
                    buffer[row, :, :width] = buffer[last, :, :width]
                order[row] = order[last]
            order.pop()
        self.rows = len(order)
        if not self.rows:
            self.clear()
        return order

    def clear(self) -> None:
        self._buffers, self.rows, self.capacity = {}, 0, 0

    def views(self) -> dict[str, np.ndarray]:
        """The rows in use of each buffer (contiguous: the leading rows of a C-ordered array)."""
        return {name: buffer[: self.rows] for name, buffer in self._buffers.items()}


BatchCache = SharedCache | StackedCache
