"""finetune.mode: lora -- peft adapters in the chosen attention modules, trained with opacus."""
import copy

import pytest
import torch

from helpers import cfg
from test_privacy import CFG, assert_same_clipped_sums, dp_clipped_sum, explicit_clipped_sum, tiny_model
from dpldm.config import LoraConfig
from dpldm.finetune import Finetuning, new_ledger, plan_finetune
from dpldm.models import add_lora, attention_modules, build_ldm, merge_lora
from dpldm.privacy import select_trainable


def lora_cfg(**over):
    return cfg("finetune", mode="lora", layers=(2, 5), **over)


def _randomize_b(model):
    """peft starts B at zero (so A gets no gradient at first); a trained adapter has both non-zero."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("targets", [("to_q", "to_k", "to_v", "to_out"), ("to_v", "ff", "proj_in", "proj_out")])
def test_adapters_only_in_the_selected_modules_and_targets(targets):
    model = tiny_model()
    sel = select_trainable(model, mode="lora", layers=(2, 5), train_embedder=True, lora=LoraConfig(rank=4, alpha=4.0, targets=targets))
    chosen = attention_modules(model)[1:5]
    adapters = [n for n in sel.names if ".lora_" in n]
    assert set(sel.names) - set(adapters) == {n for n, _ in model.named_parameters() if n.startswith("class_embedder.")}
    assert all(any(n.startswith(m.name + ".") for m in chosen) for n in adapters)
    attn_targets = [t for t in targets if t.startswith("to_")]
    per_module = 2 * len(attn_targets) + ("ff" in targets) * 2 + ("proj_in" in targets) + ("proj_out" in targets)
    assert len(adapters) == 2 * per_module * len(chosen)  # A and B of each adapted layer
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(sel.names)


@pytest.mark.parametrize("k", [1, 3])
def test_per_example_clipped_adapter_gradients_match_explicit_autograd(k):
    model = tiny_model(dtype=torch.float64)  # float64: the two sums differ only by summation order
    sel = select_trainable(model, mode="lora", layers=(2, 5), train_embedder=True, lora=lora_cfg().lora)
    _randomize_b(model)
    ref = copy.deepcopy(model)
    got = dp_clipped_sum(model, b=4, k=k, clip=1e-3)
    want = explicit_clipped_sum(ref, sel.names, b=4, k=k, clip=1e-3)
    assert_same_clipped_sums(got, want, sel.names)


def test_dp_lora_run_keeps_the_base_changes_every_adapter_and_merges_exactly():
    torch.manual_seed(0)
    model = build_ldm(CFG, latent_channels=4, latent_size=4)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    n = 60
    c = lora_cfg(epochs=1, batch_size=20, physical_batch_size=20, delta=1e-3, reproducible_noise=True)
    sel, plan = plan_finetune(model, c, n=n)
    ledger = new_ledger(c, sel, plan, n=n)
    assert ledger.lora == {"rank": 4, "alpha": 4.0, "targets": ["to_q", "to_k", "to_v", "to_out"]}
    assert ledger.adapter_params and set(ledger.adapter_params) == {n for n in sel.names if ".lora_" in n}
    assert ledger.trainable_params == sel.trainable_params < 0.1 * ledger.total_params
    g = torch.Generator().manual_seed(0)
    ft = Finetuning(model, sel, plan, c, CFG, z=torch.randn(n, 4, 4, 4, generator=g), y=torch.randint(0, 10, (n,), generator=g),
                    seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    while ft.epoch < ft.epochs:
        ft.run_epoch()
    assert ft.steps == plan.steps
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert not torch.equal(p, before[n]), f"adapter {n} did not change"
        elif not n.startswith("class_embedder."):
            assert torch.equal(p, base[n.replace(".base_layer", "")]), f"frozen {n} changed"
    ft.ema.copy_to(list(ft.selection.params))  # the weights finish() releases, still as adapters
    z, t, y = torch.randn(3, 4, 4, 4), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        adapted = model(z, t, y)
    adapter = ft.finish()
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(merged) == set(base)  # the plain architecture again: `sample` loads it as any model
    with torch.no_grad():
        torch.testing.assert_close(model(z, t, y), adapted, rtol=1e-4, atol=1e-5)
    # the adapter-only release applied to the base model gives the merged model
    from peft import set_peft_model_state_dict

    again = build_ldm(CFG, latent_channels=4, latent_size=4)
    again.load_state_dict({**base, **{k: v for k, v in merged.items() if k.startswith("class_embedder.")}})
    add_lora(again, list(attention_modules(again)[1:5]), rank=4, alpha=4.0, targets=c.lora.targets)
    set_peft_model_state_dict(again.unet, adapter)
    merge_lora(again)
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, merged[k], rtol=1e-5, atol=1e-6)
    assert sum(v.numel() for v in adapter.values()) < 0.05 * sum(v.numel() for v in base.values())
