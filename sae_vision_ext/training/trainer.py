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
    if hasattr(sae, "decoder_targets"):  # a transcoder or CLT: b_dec lives in the target half of its batches
        x = sae.decoder_targets(x)
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

        def set_learning_rates(self, rates: dict[str, tuple[float, float]]) -> None:
            """Give each SAE its own ``(lr, lr_end)`` (e.g. scaled by its width): the per-SAE trainers whose
            rates differ from the run's are rebuilt by SAELens's own ``SAETrainer`` with those rates (before
            training starts: the optimiser and schedule are new)."""
            from dataclasses import replace

            from sae_lens.training.sae_trainer import SAETrainer

            for name, (lr, lr_end) in rates.items():
                old = self.trainers[name]
                if (old.cfg.lr, old.cfg.lr_end) != (lr, lr_end):
                    cfg = replace(old.cfg, lr=lr, lr_end=lr_end)
                    self.trainers[name] = SAETrainer(
                        cfg=cfg, sae=self.saes[name], data_provider=iter(()), evaluator=None, save_checkpoint_fn=None
                    )

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
