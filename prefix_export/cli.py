"""The command line: a thin layer over the library; every subcommand calls one library function.

    prefix-export --model gpt2 --prefix ckpt/ --out out/model.onnx     (export is the default)
    prefix-export validate OUT_DIR
    prefix-export generate OUT_DIR --prompt "..."
    prefix-export inspect MODEL --prefix CKPT
    prefix-export adapter OUT_DIR --prefix TASK_CKPT --out task.onnx_adapter
    prefix-export compile OUT_DIR --out OUT2 [--optimize] [--precision int4]
    prefix-export bench --model M --prefix P [--optimize] [--precision int8]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from .cli_options import add_compile_args, add_export_args, add_task_id, compile_options, tolerances
from .errors import PrefixExportError

SUBCOMMANDS = ("export", "validate", "generate", "inspect", "bench", "adapter", "compile")
log = logging.getLogger("prefix_export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefix-export",
        description="Export a Hugging Face causal LM + PEFT prefix-tuning (or prompt-tuning, p-tuning) checkpoint "
                    "to a validated ONNX decoder. "
                    "Without a subcommand, `prefix-export --model M --prefix P --out O` exports.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 ok, 1 validation failed, 2 bad input or unsupported")
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS defaults: the flags work before or after the subcommand without overwriting each other.
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging (-vv for debug)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bar, only errors and the result")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the machine-readable result as JSON")
    for action in common._actions:
        parser._add_action(action)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    _add_parser = sub.add_parser

    def add_parser(name, **kwargs):
        return _add_parser(name, parents=[common], **kwargs)

    sub.add_parser = add_parser

    export = sub.add_parser("export", help="export and validate (the default action)")
    add_export_args(export)
    add_compile_args(export)

    compile_ = sub.add_parser("compile", help="compile an export folder into a new one: fused and/or at a reduced "
                                              "precision, validated")
    compile_.add_argument("out_dir", help="the export folder to compile (fp32)")
    compile_.add_argument("--out", required=True, help="the new folder")
    compile_.add_argument("--force", action="store_true", help="replace an existing --out (atomically)")
    compile_.add_argument("--keep-invalid", action="store_true", help="keep a graph that failed as OUT.invalid/")
    compile_.add_argument("--model", help="override the model recorded in export_report.json")
    compile_.add_argument("--prefix", help="override the prefix recorded in export_report.json")
    compile_.add_argument("--prefix-config")
    add_compile_args(compile_)

    validate = sub.add_parser("validate", help="recheck an export folder (or an adapter file): hashes, then the "
                                               "graph against PEFT")
    validate.add_argument("out_dir", help="an export folder, or a .onnx_adapter file made by `prefix-export adapter`")
    validate.add_argument("--model", help="override the model recorded in export_report.json")
    validate.add_argument("--prefix", help="override the prefix recorded in export_report.json")
    validate.add_argument("--prefix-config")
    validate.add_argument("--atol", action="append", metavar="[OUTPUT=]ATOL")

    generate = sub.add_parser("generate", help="generate text (or token ids) with an export folder")
    generate.add_argument("out_dir")
    generate.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    generate.add_argument("--token-ids", action="append", help="comma-separated token ids instead of text; repeatable")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--provider", default="cpu", help="cpu, cuda, tensorrt or a full ORT provider name")
    generate.add_argument("--fallback", choices=["cpu"], help="run on the CPU (with a warning) if --provider cannot")
    generate.add_argument("--cuda-graph", action="store_true",
                          help="CUDA: replay decode steps as one captured CUDA graph (needs a graph compiled with "
                               "--kv-buffer shared; otherwise, or if capture fails, a log line says so and steps run "
                               "uncaptured)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (0 = off)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    generate.add_argument("--seed", type=int, help="random seed for sampling")
    generate.add_argument("--stop", action="append", metavar="TOKEN",
                          help="extra stop token: an id, or text that is one token; repeatable (eos always stops)")
    generate.add_argument("--prefix-kv", action="append", metavar="FILE",
                          help="cache layout: a prefix_kv.safetensors (or export folder) to use instead of the "
                               "folder's own; give one per --prompt for a different prefix per row")
    generate.add_argument("--adapter", metavar="FILE.onnx_adapter",
                          help="a swappable folded export: run another task's prefix (made by `prefix-export adapter`)")
    generate.add_argument("--max-batch", type=int, help="TensorRT profile: largest batch (default 8)")
    generate.add_argument("--max-length", type=int,
                          help="TensorRT profile: longest P + prompt + new tokens (default: the model's limit)")
    generate.add_argument("--fp16", action="store_true", help="TensorRT: build fp16 engines")

    adapter = sub.add_parser("adapter", help="another task's prefix as an ONNX Runtime adapter file for a "
                                             "--swappable-prefix export, validated against PEFT")
    adapter.add_argument("out_dir", help="the export folder (made with --swappable-prefix)")
    adapter.add_argument("--prefix", required=True, help="the task's PEFT adapter folder or state dict (as for export)")
    adapter.add_argument("--prefix-config", help="the PEFT config JSON for a raw state dict")
    add_task_id(adapter)
    adapter.add_argument("--out", required=True, help="the adapter file to write, NAME.onnx_adapter (its report "
                                                      "goes beside it as NAME.onnx_adapter.json)")
    adapter.add_argument("--model", help="the base model (default: the one recorded in the export's report; it "
                                         "must be the same files)")
    adapter.add_argument("--force", action="store_true", help="replace an existing adapter file")
    adapter.add_argument("--no-validate", action="store_true", help="skip validation against PEFT (not advised)")
    adapter.add_argument("--atol", action="append", metavar="[OUTPUT=]ATOL", help="as for export")
    adapter.add_argument("--greedy-tokens", type=int, metavar="N", help="as for export")

    inspect = sub.add_parser("inspect", help="show what would be exported, without exporting")
    inspect.add_argument("model")
    inspect.add_argument("--prefix", required=True)
    inspect.add_argument("--prefix-config")
    add_task_id(inspect)
    bench = sub.add_parser("bench", help="measure PEFT eager vs the export vs the base-model export "
                                         "(latency, memory, bandwidth floor); writes bench.json + bench.png")
    bench.add_argument("export_dir", nargs="?", help="an export folder (else --model and --prefix)")
    bench.add_argument("--model", help="base model (hub id or folder); the export is made and timed")
    bench.add_argument("--prefix", help="PEFT prefix-tuning adapter folder")
    bench.add_argument("--out", default="bench-out", help="folder for bench.json, bench.png and graphs/")
    bench.add_argument("--batch-sizes", default="1,4", help="comma-separated (default 1,4)")
    bench.add_argument("--contexts", default="32,128,512", help="prompt lengths, comma-separated (default 32,128,512)")
    bench.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per run (default 64)")
    bench.add_argument("--rounds", type=int, default=2,
                       help="measure every backend in turn this many times (default 2); medians over all rounds")
    bench.add_argument("--provider", action="append", help="cpu (default), cuda, ...; repeatable")
    bench.add_argument("--precision", action="append", choices=["fp32", "fp16", "int8", "int4"],
                       help="fp32 (always measured) and/or what `compile --precision` ships: int8, int4 (CPU and "
                            "GPU), fp16 (GPU providers only); each validated by agreement; repeatable")
    bench.add_argument("--optimize", action="store_true",
                       help="also measure the fused graph `compile --optimize` ships (reduced precisions then "
                            "fused too); the headline uses it if it is faster")
    bench.add_argument("--no-eager", action="store_true", help="skip the PEFT eager baseline")
    bench.add_argument("--peers", action="store_true",
                       help="also run onnxruntime-genai (folded) and OpenVINO's Python API (both layouts) on every "
                            "export graph, as the runtimes a user would pick instead; their tokens are checked "
                            "against ours")
    bench.add_argument("--torch-compile", action="store_true",
                       help="also run PEFT with its decode steps through torch.compile (mode reduce-overhead, CUDA "
                            "graphs, on CUDA; inductor's default mode on the CPU) on a static cache, wherever eager "
                            "runs; each batch size and context is compiled before the timing (minutes on big models)")
    bench.add_argument("--kv-buffer", choices=["concat", "shared"], default="concat",
                       help="shared: also compile and run the shared-KV-buffer graphs (GroupQueryAttention on one "
                            "preallocated buffer; fp32, and fp16 with a GPU provider) of the export and the base")
    bench.add_argument("--cuda-graph", action="store_true",
                       help="with --kv-buffer shared and --provider cuda: also run the shared-buffer graphs with "
                            "their decode steps replayed as CUDA graphs (rows '...+cuda-graph')")
    bench.add_argument("--no-base", action="store_true",
                       help="skip the base-model export (no prefix cost, and no cache layout)")
    bench.add_argument("--no-cache-layout", action="store_true",
                       help="do not also run the cache layout (the base graph with the prefix as its first past)")
    bench.add_argument("--threads", type=int, help="intra-op threads for ORT and torch (default: all cores)")
    bench.add_argument("--agreement-model", help="embedded-style model folder (base/, prefix/, test_split.jsonl) "
                                                 "for the int8 agreement check (default models/default if present)")
    bench.add_argument("--bandwidth-mb", type=int, default=1024, help="buffer for the bandwidth measurement")
    bench.add_argument("--targets", metavar="JSON",
                       help="targets to check the headline config against, e.g. tools/bench_targets.json "
                            "({name: limit}); default: none")
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # The exporter's own chatter (every folded constant) is noise at any level we show.
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)
    # ONNX Runtime's transformer optimizer (bench --optimize) warns "shape inference failed" for every
    # dynamo graph it reads; its fusions work regardless, so these are shown only with -v.
    for noisy in ("onnx_model", "fusion_base", "onnxruntime.transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR if verbose < 1 else logging.INFO)
    # "torchvision is not installed. Skipping torchvision::nms" and friends: irrelevant here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    if verbose < 2:
        warnings.filterwarnings("ignore")
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except ImportError:
            pass


def _print_export_summary(result) -> None:
    report = result.report
    arch, prefix = report["architecture"], report["prefix"]
    graph = report["graph"]
    rows = [("model", f"{report['inputs']['model']} ({arch['model_type']})"),
            ("shape", f"{arch['num_layers']} layers, {arch['num_attention_heads']} heads, "
                      f"{arch['num_kv_heads']} KV heads, head dim {arch['head_dim']}"),
            ("prefix", f"P={prefix['num_virtual_tokens']} {tuple(prefix['shape'])} {prefix['dtype']} "
                       f"({prefix.get('method', 'prefix_tuning').replace('_', ' ')}, "
                       f"{report['inputs']['checkpoint_kind']})"),
            ("graph", f"{graph['graph']}, {graph['nodes']} nodes, {graph['weight_bytes'] / 1e6:.1f} MB weights"
                      + (f", external data {graph['external_data']}" if graph["external_data"] else "")),
            ("dtype", f"{report['dtype']['exported']}"
                      + (f" from a {report['dtype']['checkpoint']} checkpoint: {report['dtype']['why']}"
                         if report["dtype"].get("checkpoint") else "")),
            ("time", f"export {report['timing_s']['export']:.1f}s, "
                     + (f"validation {report['timing_s']['validation']:.1f}s, " if "validation" in report["timing_s"]
                        else "") + f"total {report['timing_s']['total']:.1f}s, peak memory "
                     f"{report['peak_memory_mb']:.0f} MB"),
            ("folder", str(result.folder))]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    ort = report.get("ort_format")
    if ort:
        print(f"{'ort format':<{width}}  {ort['graph']} {ort['ort_bytes'] / 1e6:.1f} MB (model.onnx "
              f"{ort['onnx_bytes'] / 1e6:.1f} MB), {ort['config']}: {ort['config_operators']} operators; same "
              f"tokens as model.onnx")
    compiled = report.get("compile")
    if compiled:
        fusion = compiled.get("fusion")
        if fusion:
            counts = ", ".join(f"{k} {v['matched']}/{v['expected']}" for k, v in fusion["expected"].items())
            print(f"{'fused':<{width}}  {counts}; nodes {fusion['nodes_before']} -> {fusion['nodes_after']}")
            for kind, why in fusion.get("not_fusable", {}).items():
                print(f"{'':<{width}}  {kind} not fused: {why}")
        shared = compiled.get("shared_kv_buffer")
        if shared:
            where = ("the graph writes its prefix on the first step" if shared["prefix_in_graph"]
                     else "the runtime pre-fills the prefix")
            print(f"{'kv buffer':<{width}}  shared: {shared['layers']} GroupQueryAttention layers on one buffer per "
                  f"cache tensor ({shared['layout']} layout: {where}); generate --cuda-graph on CUDA")
        quantization = compiled["quantization"]
        if quantization["precision"] != "fp32":
            settings = ", ".join(f"{k}={v}" for k, v in quantization.items() if k != "precision")
            print(f"{'precision':<{width}}  {quantization['precision']}" + (f" ({settings})" if settings else ""))
    _print_validation(result.validation, "graph")


def _print_validation(validation, what: str) -> None:
    if validation is not None:
        print()
        print(validation.table())
    else:
        print(f"validation SKIPPED (--no-validate): the {what} was not compared with PEFT")


def cmd_export(args) -> int:
    from .api import export_prefix_model

    result = export_prefix_model(
        args.model, args.prefix, args.out, prefix_config=args.prefix_config, force=args.force,
        run_validation=not args.no_validate, tolerances=tolerances(args.atol, None), dtype=args.dtype,
        opset=args.opset, external_data=args.external_data, keep_invalid=args.keep_invalid, layout=args.layout,
        progress=not args.quiet and not args.json, command_line=["prefix-export", *args.argv], triton=args.triton,
        greedy_tokens=args.greedy_tokens, swappable_prefix=args.swappable_prefix,
        compile_options=compile_options(args), ort_format=args.graph_format == "ort", task_id=args.task_id)
    if args.json:
        print(json.dumps(result.report, indent=2))
    else:
        _print_export_summary(result)
    return 0


def cmd_compile(args) -> int:
    from .api import compile_export

    result = compile_export(args.out_dir, args.out, compile_options(args), model=args.model, prefix=args.prefix,
                            prefix_config=args.prefix_config, force=args.force, keep_invalid=args.keep_invalid,
                            progress=not args.quiet and not args.json, command_line=["prefix-export", *args.argv],
                            ort_format=args.graph_format == "ort")
    if args.json:
        print(json.dumps(result.report, indent=2))
    else:
        _print_export_summary(result)
    return 0


def cmd_validate(args) -> int:
    if args.out_dir.endswith(".onnx_adapter"):
        from .adapters import validate_adapter

        report = validate_adapter(args.out_dir, model=args.model, prefix=args.prefix, prefix_config=args.prefix_config,
                                  tolerances=tolerances(args.atol, None))
    else:
        from .api import validate_export

        report = validate_export(args.out_dir, args.model, args.prefix, args.prefix_config,
                                 tolerances(args.atol, None))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.passed else 1


def cmd_generate(args) -> int:
    from .runtime.generate import generate_from_folder

    streaming = not args.json and len(args.prompt or args.token_ids or []) == 1
    shown = {"tokens": []}

    def on_step(step):  # a batch of one: print each piece of text (or token id) as it comes
        shown["tokens"].append(int(step.tokens[0]))
        if shown.get("done"):
            return
        if step.finished[0]:
            shown["done"] = True
            return
        if args.prompt:
            text = shown["tokenizer"].decode(shown["tokens"], skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                print(text[len(shown.get("text", "")):], end="", flush=True)
                shown["text"] = text
        else:
            print(shown["tokens"][-1], end=" ", flush=True)

    if streaming and args.prompt:
        from .folder import ExportFolder

        shown["tokenizer"] = ExportFolder.open(args.out_dir).load_tokenizer()
        if shown["tokenizer"] is None:
            streaming = False
    result = generate_from_folder(
        args.out_dir, prompts=args.prompt, token_ids=args.token_ids, max_new_tokens=args.max_new_tokens,
        provider=args.provider, fallback=args.fallback, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop=args.stop, prefixes=args.prefix_kv, max_batch=args.max_batch,
        max_length=args.max_length, fp16=args.fp16, cuda_graph=args.cuda_graph,
        on_step=on_step if streaming else None, adapter=args.adapter)
    if args.json:
        print(json.dumps(result, indent=2))
    elif streaming:
        print()
    else:
        for row in result["rows"]:
            print(row["text"] if row.get("text") is not None else " ".join(map(str, row["new_token_ids"])))
    return 0


def cmd_adapter(args) -> int:
    from .adapters import make_adapter

    result = make_adapter(args.out_dir, args.prefix, args.out, model=args.model, prefix_config=args.prefix_config,
                          force=args.force, run_validation=not args.no_validate,
                          tolerances=tolerances(args.atol, None), greedy_tokens=args.greedy_tokens,
                          command_line=["prefix-export", *args.argv], task_id=args.task_id)
    if args.json:
        print(json.dumps(result.report, indent=2))
        return 0
    info = result.report["adapter"]
    print(f"adapter  {result.path} ({info['bytes'] / 1e6:.2f} MB, {info['parameters']} tensors, prefix "
          f"{tuple(info['prefix_shape'])} {info['dtype']}; the graph is {info['graph_bytes'] / 1e6:.1f} MB)")
    print(f"export   {result.report['export']['folder']}")
    _print_validation(result.validation, "adapter")
    return 0


def cmd_inspect(args) -> int:
    from .source.plan import inspect_export_plan

    info = inspect_export_plan(args.model, args.prefix, args.prefix_config, args.task_id)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            if isinstance(value, list):
                value = ", ".join(map(str, value))
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_bench(args) -> int:
    from .bench.report import format_table
    from .bench.run import BenchSettings, check_extras, load_targets, run_bench
    from .errors import InputError

    check_extras()  # before any work: a missing extra must not cost a run

    def ints(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise InputError(f"expected comma-separated integers, got {text!r}") from None

    agreement = args.agreement_model or ("models/default" if Path("models/default/test_split.jsonl").is_file()
                                         else None)
    settings = BenchSettings(batch_sizes=ints(args.batch_sizes), contexts=ints(args.contexts),
                             new_tokens=args.new_tokens, rounds=args.rounds, providers=tuple(args.provider or ["cpu"]),
                             precisions=tuple(dict.fromkeys(["fp32", *(args.precision or [])])),
                             optimize=args.optimize, eager=not args.no_eager, base=not args.no_base,
                             cache_layout=not args.no_cache_layout, peers=args.peers,
                             torch_compile=args.torch_compile, kv_buffer_shared=args.kv_buffer == "shared",
                             cuda_graph=args.cuda_graph, threads=args.threads, bandwidth_mb=args.bandwidth_mb,
                             agreement_model=Path(agreement) if agreement else None,
                             targets=load_targets(args.targets) if args.targets else None)
    result = run_bench(args.out, model=args.model, prefix=args.prefix, export_dir=args.export_dir,
                       settings=settings, progress=not args.quiet and not args.json)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    if not args.json:
        print(f"\nwrote {result['files']['json']} and {result['files']['plot']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    given = list(argv)  # as typed, for export_report.json (main(argv) is also called in-process)
    global_flags = {"-v", "-vv", "--verbose", "-q", "--quiet", "--json"}
    first = next((a for a in argv if a not in global_flags), None)
    if first is not None and first not in SUBCOMMANDS and first not in ("-h", "--help"):
        # `prefix-export --model ...` means `prefix-export export --model ...`
        position = argv.index(first)
        argv.insert(position, "export")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = given
    for flag, default in (("verbose", 0), ("quiet", False), ("json", False)):
        if not hasattr(args, flag):
            setattr(args, flag, default)
    if args.command is None:
        parser.print_help()
        return 2
    _configure_logging(args.verbose, args.quiet)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler = {"export": cmd_export, "validate": cmd_validate, "generate": cmd_generate,
               "inspect": cmd_inspect, "bench": cmd_bench, "adapter": cmd_adapter,
               "compile": cmd_compile}[args.command]
    try:
        return handler(args)
    except PrefixExportError as exc:
        kind = type(exc).__name__
        print(f"prefix-export: {kind}: {exc}", file=sys.stderr)
        report = getattr(exc, "report", None)
        if report is not None and not args.json:
            print(report.table(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("prefix-export: interrupted; nothing was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
