"""One TopK training step (forward, loss, backward, Adam) at the training benchmark's shapes: the
30-line reference against SAELens's ``TopKTrainingSAE`` and our subclass (``training/auxk.py``),
with and without decoder-norm rescaling. Medians of interleaved repeats, one thread.

    python -m benchmarks.bench_train_step [--repeats 15]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._timing import interleaved_medians, markdown_table

D_IN, D_SAE, K, BATCH = 192, 512, 16, 4096


def reference_step(x: torch.Tensor):
    from benchmarks.bench_training import reference_sae

    _, step = reference_sae(x.mean(0), D_SAE, K, 4e-4, torch.Generator().manual_seed(0))
    return lambda: step(x)


def saelens_step(cls, cfg_cls, x: torch.Tensor, rescale: bool):
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(0)
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale))
    opt = torch.optim.Adam(sae.parameters(), lr=4e-4)
    dead = torch.zeros(D_SAE, dtype=torch.bool)

    def step() -> None:
        step_input = TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
        )
        out = sae.training_forward_pass(step_input)
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    from sae_vision_ext.training.auxk import AuxKTopKTrainingSAE, AuxKTopKTrainingSAEConfig

    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1))
    fns = {"30-line reference": reference_step(x)}
    for rescale in (True, False):
        fns[f"SAELens TopKTrainingSAE, rescale={rescale}"] = saelens_step(
            TopKTrainingSAE, TopKTrainingSAEConfig, x, rescale
        )
        fns[f"ours (AuxKTopKTrainingSAE), rescale={rescale}"] = saelens_step(
            AuxKTopKTrainingSAE, AuxKTopKTrainingSAEConfig, x, rescale
        )
    times = interleaved_medians(fns, args.repeats)
    base = times["30-line reference"]
    rows = [[name, f"{1000 * t:.1f} ms", f"{t / base:.2f}x"] for name, t in times.items()]
    print(f"batch {BATCH}, d_in {D_IN}, d_sae {D_SAE}, k {K}, one thread")
    print(markdown_table(["training step", "median", "vs reference"], rows))


if __name__ == "__main__":
    main()
