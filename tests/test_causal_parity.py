"""Every causal type and variant: trlax vs transformers (PyTorch) on the same weights, float32, atol 1e-4.

One module for the checks every family must pass (tests/parity_checks.py): logits and every hidden
state with no, right and left padding, default and explicit positions; cached decoding equal to the
full forward; save_pretrained read back by transformers; and the checkpoint's own key names.
A family's quirks live in its own test file. A new family is covered by adding its tiny config
to tests/tiny_configs.py.
"""

from __future__ import annotations

import pytest
from safetensors import safe_open

from tests.helpers import PADDINGS
from tests.parity_checks import check_cached_decoding, check_forward, check_save_roundtrip, make_pair
from tests.tiny_configs import CAUSAL_VARIANTS, TINY_CAUSAL

CASES = {**TINY_CAUSAL, **CAUSAL_VARIANTS}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param.replace("/", "-"))
    pt, model = make_pair(CASES[request.param](), folder)
    return pt, model, folder


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("explicit_positions", [False, True])
def test_logits_and_hidden_states_match_pytorch(case, padding, explicit_positions):
    pt, model, _ = case
    check_forward(pt, model, padding, explicit_positions)


@pytest.mark.parametrize("padding", PADDINGS)
def test_cached_decoding_matches_full_forward(case, padding):
    check_cached_decoding(case[1], padding, explicit_positions=False)


def test_cached_decoding_with_explicit_positions(case):
    check_cached_decoding(case[1], "left", explicit_positions=True)


def test_save_pretrained_loads_in_transformers(case, tmp_path):
    pt, model, _ = case
    check_save_roundtrip(pt, model, tmp_path / "saved")


def test_state_dict_names_are_the_checkpoints(case):
    """trlax's HF names are exactly the tensors transformers wrote (a tied head has no lm_head tensor)."""
    _, model, folder = case
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        written = set(f.keys())
    assert set(model.state_dict()) == written
