"""The ``ddp`` strategy: the core's process group (`plait.distributed.ProcessGroup`: start-up, time-outs and
one-line errors, as every multi-process strategy has them) and the two things `plait.step.FirstOrderStep` asks of
a data-parallel placement:

* ``split_batch(indices)`` — this rank's contiguous slice of a micro-batch of the global batch;
  ``share_sampled(indices, n)`` — under a DP transform, the examples of the global Poisson draw in its slice;
* ``all_reduce_sum(values)`` / ``reduce_gradients(params, extra)`` — sums over ranks: the per-micro-batch loss
  weights before the backward, then every gradient (and the step's loss) in one flat all-reduce after the
  last micro-batch (accumulation is local, as under DistributedDataParallel's ``no_sync``);

and, as it declares ``splits_eval = True``, what a recipe's evaluation asks through `plait.run.eval_share` /
`eval_sum` / `eval_gather`: this rank's contiguous share of the eval set, sums over ranks, per-item values gathered
in rank order.

Gradients travel as one flat buffer per step, in parameter order; every rank ends the step with identical sums
and so applies the identical optimizer step (parameters never travel after start-up, where rank 0's are
broadcast so that every rank starts from the same weights).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from plait.distributed import ProcessGroup
from plait.errors import ConfigError


class DDP(ProcessGroup):
    name = "ddp"
    splits_eval = True  # each rank evaluates its share (`eval_share`), the core's eval helpers call the three below

    def split_batch(self, indices: Sequence[int]) -> list[int]:
        n = len(indices)
        if n % self.world_size:
            raise ConfigError(f"recipe.batch_size: {n} is not divisible by the world size {self.world_size} of "
                              f"parallel 'ddp'; choose a multiple of {self.world_size}")
        k = n // self.world_size
        return indices[self.rank * k:(self.rank + 1) * k]  # a list or a tensor, as given

    def share_sampled(self, indices: Sequence[int], dataset_size: int) -> list[int]:
        """Private DDP: this rank's share of a Poisson draw over the whole dataset — the drawn examples that fall
        in its contiguous slice of the dataset (possibly none; no divisibility needed)."""
        lo = self.rank * dataset_size // self.world_size
        hi = (self.rank + 1) * dataset_size // self.world_size
        return [i for i in indices if lo <= i < hi]

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        self._collective("the step's loss-weight all-reduce", lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
        self.step_bytes += t.numel() * t.element_size()
        return t.tolist()

    def reduce_gradients(self, params: Iterable[torch.nn.Parameter], extra: Sequence[float] = ()) -> list[float]:
        """Sum every parameter's ``.grad`` over ranks in place (a missing grad counts as zeros); ``extra`` scalars
        ride in the same buffer and come back summed."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return list(extra)
        dtype = params[0].dtype
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in params]
        parts.append(torch.tensor(list(extra), dtype=dtype, device=parts[0].device))
        flat = torch.cat(parts)
        self._collective("the gradient all-reduce", lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
        self.step_bytes += flat.numel() * flat.element_size()
        offset = 0
        for p in params:
            n = p.numel()
            chunk = flat[offset:offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
            offset += n
        return flat[offset:].tolist()

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (what DistributedDataParallel does when it wraps)."""
        for t in [*model.parameters(), *model.buffers()]:
            self._collective("the start-up parameter broadcast", lambda t=t: dist.broadcast(t.data, src=0))

    # --- evaluation split across ranks (`plait.run.eval_share` / `eval_sum` / `eval_gather`) ---------------
    def eval_share(self, n: int, align: int = 1) -> range:
        """Rank r evaluates the r-th contiguous share of the ``ceil(n / align)`` blocks of ``align`` items (the
        last block may be short; a share may be empty when there are fewer blocks than ranks)."""
        blocks = -(-n // align)
        lo = self.rank * blocks // self.world_size * align
        hi = (self.rank + 1) * blocks // self.world_size * align
        return range(min(lo, n), min(hi, n))

    def eval_sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self._collective("the evaluation all-reduce", lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
        return t.tolist()

    def eval_gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's ``values`` (any length along dim 0, same trailing shape and dtype) in rank order."""
        local = values.detach().to(self.device)
        size = torch.tensor([local.shape[0]], dtype=torch.long, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        self._collective("the evaluation size all-gather", lambda: dist.all_gather(sizes, size))
        sizes = [int(s) for s in sizes]
        if max(sizes) == 0:
            return values
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._collective("the evaluation all-gather", lambda: dist.all_gather(parts, padded))
        return torch.cat([p[:k] for p, k in zip(parts, sizes)]).to(values.device)

    def take_step_bytes(self) -> float:
        out, self.step_bytes = self.step_bytes, 0
        return float(out)

    def metrics(self) -> dict[str, float]:
        return {"perf/comm_bytes": self.take_step_bytes()}
