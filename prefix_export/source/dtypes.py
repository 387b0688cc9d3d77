"""Which dtype a bfloat16 checkpoint is exported in: float16 or float32, chosen from measured evidence.

ONNX Runtime's CPU provider has no bfloat16 kernels for MatMul, Softmax, Expand, Where and more
(each op tested alone, onnxruntime 1.32), so a bfloat16 graph cannot be validated on a CPU. float16
keeps the weight bytes; float32 doubles them. float16's range (65504) is the risk: some families
(Gemma's residual stream, for one) carry activations far beyond it in real checkpoints, where
float16 overflows to Inf. So the model, still in bfloat16, runs a short calibration batch with a hook
on every module, and the largest activation and weight decide:

    the registry marks the family float16-unsafe (ArchSpec.float16_unsafe) ->  float32
    largest |activation| and |weight| <= 65504 / HEADROOM               ->  float16
    otherwise                                                             ->  float32 (the reason is recorded)
"""
from __future__ import annotations

import dataclasses
import logging

import torch

log = logging.getLogger(__name__)

FLOAT16_MAX = 65504.0
# Activations grow with other inputs than the calibration batch: keep a factor of 8 below the limit.
HEADROOM = 8.0
CALIBRATION_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class DtypeChoice:
    checkpoint: str  # the dtype the weights were saved in
    exported: str  # the dtype the export uses
    why: str
    peak_activation: float | None = None
    peak_weight: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _peak_activation(model: torch.nn.Module, vocab_size: int, bos_token_id: int | None) -> float:
    """The largest finite |output| of any module over a seeded calibration batch (2 x 32 tokens)."""
    peak = [0.0]

    def record(module, args, output):
        for value in output if isinstance(output, (tuple, list)) else (output,):
            if torch.is_tensor(value) and value.is_floating_point() and value.numel():
                finite = value[torch.isfinite(value)]
                if finite.numel():
                    peak[0] = max(peak[0], float(finite.abs().max()))

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, CALIBRATION_TOKENS), generator=generator)
    if bos_token_id is not None and 0 <= bos_token_id < vocab_size:
        ids[:, 0] = bos_token_id  # some families' largest activations sit on the first token
    handles = [m.register_forward_hook(record) for m in model.modules()]
    try:
        with torch.no_grad():
            if model.config.is_encoder_decoder:
                model(input_ids=ids, decoder_input_ids=ids[:, :8])
            else:
                model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return peak[0]


def choose_for_bfloat16(model: torch.nn.Module, vocab_size: int, float16_unsafe: str | None = None) -> DtypeChoice:
    """float16 unless the registry knows the family cannot take it (`float16_unsafe`, from ArchSpec) or the
    measured weights or activations come within HEADROOM of its range."""
    if float16_unsafe:
        return DtypeChoice("bfloat16", "float32", f"bfloat16 has no CPU kernels in ONNX Runtime, and float16 is "
                                                  f"not safe for this family: {float16_unsafe}; exported in float32")
    peak_weight = max(float(p.detach().abs().max()) for p in model.parameters() if p.is_floating_point())
    bos = getattr(model.config, "bos_token_id", None)
    peak_activation = _peak_activation(model, vocab_size, bos if isinstance(bos, int) else None)
    limit = FLOAT16_MAX / HEADROOM
    if max(peak_weight, peak_activation) <= limit:
        why = (f"bfloat16 has no CPU kernels in ONNX Runtime; float16 holds this model: largest activation "
               f"{peak_activation:.4g} and weight {peak_weight:.4g} on a calibration batch, within float16's "
               f"{FLOAT16_MAX:g} / {HEADROOM:g}")
        return DtypeChoice("bfloat16", "float16", why, peak_activation, peak_weight)
    why = (f"bfloat16 has no CPU kernels in ONNX Runtime, and float16 would risk overflow: largest activation "
           f"{peak_activation:.4g}, weight {peak_weight:.4g} on a calibration batch, against float16's "
           f"{FLOAT16_MAX:g} / {HEADROOM:g}; exported in float32 (twice the bytes)")
    return DtypeChoice("bfloat16", "float32", why, peak_activation, peak_weight)


def apply(model: torch.nn.Module, choice: DtypeChoice) -> None:
    """Cast the model in place, one tensor at a time (never a second copy of the whole model)."""
    model.to(getattr(torch, choice.exported))
    log.info("dtype: %s checkpoint exported as %s (%s)", choice.checkpoint, choice.exported, choice.why)
