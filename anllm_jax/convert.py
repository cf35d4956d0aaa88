"""Convert checkpoints between HF Llama directories, GGUF files and the native orbax format.

    python -m anllm_jax.convert --input PATH --output DIR --to native|hf [--anchor-mode full|ep|ac] [--ac-init dot|mean]

PATH is an HF model directory (config.json + safetensors), a .gguf file, a native checkpoint directory, or
"smollm2" for the packaged SmolLM2-135M-Instruct GGUF. GGUF is read-only (dequantized on load).
"""

from __future__ import annotations

import argparse
import sys
import time

from anllm_jax import checkpoints, formats, records
from anllm_jax.config import ANCHOR_MODES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m anllm_jax.convert",
        description="Convert an HF Llama directory, a GGUF file or a native checkpoint to the native or HF format.",
    )
    p.add_argument(
        "--input",
        required=True,
        help='HF model directory, .gguf file, native checkpoint directory, or "smollm2" (the packaged SmolLM2-135M)',
    )
    p.add_argument(
        "--output",
        required=True,
        help="output directory: new, empty, or an earlier output of this command (replaced atomically once the new "
        "one is whole); a folder holding anything else needs --overwrite",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --output holding files this command did not write (never one holding --input or the "
        "current folder)",
    )
    p.add_argument("--to", required=True, choices=("native", "hf"), help="native: orbax + config.json; hf: safetensors")
    p.add_argument(
        "--anchor-mode",
        choices=ANCHOR_MODES,
        default=None,
        help="set the anchor mode: full (plain causal), ep (existing tokens such as '.'), ac (adds the <AC> token); "
        "default: keep the input's",
    )
    p.add_argument(
        "--ep-strings",
        nargs="+",
        default=["."],
        help="anchor strings for --anchor-mode ep, each one token of the vocabulary (default: .)",
    )
    p.add_argument(
        "--ac-init",
        choices=("dot", "mean"),
        default="dot",
        help='initial <AC> embedding rows for --anchor-mode ac: copy of the "." rows (dot) or the mean row (mean)',
    )
    p.add_argument(
        "--plain-llama",
        action="store_true",
        help="--to hf of an ep/ac model: leave out modeling_anllm.py (the AnSAN mask and anchor cache for "
        "transformers' trust_remote_code); transformers then runs it as a plain Llama",
    )
    p.add_argument(
        "--param-dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="parameter dtype written (default: the input's, float32 for HF and GGUF inputs)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        convert(args)
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as e:
        print(f"anllm_jax.convert: error: {e}", file=sys.stderr)
        sys.exit(2)


WRITER = "anllm_jax.convert"


def convert(args: argparse.Namespace) -> None:
    if args.plain_llama and args.to != "hf":
        raise ValueError("--plain-llama applies to --to hf only; drop it for --to native")
    source = checkpoints.smollm2_gguf_path() if args.input == "smollm2" else args.input
    records.check_output_dir(args.output, WRITER, args.overwrite, [source])  # before minutes of loading
    overrides = {"param_dtype": args.param_dtype} if args.param_dtype else {}
    start = time.perf_counter()
    model, tokenizer = checkpoints.load(args.input, **overrides)
    print(f"loaded {args.input} in {time.perf_counter() - start:.1f} s: {model.cfg.num_params():,} parameters")
    if args.anchor_mode is not None:
        if tokenizer is None:
            raise ValueError(f"--anchor-mode needs a tokenizer, and {args.input} has none (no tokenizer.json/.model)")
        model, tokenizer = checkpoints.set_anchor_mode(
            model, tokenizer, args.anchor_mode, tuple(args.ep_strings), args.ac_init
        )
        print(f"anchor mode {model.cfg.anchor_mode}, anchor ids {list(model.cfg.anchor_ids)}")
    if args.to == "native":
        checkpoints.save(model, tokenizer, args.output, args.overwrite, writer=WRITER, inputs=[source])
    else:
        formats.export_hf(
            model,
            tokenizer,
            args.output,
            args.overwrite,
            anchor_code=not args.plain_llama,
            writer=WRITER,
            inputs=[source],
        )
    print(f"wrote {args.to} checkpoint to {args.output}")


if __name__ == "__main__":
    main()
