"""SAELens's ``MultiSAETrainer`` with ``b_dec`` initialised from the data (and data-parallel statistics)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sae_lens import TrainingSAE
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer


@torch.no_grad()
def initial_b_dec(trainer: MultiSAETrainer, sae: TrainingSAE, batches: list[torch.Tensor], method: str) -> torch.Tensor:
    """``b_dec`` at the mean or geometric median of ``batches`` in the SAE's input space (after the
    trainer's activation scaler and the SAE's run-time normalisation, where ``b_dec`` is subtracted)."""
    x = torch.cat([sae.run_time_activation_norm_fn_in(trainer.activation_scaler(b.to(sae.W_enc))) for b in batches])
    centre = x.mean(0)
    if method == "geometric_median":  # Weiszfeld iterations, started at the mean
        for _ in range(50):
            w = 1.0 / (x - centre).norm(dim=-1).clamp_min(1e-8)
            new = (w[:, None] * x).sum(0) / w.sum()
            if (new - centre).norm() <= 1e-6 * (1 + centre.norm()):
                return new
            centre = new
    return centre


def vision_trainer_class() -> type:
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    class VisionMultiSAETrainer(MultiSAETrainer):
        """SAELens's MultiSAETrainer with ``b_dec`` initialised from the data after SAELens's scaling
        estimate (the progress bar is SAELens's own)."""

        b_dec_init: str = "zeros"
        b_dec_init_batches: int = 0
        dp: Any = None  # the run's ddp.DataParallel, if data-parallel

        def _estimate_scaling_factors(self) -> None:
            super()._estimate_scaling_factors()
            if self.dp is not None:
                self.dp.sync_scalers(self)
            if self.b_dec_init == "zeros" or self.b_dec_init_batches <= 0:
                return
            peeked = self.data_provider.peek(self.b_dec_init_batches)
            if self.dp is not None:
                peeked = [self.dp.gather(b) for b in peeked]
            for name, sae in self.saes.items():
                hook = self.hook_names[name]
                sae.b_dec.data.copy_(
                    initial_b_dec(self.trainers[name], sae, [b[hook] for b in peeked], self.b_dec_init)
                )

    return VisionMultiSAETrainer
