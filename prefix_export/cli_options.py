"""The flags that export and compile share (the parser's argument groups, and what they become).

cli.py builds the parser with these; they live apart so that the command line stays readable.
"""
from __future__ import annotations

import argparse


def tolerances(values: list[str] | None, default: float | None):
    """`--atol 1e-4` and/or `--atol logits=1e-3 --atol 'present.*=2e-4'`."""
    from .validate.report import Tolerances

    if not values and default is None:
        return None
    tolerances = Tolerances() if default is None else Tolerances(atol=default)
    for value in values or []:
        name, sep, number = value.rpartition("=")
        try:
            parsed = float(number)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--atol {value!r}: expected a number or NAME=NUMBER") from None
        if sep:
            tolerances.per_output[name] = parsed
        else:
            tolerances.atol = parsed
    return tolerances


def add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id (from the cache or online) or a local model folder")
    parser.add_argument("--prefix", required=True,
                        help="PEFT adapter folder: prefix tuning, prompt tuning, p-tuning or multitask prompt tuning "
                             "(virtual tokens become the same static prefix); or a raw PrefixEncoder / p-tuning "
                             "PromptEncoder state dict (.safetensors/.pt/.bin) with --prefix-config")
    parser.add_argument("--prefix-config", help="the PEFT config JSON for a raw state dict "
                                                "(default: prefix_config.json or adapter_config.json beside it)")
    add_task_id(parser)
    parser.add_argument("--out", required=True, help="output folder, or OUT_DIR/NAME.onnx")
    parser.add_argument("--force", action="store_true", help="replace an existing output (atomically)")
    parser.add_argument("--no-validate", action="store_true", help="skip validation against PEFT (not advised)")
    parser.add_argument("--atol", action="append", metavar="[OUTPUT=]ATOL",
                        help="a fixed absolute tolerance against PEFT in the model's dtype, for all outputs or per "
                             "output (--atol logits=1e-3 --atol 'present.*=1e-4'; repeatable). Default: the "
                             "noise-relative rule, error vs a float64 run <= 4 x PyTorch's own + 1e-6")
    parser.add_argument("--greedy-tokens", type=int, metavar="N",
                        help="tokens of the greedy check (default by model size: 32 up to 1.5B parameters, 16 up "
                             "to 4B, 8 above; at least 1)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="export in this dtype (default: as saved; a bfloat16 checkpoint in float16, or float32 "
                             "where its measured activations need float16's range; bfloat16 only with "
                             "--no-validate, for GPU targets)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--external-data", action="store_true",
                        help="always write weights as external data (automatic above 2 GB)")
    parser.add_argument("--triton", nargs="?", const=True, default=False, metavar="NAME",
                        help="also write a Triton Inference Server model repository entry OUT/triton/NAME "
                             "(config.pbtxt for the onnxruntime backend; NAME defaults to the folder's name)")
    parser.add_argument("--keep-invalid", action="store_true",
                        help="when validation fails, keep the export as OUT.invalid/ for inspection")
    parser.add_argument("--layout", choices=["folded", "cache"], default="folded",
                        help="folded (default): the prefix is inside the graph; cache: the plain base decoder, "
                             "the prefix (prefix_kv.safetensors) is fed as the first past (TensorRT, mobile, "
                             "one graph for many prefixes)")
    parser.add_argument("--swappable-prefix", action="store_true",
                        help="folded layout: keep the prefix replaceable at run time, so that `prefix-export "
                             "adapter` files (ONNX Runtime adapters) switch the task on one loaded graph")


def add_task_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task-id", type=int, metavar="N",
                        help="multitask prompt tuning: the task whose prompt is exported (PEFT's task_ids, "
                             "0..num_tasks-1); one export holds one task")


