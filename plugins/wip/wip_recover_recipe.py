"""Recipe ``wip_recover``: swap, calibrate and briefly fine-tune each operator; perplexity before/after.

For each operator of ``recipe.operators`` on a fresh copy of the ``model:`` (by default the bundled LM):

1. perplexity of the original model on the eval blocks;
2. swap the attention (``wip_attention``), perplexity without calibration;
3. closed-form per-head calibration on ``calib_blocks`` blocks of the data's train split, perplexity;
4. ``finetune_steps`` AdamW steps on the calibration parameters and norms only, perplexity;

plus the op counts and energy of one forward of an eval batch. Each operator is logged as one record
(``wip/<op>/…``) and everything is written to ``<run dir>/wip_results.json``.

    plait run configs/wip/recover.yaml
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from plait.errors import ConfigError

from .attention import swap_attention
from .corpus import token_blocks
from .costs import ATTENTION_COMPONENTS, ENERGY_PJ, OpCounter, energy_pj
from .lm import perplexity
from .operators import OPERATORS, check_mixer
from .recovery import calibrate, finetune


@dataclass
class WipRecoverConfig:
    operators: list[str] = field(default_factory=lambda: ["l1", "pot", "minprod", "mitchell"])
    mixer: str = "exact"  # exact | pot (A·V with power-of-two probabilities)
    key_bias: bool = False  # also fit γ·‖k‖₁ per head
    dim_scales: bool = True  # also train per-dimension q/k input scales of the operator in the fine-tune
    distill: bool = True  # fine-tune on KL from the original model's next-token distributions (else next-token loss)
    block: int = 128  # tokens per block
    calib_blocks: int = 192  # blocks of the train split used to calibrate and fine-tune
    eval_blocks: int = 0  # 0: every eval block
    finetune_steps: int = 100
    lr: float = 1.0e-2
    batch_size: int = 16
    precision: str = "fp32"  # energy table: fp32 | fp16


def forward_costs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """Op counts of one forward on ``ids``: attention components, linear layers, totals and energy (pJ)."""
    with torch.no_grad(), OpCounter().watch(model) as counter:
        model(input_ids=ids)
    attention = counter.total(ATTENTION_COMPONENTS)
    return {"components": counter.as_dict(), "attention": attention, "qk": counter.total(("qk",)),
            "model": counter.total()}


def compare_operators(model: torch.nn.Module, calib: torch.Tensor, evals: torch.Tensor, operators: list[str], *,
                      mixer: str = "exact", key_bias: bool = False, dim_scales: bool = False, distill: bool = True,
                      finetune_steps: int = 100, lr: float = 3e-3, batch_size: int = 16, precision: str = "fp32",
                      seed: int = 0, progress: bool = False, on_result=None, on_phase=None) -> dict[str, Any]:
    """The study behind the recipe and benchmarks/wip/wip.py; ``model`` (eager attention) is not modified.

    ``on_phase(text)``, when given, is called as each phase starts (the recipe prints them: perplexity and
    calibration passes run for tens of seconds with no bar of their own).
    """
    phase = on_phase or (lambda text: None)
    model = model.eval()
    phase(f"original: perplexity on {len(evals)} eval blocks")
    base_ppl = perplexity(model, evals, batch_size)
    probe = evals[: min(len(evals), batch_size)]
    base_costs = forward_costs(swap_attention(copy.deepcopy(model), "exact", mixer="exact"), probe)
    if on_result is not None:
        on_result("original", {"ppl": base_ppl})
    result: dict[str, Any] = {"original": {"ppl": base_ppl, "costs": base_costs}, "operators": {}}
    for name in operators:
        start = time.time()
        swapped = swap_attention(copy.deepcopy(model), name, mixer, key_bias, dim_scales)
        phase(f"{name}: perplexity after the swap")
        ppl_swap = perplexity(swapped, evals, batch_size)
        phase(f"{name}: closed-form calibration on {len(calib)} blocks")
        fitted = calibrate(swapped, calib, batch_size)
        phase(f"{name}: perplexity after calibration")
        ppl_cal = perplexity(swapped, evals, batch_size)
        if finetune_steps:
            phase(f"{name}: fine-tune {finetune_steps} steps")
        losses = finetune(swapped, calib, finetune_steps, lr, batch_size, seed, progress,
                          teacher=model if distill else None)
        phase(f"{name}: perplexity after fine-tuning")
        ppl_ft = perplexity(swapped, evals, batch_size)
        costs = forward_costs(swapped, probe)
        gap = ppl_swap - base_ppl

        def recovered(ppl: float) -> float:
            return (ppl_swap - ppl) / gap if gap > 0 else 1.0

        e_att, e_att0 = energy_pj(costs["attention"], precision), energy_pj(base_costs["attention"], precision)
        e_all, e_all0 = energy_pj(costs["model"], precision), energy_pj(base_costs["model"], precision)
        row = {
            "ppl_swap": ppl_swap, "ppl_calibrated": ppl_cal, "ppl_finetuned": ppl_ft,
            "ppl_ratio_swap": ppl_swap / base_ppl, "ppl_ratio_calibrated": ppl_cal / base_ppl,
            "ppl_ratio_finetuned": ppl_ft / base_ppl,
            "gap_recovered_calibrated": recovered(ppl_cal), "gap_recovered_finetuned": recovered(ppl_ft),
            "qk_multiplications": costs["qk"]["fp_mul"],
            "attention_mults_removed": 1 - costs["attention"]["fp_mul"] / base_costs["attention"]["fp_mul"],
            "model_mults_removed": 1 - costs["model"]["fp_mul"] / base_costs["model"]["fp_mul"],
            "attention_energy_ratio": e_att / e_att0, "model_energy_ratio": e_all / e_all0,
            "finetune_steps": finetune_steps, "finetune_loss_first_last": [losses[0], losses[-1]] if losses else [],
            "alpha_mean": float(torch.tensor(fitted["alpha"]).mean()),
            "costs": costs, "wall_s": round(time.time() - start, 1),
        }
        result["operators"][name] = row
        if on_result is not None:
            on_result(name, row)
    return result


class WipRecoverRecipe:
    """Builds the model and the calib/eval blocks, runs :func:`compare_operators`, logs and saves it."""

    def __init__(self, run, **options: Any):
        self.run = run
        self.cfg = c = WipRecoverConfig(**options)
        unknown = [o for o in c.operators if o not in OPERATORS]
        if unknown or not c.operators:
            raise ConfigError(f"recipe.operators: unknown or empty {unknown or c.operators}; allowed: "
                              f"{', '.join(OPERATORS)}")
        try:
            check_mixer(c.mixer)
        except ValueError as exc:
            raise ConfigError(f"recipe.mixer: {exc}") from exc
        for key in ("block", "calib_blocks", "batch_size"):
            if getattr(c, key) < 1 or (key == "block" and c.block < 2):
                raise ConfigError(f"recipe.{key}: must be at least {2 if key == 'block' else 1}, "
                                  f"got {getattr(c, key)}")
        if c.finetune_steps < 0 or c.eval_blocks < 0:
            raise ConfigError("recipe.finetune_steps and recipe.eval_blocks must be non-negative")
        if c.precision not in ENERGY_PJ:  # checked before the swap, calibration and fine-tune, not after
            raise ConfigError(f"recipe.precision: {c.precision!r} has no energy table; allowed: {', '.join(ENERGY_PJ)}")
        if not c.lr > 0:
            raise ConfigError(f"recipe.lr: must be > 0, got {c.lr}")
        bundle = run.build("model")
        self.model, tok = bundle.model.to(run.device), bundle.tokenizer
        data = run.build("data")
        calib = token_blocks(tok, [e["completion"] for e in data.examples("train")], c.block)
        evals = token_blocks(tok, [e["completion"] for e in data.examples("eval")], c.block)
        if len(calib) < c.calib_blocks:
            raise ConfigError(f"recipe.calib_blocks: the data's train split gives only {len(calib)} blocks of "
                              f"{c.block} tokens, fewer than the {c.calib_blocks} asked for")
        if len(evals) == 0:
            raise ConfigError(f"data: the eval split is shorter than one block of {c.block} tokens")
        self.calib = calib[: c.calib_blocks]
        self.evals = evals[: c.eval_blocks] if c.eval_blocks else evals

    def _phase(self, text: str) -> None:
        """Progress of the phases without a bar of their own, on stderr with the time since the run began."""
        t0 = self.__dict__.setdefault("_t0", time.time())
        print(f"plait: wip_recover [{time.time() - t0:6.1f} s] {text} …", file=sys.stderr, flush=True)

    def __call__(self) -> dict[str, Any]:
        c, run = self.cfg, self.run
        step = [0]

        def log(name: str, row: dict) -> None:
            if name == "original":
                run.log(0, {"wip/original/ppl": row["ppl"]})
                print(f"  original  ppl {row['ppl']:9.3f}")
                return
            step[0] += 1
            run.log(step[0], {f"wip/{name}/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
            print(f"  {name:9s} ppl swap {row['ppl_swap']:9.3f}  calibrated {row['ppl_calibrated']:9.3f}  "
                  f"fine-tuned {row['ppl_finetuned']:9.3f}  QK mults {row['qk_multiplications']}")

        result = compare_operators(self.model, self.calib.to(run.device), self.evals.to(run.device), c.operators,
                                   mixer=c.mixer, key_bias=c.key_bias, dim_scales=c.dim_scales, distill=c.distill,
                                   finetune_steps=c.finetune_steps, lr=c.lr, batch_size=c.batch_size,
                                   precision=c.precision, seed=run.cfg.run.seed, progress=bool(run.cfg.run.progress),
                                   on_result=log, on_phase=self._phase if run.cfg.run.progress else None)
        base = result["original"]["ppl"]
        tmp = run.dir / ".wip_results.json.tmp"  # written whole, then renamed: never a half-written file
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, run.dir / "wip_results.json")
        ops = result["operators"]
        return {"first_eval": {"eval/ppl_original": base, **{f"eval/ppl_{o}": r["ppl_swap"] for o, r in ops.items()}},
                "final_eval": {"eval/ppl_original": base,
                               **{f"eval/ppl_{o}": r["ppl_finetuned"] for o, r in ops.items()}},
                "steps": c.finetune_steps}
