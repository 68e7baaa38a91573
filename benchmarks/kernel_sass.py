"""Static cost of the decode and prefill kernels' inner loops: sm_90 SASS compiled on any CPU.

    python benchmarks/kernel_sass.py [--json benchmarks/results/kernel-sass-sm90.json]

`triton.compile` for target cuda:90 (no GPU or driver needed), then the bundled nvdisasm and
cuobjdump. For each config: instructions in the kernel's longest loop (one key tile per
iteration, per warp), its global loads by width (LDG.E.U8 one byte, LDG.E four, LDG.E.128
sixteen), registers per thread and shared memory per program. Shapes: the issue's decode shape
(head 128, GQA 4, bf16, block size 16) and the prefill's packed-prefix loop at head 128.

What this does not tell: time. On the H200 the word loads (`words`) halved the decode loop's
instructions (slot-order pages, before 2026-12-03) yet ran slower in 3 of 4 shapes without the
register prefetch, and with it they gained only ~12% (docs/kernels-notes.md), so these counts
explain a kernel, they do not rank configs. The machine's triton is what compiles
(3.9 on CI; the GPU machine has 3.6: `pip install --target DIR triton==3.6.0` and put DIR first
on PYTHONPATH to see its code). Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_turboquant.codec import TQConfig, TQLayerCodec
from vllm_turboquant.kernels._common import prmt_dequant_asm
from vllm_turboquant.kernels.decode import _tq_decode_split_kernel
from vllm_turboquant.kernels.prefill import _tq_prefill_kernel
from vllm_turboquant.kernels.store import _tq_store_kernel

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DECODE_PTRS = {"q_ptr": "*bf16", "cache_ptr": "*u8", "block_table_ptr": "*i32",
               "seq_lens_ptr": "*i32", "kcent_ptr": "*fp32", "vcent_ptr": "*fp32",
               "ktab_ptr": "*i32", "vtab_ptr": "*i32", "side_k_ptr": "*bf16",
               "side_v_ptr": "*bf16", "side_tag_ptr": "*i32", "side_check_ptr": "*i32",
               "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "rotq_ptr": "*bf16",
               "rot_ptr": "*fp32", "count_ptr": "*i32", "out_ptr": "*bf16",
               "q_alpha": "fp32", "rot_scale": "fp32"}
PREFILL_PTRS = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16",
                "cu_q_ptr": "*i32", "seq_lens_ptr": "*i32", "cache_ptr": "*u8",
                "block_table_ptr": "*i32", "kcent_ptr": "*fp32", "vcent_ptr": "*fp32",
                "ktab_ptr": "*i32", "vtab_ptr": "*i32", "rot_ptr": "*fp32",
                "side_k_ptr": "*bf16", "side_v_ptr": "*bf16", "side_tag_ptr": "*i32",
                "side_check_ptr": "*i32", "deq_k_ptr": "*bf16", "deq_v_ptr": "*bf16",
                "deq_s_ptr": "*i32", "own_o_ptr": "*bf16", "own_lse_ptr": "*fp32",
                "rot_scale": "fp32"}


def compile_sm90(fn, pointers: dict, consts: dict, num_warps: int, num_stages: int,
                 ints16: tuple = ()):
    sig = {n: "i32" for n in fn.arg_names}
    sig.update(pointers)
    sig.update({k: "constexpr" for k in consts})
    # Pointers 16-byte aligned, as Triton specializes them at launch for torch's allocations
    # (without the hint, loads the launch would vectorize compile to 4-byte ones).
    # ints16: integer arguments that are multiples of 16 in the modelled launch (Triton
    # specializes those the same way).
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in pointers.items()
             if t.startswith("*")}
    attrs.update({(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ints16})
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _tool(name: str, cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(BIN, name), *flags, f.name], capture_output=True,
                              text=True, check=True).stdout


def opcodes(lines) -> collections.Counter:
    """nvdisasm lines -> count of each full opcode (LDG.E.128, ...), predicates ignored."""
    ops = collections.Counter()
    for ln in lines:
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", ln)
        if m:
            ops[m.group(1)] += 1
    return ops


def loop_stats(ck) -> dict:
    """Instructions of the longest backward-branch loop of the SASS, and resource usage."""
    lines = _tool("nvdisasm", ck.asm["cubin"], "-c").splitlines()
    labels = {ln.strip()[:-1]: i for i, ln in enumerate(lines) if ln.startswith(".L")}
    best = (0, 0)
    for i, ln in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", ln)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    ops = opcodes(lines[best[0] + 1:best[1] + 1])
    usage = next(x for x in _tool("cuobjdump", ck.asm["cubin"], "--dump-resource-usage")
                 .splitlines() if "REG:" in x)
    fields = dict(tok.split(":") for tok in usage.split() if ":" in tok)
    by_family = collections.Counter()
    for op, n in ops.items():
        by_family[op.split(".")[0]] += n
    return {"loop_instructions": sum(ops.values()), "byte_loads": ops.get("LDG.E.U8", 0),
            "word_loads": ops.get("LDG.E", 0), "vector16_loads": ops.get("LDG.E.128", 0),
            "top_ops": dict(by_family.most_common(8)), "registers": int(fields["REG"]),
            "stack_bytes": int(fields["STACK"]), "shared_bytes": ck.metadata.shared}


def decode_row(words: bool, block_n: int, num_warps: int, num_stages: int,
               prefetch: bool = False, d: int = 128, block_size: int = 16,
               fused: bool = True) -> dict:
    codec = TQLayerCodec(TQConfig.from_name("tq-k4v4"), d, layer=5)
    asm = prmt_dequant_asm(codec.key_centroids, torch.bfloat16)
    lay = codec.layout
    consts = dict(D=d, KBITS=4, VBITS=4, SLOT=lay.slot_bytes, V_OFF=lay.v_codes_offset,
                  KS_OFF=lay.k_scale_offset, BLOCK_SIZE=block_size, BLOCK_N=block_n,
                  BLOCK_G=16, HAS_SIDE=False, F32=False, KMODE=3, VMODE=3, KASM=asm, VASM=asm,
                  KT=False, PREFETCH=prefetch, WORDS=words, ALIGN_B=16, ROTATE_Q=2 if fused else 0,
                  FUSED=fused, BLOCK_S=64, COLS=min(d, 64))
    ck = compile_sm90(_tq_decode_split_kernel, DECODE_PTRS, consts, num_warps, num_stages)
    st = loop_stats(ck)
    # The whole program's work per 64 tokens: every warp runs the loop once per tile.
    per64 = st["loop_instructions"] * num_warps * 64 // block_n
    return {"kernel": "decode split", "fused": fused, "head_size": d,
            "words": words, "prefetch": prefetch,
            "block_n": block_n, "num_warps": num_warps, "num_stages": num_stages,
            "instructions_per_64_tokens_all_warps": per64, **st}


def prefill_row(d: int = 128, g_pad: int = 4, block_size: int = 16) -> dict:
    codec = TQLayerCodec(TQConfig.from_name("tq-k4v4"), d, layer=5)
    asm = prmt_dequant_asm(codec.key_centroids, torch.bfloat16)
    lay = codec.layout
    consts = dict(D=d, KBITS=4, VBITS=4, SLOT=lay.slot_bytes, V_OFF=lay.v_codes_offset,
                  KS_OFF=lay.k_scale_offset, ALIGN_B=16,
                  BLOCK_SIZE=block_size, BLOCK_M=128 // g_pad, G_PAD=g_pad, ROW_G=g_pad,
                  BLOCK_N=32,
                  HAS_SIDE=False, F32=False, COLS=min(d, 64), WIN=0, KMODE=3, VMODE=3,
                  KASM=asm, VASM=asm, DEQ=False, DEQ_STAGES=1, INVARIANT=False, ALIGN=0,
                  OWN=False)
    ck = compile_sm90(_tq_prefill_kernel, PREFILL_PTRS, consts, 4, 1)
    return {"kernel": "prefill (packed prefix, no window)", "head_size": d, "g_pad": g_pad,
            "block_n": 32, "num_warps": 4, "num_stages": 1, **loop_stats(ck)}


STORE_PTRS = {"key_ptr": "*bf16", "value_ptr": "*bf16", "cache_ptr": "*u8", "slot_ptr": "*i64",
              "rot_scale": "fp32"}


def store_row(block_t: int = 8, num_warps: int = 4, d: int = 64, stack: bool = True,
              sym: bool = True, preload: bool = True, side: bool = True, rot: int = 2) -> dict:
    """The store kernel has no tile loop: the whole program's instructions, its barriers
    (BAR.SYNC: each cross-warp row reduction is one or two) and its global loads, in a
    decode step's config (store_config: 8 tokens / 4 warps, keys and values stacked) at
    SmolLM2's head size, with the default preset's window side copy (side)."""
    from vllm_turboquant.kernels import TQLayerParams
    codec = TQLayerCodec(TQConfig.from_name("turboquant"), d, layer=5)
    kb, kc, vb, vc = TQLayerParams.from_codec(codec).codebooks
    lay = codec.layout
    ptrs = {n: "*fp32" for n in _tq_store_kernel.arg_names if n.endswith("_ptr")}
    ptrs.update(STORE_PTRS)
    if side:
        ptrs.update(side_k_ptr="*bf16", side_v_ptr="*bf16", side_tag_ptr="*i32",
                    side_check_ptr="*i32", rows_ptr="*i32", pos_ptr="*i32", send_ptr="*i32")
    if rot == 2:
        ptrs["rot_ptr"] = "*bf16"
    consts = dict(D=d, KBITS=4, VBITS=4, LSQ=True, K_BOUNDS=kb, K_CENTS=kc, V_BOUNDS=vb,
                  V_CENTS=vc, SYM=sym, SLOT=lay.slot_bytes,
                  V_OFF=lay.v_codes_offset, KS_OFF=lay.k_scale_offset, BS=128, ALIGN_B=16,
                  BLOCK_T=block_t, HAS_SIDE=side, ROT=rot, HALVES=True, STACK=stack,
                  PRELOAD=preload and stack, OUT_ALIGN=16, IDX=False, ROT_OUT=False,
                  DEQ_OUT=False, OWN_OUT=False)
    # SmolLM2's K/V are views of the qkv projection: token stride 960, head stride 64
    ck = compile_sm90(_tq_store_kernel, ptrs, consts, num_warps, 3,
                      ints16=("stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_cb"))
    full = opcodes(_tool("nvdisasm", ck.asm["cubin"], "-c").splitlines())
    ops = collections.Counter()
    for op, n in full.items():
        ops[op.split(".")[0]] += n
    return {"kernel": "store", "head_size": d, "block_t": block_t, "num_warps": num_warps,
            "stack": stack, "symmetric": sym, "preload": preload and stack, "side": side,
            "rot": rot, "instructions": sum(ops.values()), "barriers": ops.get("BAR", 0),
            "global_loads": ops.get("LDG", 0), "top_ops": dict(ops.most_common(8)),
            "global_by_width": {op: n for op, n in sorted(full.items())
                                if op.startswith(("LDG", "STG"))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    # (words, prefetch, block_n, warps, stages): the default (decode.decode_defaults) first,
    # the byte tile (the default before) second, then what the H200 sweep and kernels.py's
    # DECODE_AB time.
    rows = [decode_row(w, bn, nw, ns, prefetch=pf) for w, pf, bn, nw, ns in
            [(True, True, 128, 4, 1),
             (False, False, 64, 4, 2), (True, False, 64, 4, 2), (True, False, 64, 4, 1),
             (True, False, 128, 4, 1), (False, False, 128, 4, 2), (True, True, 64, 4, 1),
             (True, True, 32, 2, 1), (True, True, 16, 1, 1), (False, False, 16, 1, 1)]]
    # the default config as three launches (fused=False: rotation GEMM, split, merge)
    rows.insert(1, decode_row(True, 128, 4, 1, prefetch=True, fused=False))
    rows.append(prefill_row())
    # decode-step config, its parts off one at a time, 1 and 2 warps; 32 / 8, the large-store
    # config before 2026-12-04; 32 / 4 at head 128 without a window: store_config's large
    # config on issue 3's store shape (8K tokens x 8 KV heads x 128, benchmarks/kernels.py)
    stores = [store_row(8, 4), store_row(8, 4, stack=False), store_row(8, 4, sym=False),
              store_row(8, 4, preload=False), store_row(8, 4, rot=0), store_row(8, 1),
              store_row(8, 2), store_row(32, 8), store_row(32, 4, d=128, side=False)]
    print("| kernel | words | prefetch | block_n | warps | stages | loop instrs | per 64 tokens "
          "| loads 1 / 4 / 16 B | regs | shared B |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = r["kernel"] + (" (fused)" if r.get("fused") else "")
        print(f"| {name} | {r.get('words', '-')} | {r.get('prefetch', '-')} | "
              f"{r['block_n']} | {r['num_warps']} | {r['num_stages']} | "
              f"{r['loop_instructions']} | {r.get('instructions_per_64_tokens_all_warps', '-')} "
              f"| {r['byte_loads']} / {r['word_loads']} / {r['vector16_loads']} | "
              f"{r['registers']} | {r['shared_bytes']} |")
    for r in stores:
        print(f"store, head {r['head_size']}, {r['block_t']} tokens / {r['num_warps']} warps, "
              f"stack {r['stack']} sym {r['symmetric']} preload {r['preload']} rot {r['rot']}: "
              f"{r['instructions']} instructions, {r['barriers']} barriers, "
              f"{r['global_loads']} global loads")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "cuda:90 (sm_90)",
                       "host": platform.node(), "shape": "head 128, GQA 4, bf16, block size 16",
                       "rows": rows, "store": stores}, f, indent=1)


if __name__ == "__main__":
    main()
