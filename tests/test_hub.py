"""The hub code path online, against a local stand-in (tests/hub_stand_in.py): loading, the errors a user
meets (a mistyped id, a revision, a bad token) and which repo a revision applies to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import batch, trl_checkpoint
from tests.hub_stand_in import stand_in_hub
from tests.test_adapters import torch_base
from tests.test_reward_adapter import POLICY, reward_adapter
from trlax import CheckpointError, FlaxAutoModelForCausalLM, FlaxAutoModelForCausalLMWithValueHead

BASE_COMMIT, ADAPTER_COMMIT, REWARD_COMMIT = "a" * 40, "b" * 40, "c" * 40


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    base = root / "base"
    torch_base("gpt2", base)
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=POLICY)
    policy.base_model_name_or_path = "org/base"  # as it would be, loaded from the hub
    policy.save_pretrained(root / "adapter")
    reward_adapter(base, root / "rm", num_labels=1)
    return {"base": base, "adapter": root / "adapter", "rm": root / "rm", "trl": trl_checkpoint("gpt2", root)}


@pytest.fixture
def hub(folders, monkeypatch, tmp_path):
    with stand_in_hub(monkeypatch, tmp_path / "cache") as hub:
        hub.add("org/base", folders["base"], BASE_COMMIT)
        hub.add("org/adapter", folders["adapter"], ADAPTER_COMMIT)
        hub.add("org/rm", folders["rm"], REWARD_COMMIT)
        hub.add("org/trl", folders["trl"], BASE_COMMIT)
        yield hub


def test_a_hub_id_loads_as_its_folder_does(hub, folders):
    ids, mask = batch(101, "left")
    local = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(folders["trl"], strict=True)
    online = FlaxAutoModelForCausalLMWithValueHead.from_pretrained("org/trl", revision=BASE_COMMIT, strict=True)
    for want, got in zip(local(ids, mask), online(ids, mask), strict=True):
        np.testing.assert_array_equal(want, got)
    assert "org/trl@" + BASE_COMMIT + "/model.safetensors" in hub.requests


def test_hub_errors_keep_the_hubs_reason_and_name_the_fix(hub):
    """trlax kept the first line of huggingface_hub's message ("404 Client Error."), which dropped what was wrong;
    a bad token was huggingface_hub's own HfHubHTTPError, no TrlaxError."""
    with pytest.raises(CheckpointError, match=r"'checkpoints/run1', and no local folder has that name .*"
                                              r"Repository Not Found.*pass token="):
        FlaxAutoModelForCausalLM.from_pretrained("checkpoints/run1")
    with pytest.raises(CheckpointError, match=r"'org/base' has no revision 'v9' .*Invalid rev id: v9.*revision="):
        FlaxAutoModelForCausalLM.from_pretrained("org/base", revision="v9")
    hub.tokens = {"hf_right"}
    with pytest.raises(CheckpointError, match=r"'org/base' \(HfHubHTTPError: .*401.*Invalid credentials.*token="):
        FlaxAutoModelForCausalLM.from_pretrained("org/base", token="hf_wrong")
    FlaxAutoModelForCausalLM.from_pretrained("org/base", token="hf_right")


def test_a_revision_applies_to_the_repo_it_names(hub):
    """An adapter policy pinned to its commit fetched its base at that commit too, and a policy's revision was
    used for the reward adapter's repo: both failed (RevisionNotFound). The base comes at the revision
    adapter_config.json names (PEFT's rule), the reward adapter at its own main (TRL passes only the token)."""
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained("org/adapter", revision=ADAPTER_COMMIT)
    assert policy.is_peft_model and "org/base@main/config.json" in hub.requests
    with_reward = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
        "org/base", revision=BASE_COMMIT, peft_config=POLICY, reward_adapter="org/rm")
    assert with_reward.supports_rm_adapter and "org/rm@main/adapter_config.json" in hub.requests
