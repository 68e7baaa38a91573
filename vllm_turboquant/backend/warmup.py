"""Compile the kernels' serving variants at startup, before the first request.

Why: Triton compiles a kernel variant the first time a launch needs a new combination of
constexprs and argument specializations. Decode-only steps get theirs while vLLM captures CUDA
graphs at startup, but vLLM never runs a mixed or prefill-only step with attention before it
serves (its own attention warm-up, in kernel_warmup, is for FlashInfer only). On the H200 the
first two engine steps of the long e2e workload took 2.3 and 2.4 s instead of ~60 ms, compiling
(benchmarks/results/h200-20261203b/, call 8): a multi-second stall for the first requests of
every fresh server or container without a persistent Triton cache.

How: the metadata builder calls `warm_up` from its first `build()` (vLLM's first CUDA-graph
capture run, or the first step under --enforce-eager), before it builds that step's metadata.
For one layer per distinct attention configuration it runs `impl.forward` on hand-made batches
of every composition forward tells apart:
  * decode-only (eager here; what graphs replay for captured sizes);
  * mixed, short contexts (decodes as one-token chunks of one prefill launch);
  * mixed with a context >= split_decode_ctx (decodes through the split-KV kernel), with a
    continuation chunk over a cached prefix;
  * prefill-only, a fresh chunk and a continuation chunk;
  * steps of enough tokens to take the store's large tiles (kernels/store.store_config picks
    the tile size by the store's token count; each size is a variant of its own);
with decode counts 1 and 4 for the mixed kinds (int32 slices at element offsets 1 and 4 differ
in 16-byte alignment, one thing Triton may specialize on), and where the chunks' own keys go
through FlashAttention (backend/own_attention.py) once more with chunks long enough to take
it (the store and prefill kernels' variants for it; its continuation chunks also take the
unpacking of their prefix for FlashAttention, metadata.py's own_prefix). The tensors mirror
what vLLM hands forward: q/k/v as views of one fused [T, (Hq + 2 Hkv) * D] projection, the step's block
table with the real one's row stride. Every slot is -1 (padding): the store writes nothing
into the KV cache; the attention kernels read block 0 and their output is discarded; the
window ring is reset after. Kernel sizes that change from step to step (token, decode and
split counts, slices of per-step buffers) are unspecialized in the kernels themselves
(tests/gpu: test_step_composition_compiles_no_new_variants), so these batches cover them.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from vllm_turboquant.kernels.store import large_store_tokens

logger = logging.getLogger("vllm.turboquant")

# Tokens per hand-made chunk: small (the variants do not depend on it), above one block row of
# the prefill kernel's program for the smallest group (128 rows = 32 tokens at G 4).
CHUNK = 40


def _layer_cache(layer) -> torch.Tensor | None:
    kv = getattr(layer, "kv_cache", None)
    if isinstance(kv, (list, tuple)):
        kv = kv[0] if kv else None
    if not isinstance(kv, torch.Tensor) or kv.numel() == 0:
        return None
    return kv


def _config_key(impl, kv_cache: torch.Tensor) -> tuple:
    """What the kernels' variants depend on (layers with the same key share them)."""
    return (impl.config, impl.num_heads, impl.num_kv_heads, impl.head_size, impl.model_dtype,
            tuple(kv_cache.shape), tuple(kv_cache.stride()), kv_cache.device)


def compositions(split_ctx: int, capacity: int, own_min: int | None = None,
                 large: int | None = None, max_tokens: int | None = None,
                 max_reqs: int | None = None,
                 window: int = 0) -> list[tuple[str, list[tuple[int, int]]]]:
    """The hand-made batches: (name, [(tokens cached before this step, new tokens)] per
    request), decodes first as vLLM orders them. capacity: the most tokens a request's block
    table can address; the split path is skipped when no request can reach split_ctx (it then
    never runs in serving either). own_min: the shortest longest-chunk that takes
    FlashAttention for the chunks' own keys (backend/own_attention.py; None: off): the mixed
    and prefill kinds then run once with chunks below it and once at it.
    large: the fewest tokens whose store takes the large-store tiles
    (kernels/store.large_store_tokens; None: one config for every size), max_tokens and
    max_reqs the most tokens and requests a step has (the scheduler's budget and
    max_num_seqs): steps of at least `large` tokens then run too, with and without the chunks'
    own keys through FlashAttention, a decode-only step of `large` decodes, and (window: the
    preset's W) a step of enough chunks that its deferred window store (W entries per chunk)
    reaches `large`, each where one fits. Before these (2026-12-08), every e2e engine on the
    H100 compiled a store variant on its first step of >= 1,377 tokens (vLLM's JIT monitor:
    "Triton kernel JIT compilation during inference: _tq_store_kernel"), a stall in the
    first long prompt's time to first token (benchmarks/results/h100-20261208/)."""
    steps = []
    chunks = [CHUNK] if own_min is None or own_min <= CHUNK else [CHUNK, own_min]
    for c in chunks:
        if 2 * c + 1 > capacity:      # no request this long: never served either
            continue
        tag = "" if c == CHUNK else f"-own{c}"
        short = min(2 * c, max(1, split_ctx - c - 1), capacity - c)
        if not steps:
            steps.append(("decode-only", [(short, 1)] * 2))
        for nd in (1, 4):
            steps.append((f"mixed-{nd}{tag}", [(short, 1)] * nd + [(0, c)]))
        long_ctx = max(split_ctx, 1) + c
        if long_ctx <= capacity:
            for nd in (1, 4):
                steps.append((f"mixed-split-{nd}{tag}",
                              [(long_ctx, 1)] * nd + [(long_ctx - c, c)]))
        steps.append((f"prefill-only{tag}", [(0, c), (c, c)]))
    if large is not None:
        steps += _large_steps(split_ctx, capacity, own_min, large,
                              max_tokens if max_tokens is not None else large,
                              max_reqs if max_reqs is not None else large, window)
    return steps


