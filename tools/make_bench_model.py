#!/usr/bin/env python
"""Write a randomly initialised gpt2-small (GPT2Config() defaults, 124M) and a random PEFT prefix.

The benchmark target of issue 5 is stated on this architecture; nothing is downloaded.

    python tools/make_bench_model.py --out bench-model --num-virtual-tokens 20
    prefix-export bench --model bench-model/base --prefix bench-model/prefix
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-model"))
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from peft import PrefixTuningConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    model.save_pretrained(args.out / "base")
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # PEFT initialises N(0, 1); keep it, the prefix only has to be non-trivial
        for param in peft_model.prompt_encoder["default"].parameters():
            param.normal_(0.0, 0.5)
    peft_model.save_pretrained(args.out / "prefix")
    print(f"wrote {args.out}/base and {args.out}/prefix (P={args.num_virtual_tokens})")


if __name__ == "__main__":
    main()
