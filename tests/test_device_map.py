"""Models spread by accelerate's `device_map`: blocks offloaded to disk around the edited ones.

On a CPU machine accelerate offers one device and "disk"; an offloaded block's weights are placeholders on the
meta device, loaded by an `AlignDevicesHook` for each forward, exactly as on a GPU machine that offloads to the
CPU. Hooks, keys, targets, the statistics pass and the weight digests must see through it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_alphaedit import AlphaEditModel, EditingArguments
from tests.tiny_models import tiny_causal_lm_with_large_activations, tiny_tokenizer

LAYERS = [1, 2]
REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Albert Einstein", "target_new": "Italian"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, shared_data) -> Path:
    """A tiny Llama (4 blocks, larger activations so the edits move the logits) and a 40-line corpus."""
    root = tmp_path_factory.mktemp("device_map")
    tiny_causal_lm_with_large_activations("llama").save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    lines = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    (root / "corpus.txt").write_text("\n".join([line.strip() for line in lines if line.strip()][:40]),
                                     encoding="utf-8")
    return root


def _load(folder: Path, cache: str, device_map: str | dict[str, str]) -> AlphaEditModel:
    args = EditingArguments(statistics_corpus=str(folder / "corpus.txt"), statistics_samples=20,
                            statistics_cache_dir=str(folder / cache), disable_tqdm=True, v_num_grad_steps=2,
                            v_lr=0.5, layers=LAYERS, nullspace_threshold=1e-2, projection="compute")
    return AlphaEditModel.from_pretrained(str(folder / "tiny"), args, device_map=device_map,
                                          offload_folder=str(folder / f"offload-{cache}"))


def _offloading(**placement: str) -> dict[str, str]:
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{layer}": "cpu" for layer in range(4)})
    device_map.update({f"model.layers.{name.removeprefix('layer')}": where for name, where in placement.items()})
    return device_map


def test_a_model_with_offloaded_blocks_edits_like_one_on_a_single_device(folder):
    single = _load(folder, "cache-single", "cpu")
    spread = _load(folder, "cache-spread", _offloading(layer0="disk", layer3="disk"))
    assert spread.model.model.layers[3].mlp.down_proj.weight.device.type == "meta"  # really offloaded
    single.edit(REQUESTS)
    spread.edit(REQUESTS)
    assert spread.forward_mode == single.forward_mode == "prefix_cache"
    for layer in LAYERS:
        # Statistics collected through the offload hooks, cached under the same exact weight digest.
        torch.testing.assert_close(spread.key_statistics([layer]).sums[layer],
                                   single.key_statistics([layer]).sums[layer], rtol=1e-12, atol=0)
        edited = single.model.model.layers[layer].mlp.down_proj.weight
        torch.testing.assert_close(spread.model.model.layers[layer].mlp.down_proj.weight, edited, rtol=0, atol=0)
    assert sorted(p.name for p in (folder / "cache-spread").iterdir()) == \
        sorted(p.name for p in (folder / "cache-single").iterdir())
    prompt = single.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(spread(**prompt).logits, single(**prompt).logits, rtol=1e-5, atol=1e-5)


def test_an_offloaded_edited_layer_is_refused_naming_it_and_the_fix(folder):
    with pytest.raises(ValueError, match=r"layer 2 \(model\.layers\.2\.mlp\.down_proj\) is offloaded.*"
                                         r"'model\.layers\.2' a GPU in the device_map"):
        _load(folder, "cache-refused", _offloading(layer2="disk"))
