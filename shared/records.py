"""What travels between server and clients: record keys, encode/decode, validation.

Only shared trainable parameters (LoRA adapters, sequence encoder, head) ever leave a client; the
scenario-private item memory (``memory.*``) never does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from .model import PRIVATE_PREFIX

ARRAYS = "arrays"  # ArrayRecord: trainable weights
METRICS = "metrics"  # MetricRecord: numbers, incl. NUM_EXAMPLES
CONFIG = "config"  # ConfigRecord: round settings (server -> client)
INFO = "info"  # ConfigRecord: scenario name, refusal reasons (client -> server)
NUM_EXAMPLES = "num-examples"
# in the train CONFIG: JSON {scenario: {"epsilon": e, "delta": d}}, the epsilon the server has on record as
# spent by each scenario (its checkpoints' double entry of every client's privacy ledger)
PRIVACY_SPENT = "privacy-spent"


def shared_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters every client shares, by name: everything trainable but the private memory."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(PRIVATE_PREFIX)}


def trainable_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Copies of every shared trainable parameter, by name (what a client sends)."""
    return {n: p.detach().cpu().numpy().copy() for n, p in shared_parameters(model).items()}


def load_trainable(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Set every shared trainable parameter from ``arrays``; names and shapes must match exactly."""
    params = shared_parameters(model)
    problems = validate_arrays(arrays, {n: (tuple(p.shape), np.dtype("float32")) for n, p in params.items()})
    if problems:
        raise ValueError("cannot load weights: " + "; ".join(problems))
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(torch.from_numpy(np.asarray(arrays[name])))


def to_arrayrecord(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_arrayrecord(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def validate_arrays(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[tuple[int, ...], np.dtype]]
) -> list[str]:
    """Everything wrong with ``arrays`` against expected (shape, dtype) per key; empty when valid."""
    problems = []
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing:
        problems.append(f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unexpected keys {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for key in sorted(set(expected) & set(arrays)):
        value = np.asarray(arrays[key])
        shape, dtype = expected[key]
        if value.shape != shape:
            problems.append(f"'{key}' has shape {value.shape}, expected {shape}")
        elif value.dtype != dtype:
            problems.append(f"'{key}' has dtype {value.dtype}, expected {dtype}")
        elif not np.isfinite(value).all():
            problems.append(f"'{key}' has non-finite values")
    return problems