def add_compile_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compile (the shipped graph: fused and/or at a reduced precision)")
    group.add_argument("--optimize", action="store_true",
                       help="fuse for ONNX Runtime: attention, (skip) layer/RMS norms, rotary, gelu; the counts "
                            "the registry expects must all match, and the fused graph is validated like the plain one")
    group.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4"], default="fp32",
                       help="fp32 (default); fp16 (GPU targets); int8 (weight-only 8-bit MatMulNBits); int4 "
                            "(4-bit MatMulNBits). Reduced precisions are validated by agreement with PEFT and the "
                            "fp32 graph (exit 1 below the thresholds)")
    group.add_argument("--int8-method", choices=["nbits", "dynamic"], default="nbits",
                       help="int8: weight-only block-wise MatMulNBits (default) or dynamic per-channel MatMulInteger")
    group.add_argument("--block-size", type=int, default=32, help="int8/int4 block size (default 32)")
    group.add_argument("--accuracy-level", type=int, default=4,
                       help="MatMulNBits compute: 4 = int8 (fast, may flip near-tie argmaxes), 0 = float32 "
                            "(default 4)")
    group.add_argument("--int4-algorithm", choices=["rtn", "hqq"], default="rtn",
                       help="int4: round to nearest (default) or HQQ")
    group.add_argument("--keep-8bit", metavar="PATTERNS",
                       help="int4: module paths kept at 8 bits, comma-separated fnmatch patterns "
                            "(e.g. '*down_proj,*lm_head')")
    group.add_argument("--keep-fp32", metavar="PATTERNS",
                       help="int8/int4: module paths not quantized, comma-separated fnmatch patterns "
                            "(e.g. '*layers.0.*,*layers.1.*': the early layers of models with massive activations)")
    group.add_argument("--no-quantize-lm-head", action="store_true", help="int8/int4: keep the lm_head in fp32")
    group.add_argument("--min-top1", type=float, help="least top-1 agreement (default by precision)")
    group.add_argument("--min-greedy", type=float, help="least share of equal greedy continuations (default by "
                                                        "precision)")
    group.add_argument("--kv-buffer", choices=["concat", "shared"], default="concat",
                       help="shared (with --optimize): attention as GroupQueryAttention on one preallocated KV buffer "
                            "per layer, written in place; fixed shapes for CUDA graphs (generate --cuda-graph). "
                            "Default concat: the cache grows by concatenation")
    group.add_argument("--format", choices=["onnx", "ort"], default="onnx", dest="graph_format",
                       help="ort: also write model.ort and required_operators_and_types.config (ORT format, for "
                            "mobile and reduced-size ONNX Runtime builds), checked to give model.onnx's tokens")
    group.add_argument("--task-file", help="prompt/target JSON lines: greedy exact match must stay within 0.05 of "
                                           "the fp32 graph's")


def _patterns(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def compile_options(args):
    from .compile.agreement import DEFAULT_THRESHOLDS, Thresholds
    from .compile.pipeline import CompileOptions
    from .compile.quantize import QuantizationSettings

    quantization = QuantizationSettings(
        precision=args.precision, method=args.int8_method, block_size=args.block_size,
        accuracy_level=args.accuracy_level, algorithm=args.int4_algorithm,
        quantize_lm_head=not args.no_quantize_lm_head,
        keep_8bit=_patterns(args.keep_8bit), keep_fp32=_patterns(args.keep_fp32))
    thresholds = None
    if args.min_top1 is not None or args.min_greedy is not None:
        default = DEFAULT_THRESHOLDS.get(args.precision, Thresholds(1.0, 1.0))
        # --min-top1 sets the raw limit; the decided-positions limit never exceeds it (0 turns both off)
        thresholds = Thresholds(top1=default.top1 if args.min_top1 is None else args.min_top1,
                                greedy=default.greedy if args.min_greedy is None else args.min_greedy,
                                top1_decided=default.top1_decided if args.min_top1 is None else
                                min(default.top1_decided, max(args.min_top1, 0.0)))
    return CompileOptions(optimize=args.optimize, quantization=quantization, thresholds=thresholds,
                          task_file=args.task_file, kv_buffer=args.kv_buffer)