def _large_steps(split_ctx: int, capacity: int, own_min: int | None, large: int,
                 max_tokens: int, max_reqs: int,
                 window: int = 0) -> list[tuple[str, list[tuple[int, int]]]]:
    """compositions' steps of at least `large` tokens: fresh chunks of length c, as few as
    reach `large`, for each chunk length that picks another store variant (at or above
    own_min: the store also writes FlashAttention's copy; below it: it does not); `large`
    decodes; and 2-token chunks, one a continuation, as many as make the deferred window
    store (window entries per chunk, backend/metadata.py) reach `large`; each only where a
    step of that size can happen."""
    steps = []
    own = own_min is not None and own_min > CHUNK
    lengths = [("-own" if own else "", min(capacity, max(large, own_min or 1)))]
    if own:
        lengths.append(("", min(capacity, own_min - 1)))
    for tag, c in lengths:
        n = -(-large // c)
        if c >= 1 and n * c <= max_tokens and n <= max_reqs:
            steps.append((f"prefill-only-large{tag}", [(0, c)] * n))
    if large <= min(max_tokens, max_reqs):
        short = min(CHUNK, max(1, split_ctx - 1), capacity - 1)
        steps.append(("decode-only-large", [(short, 1)] * large))
    if window > 0:
        n = -(-large // window)
        if 2 <= n <= max_reqs and 2 * n <= max_tokens and capacity >= 4:
            steps.append(("prefill-many-chunks", [(0, 2)] * (n - 1) + [(2, 2)]))
    return steps


def _batch(cm, spec: list[tuple[int, int]], device) -> object:
    """A CommonAttentionMetadata like cm (cm's extra fields kept: the builder ignores them)
    for the batch spec, every slot -1."""
    qsl = [0]
    for _, n in spec:
        qsl.append(qsl[-1] + n)
    seq_lens = [c + n for c, n in spec]
    t = qsl[-1]
    real_bt = cm.block_table_tensor
    bt = torch.zeros((len(spec), real_bt.shape[1]), dtype=real_bt.dtype, device=device)
    qsl_cpu = torch.tensor(qsl, dtype=torch.int32)
    extra = {}
    if "seq_lens_cpu_upper_bound" in {f.name for f in dataclasses.fields(cm)}:
        # the builder sizes the prefix rows for FlashAttention from it (metadata._prefix_rows)
        extra["seq_lens_cpu_upper_bound"] = torch.tensor(seq_lens, dtype=torch.int32)
    return dataclasses.replace(
        cm, **extra, query_start_loc=qsl_cpu.to(device), query_start_loc_cpu=qsl_cpu,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        num_reqs=len(spec), num_actual_tokens=t, max_query_len=max(n for _, n in spec),
        max_seq_len=max(seq_lens), block_table_tensor=bt,
        slot_mapping=torch.full((t,), -1, dtype=torch.int64, device=device))


def warm_up(builder, cm) -> list[str]:
    """Run every layer configuration of builder's layers through the step compositions
    (module doc). cm: the CommonAttentionMetadata of the build() that triggered it (for the
    block table's row stride and vLLM's extra fields). Returns the compositions run, as
    "layer: composition" strings (tests)."""
    from vllm_turboquant.backend.impl import TurboQuantImpl

    layers = builder.vllm_config.compilation_config.static_forward_context
    seen, ran = set(), []
    for name in builder.layer_names:
        layer = layers.get(name)
        impl = getattr(layer, "impl", None)
        kv_cache = _layer_cache(layer)
        if not isinstance(impl, TurboQuantImpl) or kv_cache is None:
            continue
        key = _config_key(impl, kv_cache)
        if key in seen:
            continue
        seen.add(key)
        device = kv_cache.device
        capacity = cm.block_table_tensor.shape[1] * builder.kv_cache_spec.block_size
        hq, hkv, d = impl.num_heads, impl.num_kv_heads, impl.head_size
        own_min = builder.own_min_query if builder.own_fa else None
        large = large_store_tokens(hkv, d, device)
        for what, spec in compositions(impl.split_decode_ctx, capacity, own_min, large,
                                       builder.max_tokens, impl.rows, builder.window):
            step_cm = _batch(cm, spec, device)
            md = builder._build_step(0, step_cm)
            t = step_cm.num_actual_tokens
            qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=impl.model_dtype, device=device)
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
            out = torch.empty(t, hq * d, dtype=impl.model_dtype, device=device)
            impl.forward(layer, q, k, v, kv_cache, md, output=out)
            ran.append(f"{name}: {what}")
        impl.layer_state(name, device).reset_window()
    return ran


def maybe_warm_up(builder, cm) -> bool:
    """warm_up where it is due: on CUDA (the CPU build runs the torch references: nothing to
    compile), once the KV cache is bound, outside a CUDA-graph capture. Returns True once
    nothing is left to do (the builder stops asking)."""
    device = torch.device(builder.device)
    if device.type != "cuda":
        return True
    if torch.cuda.is_current_stream_capturing():
        return False
    layers = builder.vllm_config.compilation_config.static_forward_context
    if not any(_layer_cache(layers.get(n)) is not None for n in builder.layer_names):
        return False
    start = time.perf_counter()
    ran = warm_up(builder, cm)
    torch.cuda.synchronize(device)
    logger.info("vllm-turboquant: kernels warmed up for %d step kinds in %.1f s (Triton "
                "compiles before serving, not in the first requests)", len(ran),
                time.perf_counter() - start)
    return True
