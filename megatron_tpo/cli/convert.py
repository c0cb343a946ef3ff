"""``tpo-convert``: Llama checkpoints between Hugging Face and megatron layouts.

    tpo-convert hf-to-mcore --hf DIR --out DIR --tp N --pp M
    tpo-convert mcore-to-hf --mcore DIR --out DIR [--max-shard-size 5GB]
    tpo-convert hf-to-nemo --hf DIR --out DIR          (a NeMo 2 directory)
    tpo-convert nemo-to-hf --nemo DIR|FILE.nemo --out DIR [--max-shard-size 5GB]
    tpo-convert nemo-to-mcore --nemo DIR|FILE.nemo --out DIR --tp N --pp M
    tpo-convert mcore-to-nemo --mcore DIR --out DIR
    tpo-convert hf-to-dist --hf DIR --out DIR          (megatron dist checkpoint, any TP/PP;
                                                        tpo-run run.initial_checkpoint=DIR)
    tpo-convert gguf-to-hf --gguf FILE --out DIR        (dequantized; needs the gguf extra)
    tpo-convert gguf-to-mcore --gguf FILE --out DIR --tp N --pp M

Every tensor's presence and shape is checked from the files' headers before anything is
written; the output is written into a temporary sibling of --out and renamed into place
at the end, so a conversion that fails leaves nothing behind. A non-empty --out is
refused unless --overwrite is given.
"""

import argparse
import sys

from megatron_tpo.config import ConfigError

_UNITS = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2,
          "GIB": 1024**3, "B": 1}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, as HF's ``max_shard_size`` reads it."""
    upper = text.strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if upper.endswith(unit) and upper[: -len(unit)].strip():
            return int(float(upper[: -len(unit)]) * _UNITS[unit])
    return int(upper)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpo-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    to_mcore = commands.add_parser("hf-to-mcore", help="HF safetensors -> megatron shards")
    to_mcore.add_argument("--hf", required=True, help="HF model directory (config.json, safetensors)")
    to_mcore.add_argument("--out", required=True, help="output directory for the shards")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    to_mcore.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                          help="pad the vocab to a multiple of this times TP (megatron's default)")

    to_hf = commands.add_parser("mcore-to-hf", help="megatron shards -> HF safetensors")
    to_hf.add_argument("--mcore", required=True, help="directory written by hf-to-mcore")
    to_hf.add_argument("--out", required=True, help="output HF model directory")
    to_hf.add_argument("--max-shard-size", default="5GB", type=parse_size,
                       help="largest safetensors shard (e.g. 5GB, 500MB)")

    nemo_help = "NeMo 2 checkpoint directory (context/, weights/) or NeMo 1 .nemo file"
    to_nemo = commands.add_parser("hf-to-nemo", help="HF safetensors -> NeMo 2 directory")
    to_nemo.add_argument("--hf", required=True, help="HF model directory")
    to_nemo.add_argument("--out", required=True, help="output NeMo 2 directory")
    nemo_to_hf = commands.add_parser("nemo-to-hf", help="NeMo 2 or NeMo 1 -> HF safetensors")
    nemo_to_hf.add_argument("--nemo", required=True, help=nemo_help)
    nemo_to_hf.add_argument("--out", required=True, help="output HF model directory")
    nemo_to_hf.add_argument("--max-shard-size", default="5GB", type=parse_size,
                            help="largest safetensors shard (e.g. 5GB, 500MB)")
    nemo_to_mcore = commands.add_parser("nemo-to-mcore", help="NeMo 2 or NeMo 1 -> megatron shards")
    nemo_to_mcore.add_argument("--nemo", required=True, help=nemo_help)
    nemo_to_mcore.add_argument("--out", required=True, help="output directory for the shards")
    nemo_to_mcore.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    nemo_to_mcore.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    mcore_to_nemo = commands.add_parser("mcore-to-nemo", help="megatron shards -> NeMo 2 directory")
    mcore_to_nemo.add_argument("--mcore", required=True, help="directory written by hf-to-mcore")
    mcore_to_nemo.add_argument("--out", required=True, help="output NeMo 2 directory")
    to_dist = commands.add_parser(
        "hf-to-dist", help="HF safetensors -> megatron-core dist checkpoint (loads at any TP/PP)")
    to_dist.add_argument("--hf", required=True, help="HF model directory")
    to_dist.add_argument("--out", required=True, help="output checkpoint directory")

    gguf_help = "GGUF file of a Llama-architecture model (any quantization transformers reads)"
    dtype_help = "dtype the weights are dequantized to"
    gguf_to_hf = commands.add_parser("gguf-to-hf", help="GGUF -> HF safetensors, tokenizer, "
                                     "chat template")
    gguf_to_hf.add_argument("--gguf", required=True, help=gguf_help)
    gguf_to_hf.add_argument("--out", required=True, help="output HF model directory")
    gguf_to_hf.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                            help=dtype_help)
    gguf_to_hf.add_argument("--max-shard-size", default="5GB", type=parse_size,
                            help="largest safetensors shard (e.g. 5GB, 500MB)")
    gguf_to_mcore = commands.add_parser("gguf-to-mcore", help="GGUF -> megatron shards")
    gguf_to_mcore.add_argument("--gguf", required=True, help=gguf_help)
    gguf_to_mcore.add_argument("--out", required=True, help="output directory for the shards")
    gguf_to_mcore.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    gguf_to_mcore.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    gguf_to_mcore.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                               help=dtype_help)
    gguf_to_mcore.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                               help="pad the vocab to a multiple of this times TP")

    for command in (to_mcore, to_hf, to_nemo, nemo_to_hf, nemo_to_mcore, mcore_to_nemo, to_dist,
                    gguf_to_hf, gguf_to_mcore):
        command.add_argument("--quiet", action="store_true", help="no progress bar")
        command.add_argument("--overwrite", action="store_true",
                             help="replace a non-empty --out (once the new output is complete)")
    return parser


def run(args):
    """The conversion ``args.command`` names; returns its ``ConversionSummary``."""
    from megatron_tpo.model import conversion, nemo

    common = {"progress": not args.quiet, "overwrite": args.overwrite}
    if args.command == "hf-to-mcore":
        return conversion.hf_to_mcore(args.hf, args.out, args.tp, args.pp,
                                      make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                      **common)
    if args.command == "mcore-to-hf":
        return conversion.mcore_to_hf(args.mcore, args.out, max_shard_bytes=args.max_shard_size,
                                      **common)
    if args.command == "hf-to-nemo":
        return nemo.hf_to_nemo(args.hf, args.out, **common)
    if args.command == "nemo-to-hf":
        return nemo.nemo_to_hf(args.nemo, args.out, max_shard_bytes=args.max_shard_size, **common)
    if args.command == "nemo-to-mcore":
        return nemo.nemo_to_mcore(args.nemo, args.out, args.tp, args.pp, **common)
    if args.command == "mcore-to-nemo":
        return nemo.mcore_to_nemo(args.mcore, args.out, **common)
    if args.command.startswith("gguf-to-"):
        return _run_gguf(args, common)
    return nemo.hf_to_dist(args.hf, args.out, **common)


def _run_gguf(args, common: dict):
    from megatron_tpo.model import gguf

    if args.command == "gguf-to-hf":
        return gguf.gguf_to_hf(args.gguf, args.out, dtype=args.dtype,
                               max_shard_bytes=args.max_shard_size, **common)
    return gguf.gguf_to_mcore(args.gguf, args.out, args.tp, args.pp,
                              make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                              dtype=args.dtype, **common)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except ConfigError as error:
        print(f"tpo-convert: error: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
