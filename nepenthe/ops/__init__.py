"""Layer 1: nepenthe's numerical ops (placeholder during the kernel work: reference only)."""
from .reference import *  # noqa: F401,F403
from .reference import (  # noqa: F401
    AGGREGATES, NUM_STATES, OFF, ON, SAT, STATE_NAMES, ZERO, ZERO_AS, accumulate_sign_histogram_,
    aggregate_layer_entropy, apply_mask_, binary_entropy, entropy_from_histogram, neuron_entropy_from_histogram,
    sign_histogram, state_counts,
)
