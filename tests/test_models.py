import pytest
import torch

from helpers import cfg
from dpldm.models import attention_modules, build_autoencoder, build_ldm, latent_shape, preset


@pytest.mark.parametrize("name,latent", [("mnist", (3, 4, 4)), ("cifar10", (3, 16, 16)), ("celeba32", (3, 16, 16))])
def test_ae_presets_shapes(name, latent):
    ae_cfg, _, c, size = preset(name, ae=cfg("ae"), ldm=cfg("ldm"))
    ae = build_autoencoder(ae_cfg, channels=c, image_size=size)
    with torch.no_grad():
        z = ae.encode(torch.zeros(2, c, size, size)).latent_dist.mean
        x = ae.decode(z).sample
    assert tuple(z.shape[1:]) == latent == latent_shape(ae_cfg, image_size=size)
    assert x.shape == (2, c, size, size)


def test_embedded_default_ae_is_32_to_8x8x4():
    ae = build_autoencoder(cfg("ae"), channels=1, image_size=32)
    with torch.no_grad():
        assert ae.encode(torch.zeros(1, 1, 32, 32)).latent_dist.mean.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("name,count,latent", [("mnist", 7, (3, 4, 4)), ("cifar10", 16, (3, 16, 16))])
def test_attention_count_of_paper_presets(name, count, latent):
    _, ldm_cfg, _, _ = preset(name, ae=cfg("ae"), ldm=cfg("ldm"))
    model = build_ldm(ldm_cfg, latent_channels=latent[0], latent_size=latent[1])
    mods = attention_modules(model)
    assert len(mods) == count
    with torch.no_grad():
        out = model(torch.zeros(1, *latent), torch.tensor([10]), torch.tensor([1]))
    assert out.shape == (1, *latent)


def test_attention_numbering_follows_forward_order():
    model = build_ldm(cfg("ldm"), latent_channels=4, latent_size=8)
    mods = attention_modules(model)
    assert [m.index for m in mods] == list(range(1, 8))
    assert mods[2].name == "unet.mid_block.attentions.0"  # after 2 down modules, before the 4 up modules
    visited = []
    hooks = [dict(model.named_modules())[m.name].register_forward_hook(lambda mod, i, o, n=m.name: visited.append(n)) for m in mods]
    with torch.no_grad():
        model(torch.zeros(1, 4, 8, 8), torch.tensor([5]), torch.tensor([0]))
    for h in hooks:
        h.remove()
    assert visited == [m.name for m in mods]
    assert all(m.num_params > 0 for m in mods)


def test_opacus_validator_passes():
    from opacus.validators import ModuleValidator

    model = build_ldm(cfg("ldm"), latent_channels=4, latent_size=8)
    assert ModuleValidator.validate(model, strict=False) == []


def test_checkpoint_roundtrip_identical_outputs(tmp_path):
    from stages.common import save_model
    from dpldm.config import to_dict
    from stages.artifacts import load_ldm

    ldm_cfg = cfg("ldm")
    model = build_ldm(ldm_cfg, latent_channels=4, latent_size=8).eval()
    save_model(tmp_path / "m", state_dict=model.state_dict(), config=to_dict(ldm_cfg), extra={"latent_shape": [4, 8, 8]})
    loaded, _, _ = load_ldm(tmp_path / "m")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded.eval()(x, t, y))
    # a model saved before the training-only key ldm.snr_gamma existed still loads
    old = {k: v for k, v in to_dict(ldm_cfg).items() if k != "snr_gamma"}
    save_model(tmp_path / "old", state_dict=model.state_dict(), config=old, extra={"latent_shape": [4, 8, 8]})
    assert load_ldm(tmp_path / "old")[1].snr_gamma == 0.0


