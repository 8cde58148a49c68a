"""Input checks shared by the simulator: every bad input becomes a clear ValueError/TypeError.

Each helper names the offending argument and says how to fix it, so that errors surface at the
public API instead of deep inside numpy or torch.
"""

from __future__ import annotations

import numbers

import numpy as np

ROW_SUM_TOLERANCE = 1e-8


def as_float_array(value, name: str, ndim: int) -> np.ndarray:
    """Return ``value`` as a float64 array of ``ndim`` dimensions, or raise a clear error."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except OverflowError:
        raise ValueError(f"{name} holds a number too large for a float; all entries must be finite") from None
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a numeric array, got {type(value).__name__}") from error
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf; all entries must be finite")
    return array


def check_probability_vector(value, name: str) -> np.ndarray:
    """A 1-d, finite, non-negative vector summing to 1 (within 1e-8)."""
    vector = as_float_array(value, name, ndim=1)
    if vector.size == 0:
        raise ValueError(f"{name} is empty; it needs one probability per state")
    if np.any(vector < 0):
        raise ValueError(f"{name} has a negative entry ({vector.min():.3g}); probabilities must be >= 0")
    if abs(vector.sum() - 1.0) > ROW_SUM_TOLERANCE:
        raise ValueError(f"{name} sums to {vector.sum():.12g}, not 1; normalise it")
    return vector


def check_stochastic_matrix(value, name: str, num_states: int | None = None) -> np.ndarray:
    """A square, finite, non-negative matrix whose rows each sum to 1 (within 1e-8)."""
    matrix = as_float_array(value, name, ndim=2)
    if matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got shape {matrix.shape}")
    if num_states is not None and matrix.shape[0] != num_states:
        raise ValueError(f"{name} has {matrix.shape[0]} states but {num_states} were expected")
    if np.any(matrix < 0):
        raise ValueError(f"{name} has a negative entry ({matrix.min():.3g}); probabilities must be >= 0")
    row_sums = matrix.sum(axis=1)
    bad_rows = np.flatnonzero(np.abs(row_sums - 1.0) > ROW_SUM_TOLERANCE)
    if bad_rows.size:
        row = int(bad_rows[0])
        raise ValueError(f"{name} row {row} sums to {row_sums[row]:.12g}, not 1; normalise every row")
    return matrix


def check_int(value, name: str, minimum: int) -> int:
    """An integer (not a bool) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_tokens(value, name: str, num_states: int) -> np.ndarray:
    """An integer array with every entry in ``[0, num_states)``; returned as int64."""
    array = np.asarray(value)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        if np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer state ids, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= num_states):
        raise ValueError(
            f"{name} has a state id out of range [0, {num_states}): min {array.min()}, max {array.max()}"
        )
    return array.astype(np.int64)


def check_rng(rng) -> np.random.Generator:
    """Randomness only through an explicit numpy Generator."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(0)), got {type(rng).__name__}"
        )
    return rng
