"""``python -m llm unlearn ... --seeds 0 1 2 --betas 0.1 0.2``: a grid of unlearning runs as replicas.

Every combination of the grid (seeds x betas, seeds outer) is one replica of
:func:`llm.replica_training.unlearn_replicas`: all start from ``--model`` (each its own
reference), replica i draws its batches with its seed (``TrainConfig.seed``) and unlearns with the
objective's ``beta`` replaced by its beta. A grid axis left out takes the single run's value
(``--seed``; the objective's beta). All replicas share one evaluator (the single run's, with the
starting model as reference), so their every-step evaluation is one batched pass. Output::

    DIR/config.json                 the resolved configuration, grid included (written first)
    DIR/replica-000/results.json    per replica: its seed, beta, objective, final metrics (strict JSON)
    DIR/replica-000/trajectory.*    per replica: its markovsim Trajectory (json + npz)
    DIR/results.json                the index: per replica its folder, seed, beta and divergence (last)

    DIR/checkpoints/step-*/         with --checkpoint-every: all replicas' state (--resume continues)

Folders are numbered in grid order (no hyperparameters in file names); ``results.json`` maps them.
``--checkpoint-every K`` checkpoints all replicas every K steps and ``--resume`` continues the grid
from the newest checkpoint in ``--out`` (same command line; exact, ``unlearn_replicas``). Not
supported with a grid (refused before any computing): data parallelism (torchrun), bf16. The final
models are not saved.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field

from markovsim.losses import USES_BETA

from .checkpoint import latest_checkpoint

__all__ = ["ReplicaGrid", "check_grid", "unlearn_grid"]

# Forget losses with a beta that replicas can run (markovsim.losses.USES_BETA without dpo, whose
# preferred responses unlearn_replicas does not take): --betas needs one of them.
BETA_LOSSES = tuple(sorted(USES_BETA - {"dpo"}))


@dataclass(frozen=True)
class ReplicaGrid:
    """The unlearning grid run as replicas (``unlearn`` only); both None = one ordinary run."""

    seeds: tuple[int, ...] | None = field(default=None, metadata={
        "help": "unlearn: run one replica per batch-order seed (x --betas), batched in one computation"})
    betas: tuple[float, ...] | None = field(default=None, metadata={
        "help": "unlearn: run one replica per objective beta (x --seeds), batched in one computation"})

    def __post_init__(self) -> None:
        for name in ("seeds", "betas"):
            values = getattr(self, name)
            if values is None:
                continue
            if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"replicas {name} must be a non-empty list, got {values!r}")
            kind = int if name == "seeds" else float
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or kind(v) != v for v in values):
                raise ValueError(f"replicas {name} must be {kind.__name__}s, got {list(values)!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"--{name} lists a value twice: {list(values)!r}")
            object.__setattr__(self, name, tuple(kind(v) for v in values))

    @property
    def active(self) -> bool:
        return self.seeds is not None or self.betas is not None

    def combinations(self, seed: int, beta: float) -> list[tuple[int, float]]:
        """``[(seed, beta)]`` of every replica, seeds outer; a missing axis is the single run's value."""
        return [(s, b) for s in (self.seeds or (seed,)) for b in (self.betas or (beta,))]


def check_grid(config, train_config, objective) -> None:
    """ValueError for what a grid cannot do (before any computing)."""
    if config.command != "unlearn":
        raise ValueError(f"--seeds/--betas run unlearning replicas; {config.command} takes neither")
    if config.resume and latest_checkpoint(config.out) is None:
        raise ValueError(f"--resume but --out {config.out!r} has no checkpoint; start without --resume")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--seeds/--betas run in one process; do not start them with torchrun")
    if config.replicas.seeds is not None and "seed" in config.train:
        raise ValueError("pass --seed or --seeds, not both")
    if config.replicas.betas is not None:
        if "beta" in config.objective:
            raise ValueError("pass --beta or --betas, not both")
        if objective.forget not in BETA_LOSSES:
            raise ValueError(f"--betas needs an objective with a beta ({', '.join(BETA_LOSSES)} forget losses); "
                             f"{config.objective.get('name')} has none")
    if not config.resume and (os.path.exists(os.path.join(config.out, "replica-000"))
                              or latest_checkpoint(config.out) is not None):
        raise ValueError(f"--out {config.out!r} already holds a replica run; pass --resume or choose a new folder")


def unlearn_grid(config, data, model, train_config, objective, evaluator) -> dict:
    """Run the grid with ``unlearn_replicas``; write one folder per replica; return the index summary."""
    from llm.replica_training import replica_folder, unlearn_replicas
    from llm.results import strict_json
    from markovsim.results import atomic_write_json, metadata_block

    combinations = config.replicas.combinations(train_config.seed, objective.beta)
    configs = [dataclasses.replace(train_config, seed=seed) for seed, _ in combinations]
    objectives = [dataclasses.replace(objective, beta=beta) for _, beta in combinations]
    models = [copy.deepcopy(model) for _ in combinations]
    trajectories = unlearn_replicas(models, objectives, data["forget"], data["retain"], configs, evaluator,
                                    run_dir=config.out, resume=config.resume)  # writes replica-*/trajectory.*
    index = []
    for i, (trajectory, (seed, beta)) in enumerate(zip(trajectories, combinations)):
        folder = replica_folder(config.out, i)
        summary = _summary(trajectory, objectives[i])
        document = metadata_block(config, command="unlearn", replica=i, seed=seed, beta=beta,
                                  train_config=dataclasses.asdict(configs[i]), **summary)
        atomic_write_json(os.path.join(folder, "results.json"),
                          strict_json(document, trajectory.divergence_reason))
        index.append({"folder": os.path.basename(folder), "seed": seed, "beta": beta,
                      "diverged_at": trajectory.diverged_at, "divergence_reason": trajectory.divergence_reason})
    wall = max((t.info["wall_seconds"] for t in trajectories), default=0.0)
    return {"objective": dataclasses.asdict(objective), "replicas": index, "num_replicas": len(index),
            "route": trajectories[0].info["route"], "wall_seconds": wall}


def _summary(trajectory, objective) -> dict:
    final = {name: dict(zip(trajectory.component_names, values[-1].tolist()))
             for name, values in trajectory.component_metrics.items()}
    return {"objective": dataclasses.asdict(objective), "diverged_at": trajectory.diverged_at,
            "divergence_reason": trajectory.divergence_reason, "final": final,
            "final_loss": float(trajectory.step_metrics["loss"][-1]), "route": trajectory.info["route"],
            "num_replicas": trajectory.info["num_replicas"]}