@pytest.mark.parametrize("mult", [1, 2, 8])
def test_ff_mult_sets_the_feed_forward_width_only(mult, tmp_path):
    """ldm.ff_mult = 4 keeps diffusers' own feed-forward width; another width changes each transformer block's
    feed-forward (GEGLU: 2 x mult x C, then back to C) and nothing else, and survives a save and load."""
    from diffusers.models.attention import BasicTransformerBlock
    from stages.common import save_model
    from dpldm.config import to_dict
    from stages.artifacts import load_ldm

    plain = build_ldm(cfg("ldm", ff_mult=4), latent_channels=4, latent_size=8)
    for blk in (m for m in plain.modules() if isinstance(m, BasicTransformerBlock)):  # diffusers' own width
        assert blk.ff.net[0].proj.weight.shape == (8 * blk.dim, blk.dim) and blk.ff.net[2].weight.shape == (blk.dim, 4 * blk.dim)
    other = build_ldm(cfg("ldm", ff_mult=mult), latent_channels=4, latent_size=8)
    a, b = plain.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    changed = {k for k in a if a[k].shape != b[k].shape}
    assert changed and all(".ff.net." in k for k in changed)
    blocks = [m for m in other.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) == len(attention_modules(other)) == 7
    for blk in blocks:
        c = blk.dim
        assert blk.ff.net[0].proj.weight.shape == (2 * mult * c, c) and blk.ff.net[2].weight.shape == (c, mult * c)
    save_model(tmp_path / "m", state_dict=other.state_dict(), config=to_dict(cfg("ldm", ff_mult=mult)),
               extra={"latent_shape": [4, 8, 8]})
    loaded, loaded_cfg, _ = load_ldm(tmp_path / "m")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        assert loaded_cfg.ff_mult == mult and torch.equal(other.eval()(x, t, y), loaded.eval()(x, t, y))
    # a model saved before the key existed has diffusers' width and loads as such
    old = {k: v for k, v in to_dict(cfg("ldm", ff_mult=4)).items() if k != "ff_mult"}
    save_model(tmp_path / "old", state_dict=plain.state_dict(), config=old, extra={"latent_shape": [4, 8, 8]})
    assert load_ldm(tmp_path / "old")[1].ff_mult == 4


def test_checkpoint_of_other_architecture_is_refused(tmp_path):
    from stages.common import save_model
    from dpldm.config import to_dict
    from stages.artifacts import load_ldm

    model = build_ldm(cfg("ldm"), latent_channels=4, latent_size=8)
    save_model(tmp_path / "m", state_dict=model.state_dict(), config=to_dict(cfg("ldm", block_out_channels=(32, 32))),
               extra={"latent_shape": [4, 8, 8]})
    with pytest.raises(RuntimeError, match="does not match the architecture"):
        load_ldm(tmp_path / "m")


