"""Figure: the paper's Markov mixture and the two models every analysis starts from.

Question: what do the retain / forget1 / forget2 chains look like, and how far are the reference
(pre-trained on everything) and retrained (retain only) tabular models from each true chain?
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from markovsim.metrics import component_kl
from markovsim.models import MixtureOfChains, TabularMarkov
from markovsim.scenarios import paper_mixture_spec

from .cache import load_cache, save_cache
from .style import COMPONENT_COLORS, apply_style, save_figure

TITLE = "The paper's Markov mixture: true chains, reference and retrained models"


@dataclass(frozen=True)
class Config:
    scale: float = 0.2  # fraction of the paper's 10000/5000/5000 sequences
    forget2_length: int = 5
    seed: int = 0


CONFIGS = {"tiny": Config(scale=0.01), "quick": Config(scale=0.2), "paper": Config(scale=1.0)}


def compute(config: Config, cache_stem: str, device: str = "cpu", recompute: bool = False, jobs: int = 1) -> str:
    """Fit the reference/retrained models on sampled data and measure exact KLs; writes ``cache_stem.json/.npz``."""
    spec = paper_mixture_spec(forget2_length=config.forget2_length, scale=config.scale, seed=config.seed)
    train, test = spec.sample()
    pretraining = train.select(*spec.names_where(in_pretraining=True))
    models = {"reference": TabularMarkov.fit(pretraining), "retrained": TabularMarkov.fit(train.select("retain")),
              "reference (mixture)": MixtureOfChains.from_components(
                  [c for c in spec.components if c.in_pretraining])}
    true_chains = {c.name: c.chain for c in spec.components}
    kls = {name: component_kl(true_chains, model, test) for name, model in models.items()}
    arrays = {f"chain_{c.name}": c.chain.transition_matrix for c in spec.components}
    arrays |= {f"model_{name}": torch.softmax(models[name].transition_logits, -1).numpy()
               for name in ("reference", "retrained")}
    return save_cache(cache_stem, arrays, config, kl_to_true_chain=kls, device=device)


def plot(cache_stem: str, output_stem: str) -> list[str]:
    document, matrices = load_cache(cache_stem)
    apply_style()
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 6, figsize=(15, 2.9), gridspec_kw={"width_ratios": [1, 1, 1, 1, 1, 1.4]})
    for axis, key in zip(axes[:5], matrices):
        image = axis.imshow(matrices[key], vmin=0, vmax=0.3, cmap="viridis")
        axis.set_title(key.replace("chain_", "true ").replace("model_", ""))
        axis.set_xlabel("next state")
        axis.grid(False)
    axes[0].set_ylabel("current state")
    figure.colorbar(image, ax=axes[4], shrink=0.8, label="P(next | current)")
    kls = document["kl_to_true_chain"]
    names = list(next(iter(kls.values())))
    width = 0.8 / len(kls)
    for index, (model, values) in enumerate(kls.items()):
        axes[5].bar(np.arange(len(names)) + index * width, [values[n] for n in names], width, label=model)
    axes[5].set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    for label in axes[5].get_xticklabels():
        label.set_color(COMPONENT_COLORS.get(label.get_text(), "black"))
    axes[5].set_ylabel("mean per-token KL(true || model)")
    axes[5].set_title("test-set KL per component")
    axes[5].legend()
    figure.suptitle(TITLE)
    return save_figure(figure, output_stem)
