"""Property-based checks of request validation: any value gives checked parameters
within the limits, or a ValueError that names the field; never anything else."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from sd_backend.config import SCHEDULER_NAMES, DeploymentConfig
from sd_backend.family import ModelFamily
from sd_backend.params import MAX_SEED, check_params

CONFIG = DeploymentConfig()
FIELDS = {"seed": "SEED", "steps": "STEPS", "guidance": "GUIDANCE_SCALE", "height": "HEIGHT", "width": "WIDTH", "scheduler": "SCHEDULER"}

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.binary(max_size=50),
    st.sampled_from(SCHEDULER_NAMES + ("PNDM", " ddim ", "lms")),
    st.lists(st.integers(), max_size=3),
)


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({}, optional={name: anything for name in FIELDS}))
def test_any_input_is_checked_or_named_in_a_value_error(raw):
    try:
        params = check_params(CONFIG, ModelFamily("sd1", 512, "epsilon"), **raw)
    except ValueError as err:
        assert any(field in str(err) for field in FIELDS.values()), str(err)
        return
    assert 0 <= params.seed <= MAX_SEED
    assert 1 <= params.steps <= CONFIG.max_steps
    assert math.isfinite(params.guidance) and 0 <= params.guidance <= CONFIG.max_guidance
    for size in (params.height, params.width):
        assert size % 8 == 0 and CONFIG.min_size <= size <= CONFIG.max_size
    assert params.scheduler in SCHEDULER_NAMES
