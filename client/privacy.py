"""User-level differential privacy on a client: DP-SGD with Opacus and a privacy ledger on disk.

The unit of privacy is one user of a scenario. Every step samples users with Poisson sampling
(rate q = train.batch-size / trainable users), takes one example per sampled user, clips each
user's gradient to ``privacy.max-grad-norm`` and adds Gaussian noise (Opacus ``DPOptimizer`` on
per-sample gradients from ``GradSampleModule``). The noise multiplier is fixed once, for the whole
planned run (``fed.rounds`` x ``train.local-steps`` steps at the target epsilon), and stored in the
ledger with every step taken; epsilon is always computed from that whole history with Opacus's
RDP accountant, so it survives rounds, restarts and resumed runs. A client whose next round would
exceed the target refuses to train.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from shared.config import Config
from shared.files import atomic_write_text

from .state import resumed_file, state_folder

# Opacus is imported where it is used: otherwise it adds a second to every client process's start, private or not
if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

LEDGER = "privacy-ledger.json"


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` after DP-SGD steps ``[(noise multiplier, sample rate, steps), ...]`` (RDP)."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


@dataclass
class Ledger:
    """The privacy plan of one scenario and every DP-SGD step it has taken."""

    scenario: str
    target_epsilon: float
    delta: float
    max_grad_norm: float
    sample_rate: float
    noise_multiplier: float
    planned_steps: int
    history: list[tuple[float, float, int]] = field(default_factory=list)  # Opacus accountant history
    rounds: list[int] = field(default_factory=list)  # server rounds trained

    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self.history)

    def epsilon(self, extra_steps: int = 0) -> float:
        """Epsilon spent so far, or after ``extra_steps`` more steps of the plan."""
        extra = [(self.noise_multiplier, self.sample_rate, extra_steps)] if extra_steps else []
        return epsilon_of(self.history + extra, self.delta)

    def refusal(self, steps: int) -> str | None:
        """Why ``steps`` more steps are not allowed (None when they are)."""
        after = self.epsilon(steps)
        if after > self.target_epsilon:
            return (
                f"privacy budget of scenario '{self.scenario}' exhausted: epsilon spent {self.epsilon():.3f} "
                f"after {self.steps} steps, {steps} more would reach {after:.3f} > target {self.target_epsilon} "
                f"(delta {self.delta:.3g})"
            )
        return None

    def record(self, steps: int, server_round: int) -> None:
        if self.history and self.history[-1][:2] == (self.noise_multiplier, self.sample_rate):
            sigma, rate, done = self.history[-1]
            self.history[-1] = (sigma, rate, done + steps)
        else:
            self.history.append((self.noise_multiplier, self.sample_rate, steps))
        self.rounds.append(server_round)

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Ledger:
        try:
            raw = json.loads(path.read_text())
            raw["history"] = [(float(a), float(b), int(c)) for a, b, c in raw["history"]]
            ledger = cls(**raw)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"privacy ledger {path} is unreadable ({exc}); refusing to train without it") from None
        return ledger


def ledger_status(state_dir: str | Path) -> dict[str, object]:
    """What a client's ledger (``STATE/privacy-ledger.json``) says: target, spent, steps, the rounds trained
    and how many more rounds of the same length fit in the budget."""
    path = Path(state_dir) / LEDGER
    if not path.is_file():
        raise ValueError(f"{path} does not exist: no private round was trained with this state folder")
    ledger = Ledger.load(path)
    per_round = ledger.steps // len(ledger.rounds) if ledger.rounds else ledger.planned_steps
    remaining = 0
    while per_round and ledger.epsilon(per_round * (remaining + 1)) <= ledger.target_epsilon:
        remaining += 1
    return {
        "scenario": ledger.scenario,
        "target epsilon": ledger.target_epsilon,
        "delta": ledger.delta,
        "epsilon spent": round(ledger.epsilon(), 4),
        "steps": ledger.steps,
        "rounds trained": ledger.rounds,
        "noise multiplier": round(ledger.noise_multiplier, 4),
        "sample rate": round(ledger.sample_rate, 6),
        f"rounds remaining ({per_round} steps each)": remaining,
    }


def plan(cfg: Config, scenario: str, num_users: int, trainable_users: int) -> Ledger:
    """A fresh ledger: delta, sample rate and the noise multiplier for the whole planned run."""
    p = cfg.privacy
    if not p.enabled:
        raise ValueError("config key 'privacy.epsilon' = 0: differential privacy is off, there is nothing to plan")
    delta = p.delta or 1.0 / (10 * num_users)
    rate = min(1.0, cfg.train.batch_size / trainable_users)
    steps = cfg.fed.rounds * cfg.train.local_steps
    from opacus.accountants.utils import get_noise_multiplier

    sigma = get_noise_multiplier(
        target_epsilon=p.epsilon, target_delta=delta, sample_rate=rate, steps=steps, accountant="rdp"
    )
    return Ledger(scenario, p.epsilon, delta, p.max_grad_norm, rate, float(sigma), steps)


def ledger_path(cfg: Config, node_config: Mapping[str, object], scenario: str) -> Path:
    """Client daemon: ``<state-dir>/privacy-ledger.json`` (node config); simulation: under ``run.dir``."""
    folder = state_folder(cfg, node_config, scenario)
    if folder is not None:
        return folder / LEDGER
    raise ValueError(
        "privacy.epsilon > 0 needs a place for the privacy ledger: node config 'state-dir' (client daemon) "
        "or config key 'run.dir'"
    )


def open_ledger(cfg: Config, path: Path, scenario: str, num_users: int, trainable_users: int) -> Ledger:
    """The stored ledger (checked against the config), else the resumed run's, else a new plan.

    A resumed simulation writes to a new run folder: its ledger continues the one of the run it
    resumes (``run.resume`` = ``<old run>/checkpoints/round-N``), so nothing spent is forgotten.
    """
    fresh = plan(cfg, scenario, num_users, trainable_users)
    source = resumed_file(cfg, path, scenario)
    if not source.exists():
        return fresh
    ledger = Ledger.load(source)
    for key in ("scenario", "target_epsilon", "delta", "max_grad_norm", "sample_rate", "planned_steps"):
        stored, wanted = getattr(ledger, key), getattr(fresh, key)
        if stored != wanted and not (isinstance(wanted, float) and math.isclose(stored, wanted, rel_tol=1e-9)):
            raise ValueError(
                f"privacy ledger {source} was planned with {key} = {stored!r}, the config now gives {wanted!r}; "
                "a budget cannot be re-planned mid-way: use a new state folder for a new budget"
            )
    return ledger


class DPSGD:
    """Opacus DP-SGD for one round, driven by a ledger."""

    def __init__(self, ledger: Ledger, trainable_users: int) -> None:
        self.ledger = ledger
        self.batch_size = max(1, round(ledger.sample_rate * trainable_users))  # expected Poisson batch

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[DPOptimizer]:
        """Per-sample gradient hooks on the trainable layers and a DP optimizer; hooks removed on exit."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        try:
            yield DPOptimizer(
                optimizer,
                noise_multiplier=self.ledger.noise_multiplier,
                max_grad_norm=self.ledger.max_grad_norm,
                expected_batch_size=self.batch_size,
                loss_reduction="mean",
            )
        finally:
            wrapped._close()

    @staticmethod
    def step(optimizer: DPOptimizer, model: torch.nn.Module) -> None:
        """One DP-SGD step, then a check that the noised gradient reached every trainable weight: one that
        the optimiser does not hold, or that got no gradient, was never wrapped (e.g. a LoRA layer Opacus
        or peft lost track of) while epsilon is still being spent. (Checked by identity, not by comparing
        values: a large scalar such as the head's similarity scale can take an Adam step below its float32
        spacing, which stopped a private run on the public benchmark data.) Noise 0, used only in
        ablations, skips the check."""
        optimizer.step()
        if optimizer.noise_multiplier == 0:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        stuck = [n for n, p in trainable if id(p) not in held or p.grad is None]
        if stuck:
            raise RuntimeError(
                f"a DP-SGD step left trainable weights without a noised gradient: {', '.join(stuck[:5])}"
            )

    @staticmethod
    def empty_batch(params: list[torch.nn.Parameter]) -> None:
        """No user sampled: zero per-user gradients, so the step adds noise only."""
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]