@pytest.mark.parametrize("time_path", [False, True])
def test_class_reaches_the_unet_through_the_chosen_paths(time_path):
    """With ``class_time_embedding`` the class embedder's second table is added to the time embedding:
    editing one class's vector changes that class's output only. Without it the table does not exist
    and a single cross-attention token is the only path."""
    torch.manual_seed(0)
    model = build_ldm(cfg("ldm", class_time_embedding=time_path), latent_channels=4, latent_size=8).eval()
    z, t, y = torch.randn(2, 4, 8, 8), torch.tensor([300, 300]), torch.tensor([3, 5])
    assert (model.class_embedder.time_embedding is not None) == time_path
    with torch.no_grad():
        before = model(z, t, y)
        if not time_path:
            assert model.unet.class_embedding is None
            return
        model.class_embedder.time_embedding.weight[3] += 1.0
        after = model(z, t, y)
    assert not torch.allclose(before[0], after[0])  # class 3 moved
    torch.testing.assert_close(before[1], after[1])  # class 5 did not


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_one_token_cross_attention_matches_full_attention(mode):
    """The one-token shortcut against diffusers' SDPA processor on the same weights: outputs bit for bit on one
    thread (label dropout's null class included) and to float rounding on two (where SDPA splits its reductions
    over the threads: `make test-fast` runs without xdist, at two), parameter gradients to rounding, and the
    cross-attention's to_q / to_k gradients exactly zero with the shortcut (the softmax over one key is constant;
    SDPA's fused backward leaves rounding residue there)."""
    import copy

    from diffusers.models.attention_processor import AttnProcessor2_0
    from dpldm.models import OneTokenCrossAttnProcessor

    torch.manual_seed(0)
    fast = build_ldm(cfg("ldm"), latent_channels=4, latent_size=8)
    assert any(isinstance(p, OneTokenCrossAttnProcessor) for p in fast.unet.attn_processors.values())
    full = copy.deepcopy(fast)
    full.unet.set_attn_processor(AttnProcessor2_0())
    for m in (fast, full):
        getattr(m, mode)()
    z, t, y = torch.randn(6, 4, 8, 8), torch.tensor([1, 50, 300, 500, 800, 999]), torch.tensor([0, 3, 5, 9, 10, 10])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            assert torch.equal(fast(z, t, y), full(z, t, y))
    finally:
        torch.set_num_threads(threads)
    out_fast, out_full = fast(z, t, y), full(z, t, y)
    torch.testing.assert_close(out_fast, out_full, rtol=1e-5, atol=1e-6)
    (out_fast ** 2).mean().backward()
    (out_full ** 2).mean().backward()
    grads_full = dict(full.named_parameters())
    checked = 0
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads_full[name].grad, rtol=1e-5, atol=1e-7, msg=name)
        if ".attn2.to_q." in name or ".attn2.to_k." in name:
            assert not p.grad.any() and grads_full[name].grad.abs().max() < 1e-9, name
            checked += 1
    assert checked == 2 * len(attention_modules(fast))  # to_q and to_k weights (no biases) of every module


def test_autoencoder_loss_fp32_is_the_plain_objective_and_bf16_autocasts_only_the_convolutions():
    """pretrain_ae's objective (dpldm.training.autoencoder_loss): at fp32 it is L1 + kl_weight x KL per pixel of the
    posterior sample, bit for bit as written out here; at bf16 the encoder's and decoder's convolutions see bf16 while
    the posterior, the loss and the gradients stay fp32 and close to fp32's; an unresolved precision is refused by name."""
    import dataclasses

    import torch.nn.functional as F

    from dpldm.training import autoencoder_loss

    ae_cfg = dataclasses.replace(cfg("ae"), block_out_channels=(16, 16), norm_num_groups=8, kl_weight=0.01)
    torch.manual_seed(0)
    ae = build_autoencoder(ae_cfg, channels=1, image_size=8)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.manual_seed(1)
    post = ae.encode(x).latent_dist
    recon = ae.decode(post.sample()).sample
    rec_want, kl_want = F.l1_loss(recon, x), post.kl().mean() / x[0].numel()
    torch.manual_seed(1)
    loss, rec, kl = autoencoder_loss(ae, x, ae_cfg, precision="fp32")
    assert torch.equal(rec, rec_want) and torch.equal(kl, kl_want) and torch.equal(loss, rec_want + 0.01 * kl_want)

    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for m in ae.modules() if isinstance(m, torch.nn.Conv2d)]
    grads = {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        ae.zero_grad()
        torch.manual_seed(1)
        loss, rec, kl = autoencoder_loss(ae, x, ae_cfg, precision=precision)
        loss.backward()
        assert set(seen) == {torch.float32 if precision == "fp32" else torch.bfloat16}
        assert loss.dtype == rec.dtype == kl.dtype == torch.float32
        grads[precision] = torch.cat([p.grad.flatten() for p in ae.parameters()])
        assert all(p.grad.dtype == torch.float32 for p in ae.parameters())
        if precision == "bf16":
            assert not torch.equal(rec, rec_want) and abs(rec.item() - rec_want.item()) < 0.02 * rec_want.item()
    for h in hooks:
        h.remove()
    cos = F.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cos > 0.95
    with pytest.raises(ValueError, match="auto"):
        autoencoder_loss(ae, x, ae_cfg, precision="auto")
