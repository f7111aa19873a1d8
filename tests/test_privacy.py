import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule

from helpers import cfg
from dpldm.diffusion import expand_rows, make_scheduler, q_sample
from dpldm.models import attention_modules, build_ldm
from dpldm.privacy import (KAveragedDPOptimizer, KFoldedGradSampleModule, PrivacyConfigError, epsilon_of, plan_dp,
                           select_trainable, validate_plan_inputs)

CFG = cfg("ldm", block_out_channels=(32, 32), class_time_embedding=True)  # both class-embedder tables


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return build_ldm(CFG, latent_channels=4, latent_size=4).to(dtype)


def rows(b, k, seed=0, tile=False, dtype=torch.float32):
    """B examples, K (t, noise) draws each; example-major unless ``tile``."""
    g = torch.Generator().manual_seed(seed)
    z0, y = torch.randn(b, 4, 4, 4, generator=g).to(dtype), torch.arange(b) % 10
    if tile:
        z0, y = z0.repeat(k, 1, 1, 1), y.repeat(k)
    else:
        z0, y = expand_rows(z0, y, k=k)
    t = torch.randint(0, 1000, (b * k,), generator=g)
    noise = torch.randn(z0.shape, generator=g).to(dtype)
    return q_sample(make_scheduler(CFG), z0, noise, t), t, y, noise


def per_row_loss(model, zt, t, y, noise):
    return F.mse_loss(model(zt, t, y), noise, reduction="none").flatten(1).mean(1)


def explicit_clipped_sum(model, names, b, k, clip, seed=0):
    """Reference: per example, autograd of its K-averaged loss, clipped, summed (in the model's dtype)."""
    zt, t, y, noise = rows(b, k, seed, dtype=next(model.parameters()).dtype)
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(b):
        sl = slice(i * k, (i + 1) * k)
        loss = per_row_loss(model, zt[sl], t[sl], y[sl], noise[sl]).mean()
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for n, g in zip(names, grads, strict=False):
            total[n] += factor * g
    return total


def dp_clipped_sum(model, b, k, clip, seed=0, tile=False, folded=False):
    """opacus' clipped per-example sum: K-averaged by the optimizer behind a plain GradSampleModule, or
    (``folded``) by KFoldedGradSampleModule in the hooks, as make_private wires it."""
    gsm = KFoldedGradSampleModule(model, k=k, loss_reduction="mean") if folded else GradSampleModule(model, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = KAveragedDPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                               expected_batch_size=b, noise_multiplicity=1 if folded else k)
    zt, t, y, noise = rows(b, k, seed, tile=tile, dtype=next(model.parameters()).dtype)
    per_row_loss(gsm, zt, t, y, noise).mean().backward()
    if folded:  # one gradient per example leaves the hooks: no per-row gradient was stored
        assert all(p.grad_sample.shape[0] == b for p in params)
    opt.clip_and_accumulate()
    return {n: p.summed_grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_clipped_sums(got, want, names):
    """float64 sums from opacus and from explicit autograd: equal up to summation order."""
    assert set(got) == set(names)
    for n in names:
        assert got[n].dtype == torch.float64
        torch.testing.assert_close(got[n], want[n], rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("folded", [False, True], ids=["optimizer-averaged", "folded-in-hooks"])
@pytest.mark.parametrize("mode,k", [("attention", 1), ("attention", 3), ("full", 3)])
def test_per_example_clipped_gradients_match_explicit_autograd(mode, k, folded):
    """``full`` also trains ResNet convolutions and GroupNorms: the folded module's per-row-then-summed path."""
    model = tiny_model(dtype=torch.float64)  # float64: the two sums differ only by summation order
    names = select_trainable(model, mode=mode, layers=(2, 5), train_embedder=True).names
    ref_model = copy.deepcopy(model)
    clip = 1e-3  # small enough that every example is clipped: norms must be per example, after K-averaging
    got = dp_clipped_sum(model, b=4, k=k, clip=clip, folded=folded)
    want = explicit_clipped_sum(ref_model, names, b=4, k=k, clip=clip)
    assert_same_clipped_sums(got, want, names)


@pytest.mark.parametrize("folded", [False, True], ids=["optimizer-averaged", "folded-in-hooks"])
def test_tiled_rows_would_break_the_equivalence(folded):
    """The test above can fail: tiling (repeat) instead of example-major rows mixes examples."""
    model = tiny_model()
    names = select_trainable(model, mode="attention", layers=(1, 7), train_embedder=True).names
    ref_model = copy.deepcopy(model)
    got = dp_clipped_sum(model, b=4, k=3, clip=1e-3, tile=True, folded=folded)
    want = explicit_clipped_sum(ref_model, names, b=4, k=3, clip=1e-3)
    assert any(not torch.allclose(got[n], want[n], rtol=1e-3, atol=1e-9) for n in names)


class Scale(torch.nn.Module):
    """A layer opacus has no sampler for: its per-row gradients come from functorch."""

    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, n, dtype=torch.float64))

    def forward(self, x):
        return x * self.w


def test_folded_module_averages_layers_without_a_sampler():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5).double(), Scale(5), torch.nn.Linear(5, 1).double())
    b, k = 4, 3
    x, target = torch.randn(b * k, 3, dtype=torch.float64), torch.randn(b * k, 1, dtype=torch.float64)
    ref = copy.deepcopy(model)
    gsm = KFoldedGradSampleModule(model, k=k, loss_reduction="mean")
    F.mse_loss(gsm(x), target, reduction="none").mean().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert p.grad_sample.shape == (b, *p.shape), name
        for i in range(b):  # example i's gradient: autograd of the mean of its K rows' losses
            sl = slice(i * k, (i + 1) * k)
            want, = torch.autograd.grad(F.mse_loss(ref(x[sl]), target[sl]), [p_ref])
            torch.testing.assert_close(p.grad_sample[i], want, rtol=1e-9, atol=1e-12, msg=name)


def test_folded_module_refuses_rows_that_are_not_k_per_example():
    model = torch.nn.Linear(3, 1)
    gsm = KFoldedGradSampleModule(model, k=3, loss_reduction="mean")
    with pytest.raises(RuntimeError, match="not a multiple of K = 3"):
        gsm(torch.randn(7, 3)).mean().backward()


def test_dp_step_without_noise_or_clipping_equals_plain_step():
    model_dp, model_plain = tiny_model(), tiny_model()
    for m in (model_dp, model_plain):
        select_trainable(m, mode="attention", layers=(1, 7), train_embedder=True)
    gsm = GradSampleModule(model_dp, loss_reduction="mean")
    p_dp = [p for p in model_dp.parameters() if p.requires_grad]
    p_plain = [p for p in model_plain.parameters() if p.requires_grad]
    opt_dp = KAveragedDPOptimizer(torch.optim.SGD(p_dp, lr=10.0), noise_multiplier=0.0, max_grad_norm=1e6,
                                  expected_batch_size=5, noise_multiplicity=2)
    opt_plain = torch.optim.SGD(p_plain, lr=10.0)  # SGD: Adam's first step hides gradient errors
    zt, t, y, noise = rows(5, 2)
    per_row_loss(gsm, zt, t, y, noise).mean().backward()
    opt_dp.step()
    per_row_loss(model_plain, zt, t, y, noise).mean().backward()
    opt_plain.step()
    for a, b in zip(model_dp.state_dict().values(), model_plain.state_dict().values(), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_empty_poisson_batch_takes_a_noise_only_step():
    model = tiny_model()
    select_trainable(model, mode="attention", layers=(1, 1), train_embedder=False)
    GradSampleModule(model, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = KAveragedDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                               expected_batch_size=4, noise_multiplicity=3)
    for p in params:
        p.grad_sample = torch.zeros(0, *p.shape)
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params, strict=False))


def test_selection_freezes_everything_else():
    model = tiny_model()
    sel = select_trainable(model, mode="attention", layers=(3, 3), train_embedder=True)
    mid = attention_modules(model)[2]
    names = sel.names
    assert names and all(n.startswith(mid.name + ".") or n.startswith("class_embedder.") for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert [p for p in model.parameters() if p.requires_grad] == list(sel.params)
    assert sel.modules == (mid,) and sel.trainable_params == mid.num_params + sum(
        p.numel() for p in model.class_embedder.parameters())
    assert sel.total_params == sum(p.numel() for p in model.parameters())
    none = select_trainable(model, mode="none", layers=(1, 1), train_embedder=True)
    assert none.names == () and none.trainable_params == 0 and not any(p.requires_grad for p in model.parameters())
    full = select_trainable(model, mode="full", layers=(1, 1), train_embedder=True)
    assert len(full.names) == len(list(model.parameters())) and full.share == 1.0


def test_bad_layer_range_lists_the_modules():
    with pytest.raises(PrivacyConfigError) as err:
        select_trainable(tiny_model(), mode="attention", layers=(5, 9), train_embedder=True)
    msg = str(err.value)
    assert "finetune.layers" in msg and "unet.mid_block.attentions.0" in msg and "7 attention modules" in msg


def test_delta_and_batch_checks_name_the_key():
    with pytest.raises(PrivacyConfigError, match="finetune.delta"):
        validate_plan_inputs(cfg("finetune", delta=1e-3), n=4000)
    with pytest.raises(PrivacyConfigError, match="finetune.batch_size"):
        validate_plan_inputs(cfg("finetune", batch_size=5000), n=4000)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrated_noise_reaches_target_epsilon(accountant):
    ft = cfg("finetune", epsilon=10.0, delta=1e-5, epochs=30, batch_size=250, accountant=accountant)
    plan = plan_dp(ft, n=4000)
    assert plan.sample_rate == 1 / 16 and plan.steps == 480
    eps = epsilon_of(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps, delta=1e-5,
                     accountant=accountant)
    assert 9.8 <= eps <= 10.0
    # less noise would overspend
    assert epsilon_of(noise_multiplier=plan.noise_multiplier * 0.95, sample_rate=plan.sample_rate, steps=plan.steps,
                      delta=1e-5, accountant=accountant) > 10.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_memoized_accounting_equals_a_fresh_opacus_accountant(accountant):
    """The memo is keyed by every number the accountant reads: a history of two phases, its reversal, and
    another delta each give what a fresh opacus accountant gives."""
    from opacus.accountants import PRVAccountant, RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    from dpldm.privacy import accountant_epsilon, noise_multiplier_for

    def fresh(history, delta):
        acc = {"prv": PRVAccountant, "rdp": RDPAccountant}[accountant]()
        acc.history = list(history)
        return acc.get_epsilon(delta=delta)

    history = [(1.1, 1 / 16, 40), (0.9, 1 / 16, 20)]
    acc = {"prv": PRVAccountant, "rdp": RDPAccountant}[accountant]()
    for h, delta in ((history, 1e-5), (history[::-1], 1e-5), (history, 1e-6)):
        acc.history = list(h)
        assert accountant_epsilon(acc, delta=delta, accountant=accountant) == pytest.approx(fresh(h, delta), rel=1e-12)
    assert accountant_epsilon(acc, delta=1e-6, accountant=accountant) != accountant_epsilon(acc, delta=1e-5, accountant=accountant)
    for eps in (4.0, 8.0):
        assert noise_multiplier_for(eps, delta=1e-5, sample_rate=1 / 16, steps=60, accountant=accountant) == pytest.approx(
            get_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=1 / 16, steps=60, accountant=accountant,
                                 epsilon_tolerance=0.01), rel=1e-12)


def test_steps_taken_equal_the_plan_where_opacus_would_round_down():
    """N = 9300, B = 100: q = 1/93 and opacus' loader would yield int(1/q) = 92 batches per epoch. Ours yields
    the plan's 93, and the loop (the stage's own) takes exactly plan.steps optimizer steps."""
    from torch.utils.data import TensorDataset

    from dpldm.privacy import make_private, secret_generator, train_epoch

    n, b = 9300, 100
    ft = cfg("finetune", batch_size=b, physical_batch_size=50, epochs=2, epsilon=10.0, delta=1e-5)
    plan = plan_dp(ft, n=n)
    assert plan.steps_per_epoch == 93 and int(1 / plan.sample_rate) == 92  # the rounding this guards against
    model = torch.nn.Linear(3, 1)
    ds = TensorDataset(torch.randn(n, 3), torch.randn(n, 1))
    pt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.01), ds, plan=plan, max_grad_norm=1.0,
                      noise_multiplicity=1, sampling_generator=secret_generator(), noise_generator=secret_generator())
    assert len(pt.data_loader) == 93
    steps = 0

    def on_step():
        nonlocal steps
        steps += 1

    for _ in range(plan.epochs):
        train_epoch(loader=pt.data_loader, optimizer=pt.optimizer, trainable=list(model.parameters()),
                    loss_fn=lambda x, y: torch.nn.functional.mse_loss(pt.model(x), y), private=True,
                    physical_batch_size=ft.physical_batch_size, on_step=on_step)
    assert steps == plan.steps == 186
    assert sum(s for _, _, s in pt.accountant.history) == plan.steps


def test_secret_generators_differ_and_are_not_the_global_rng():
    from dpldm.privacy import secret_generator

    torch.manual_seed(0)
    a = torch.randn(8, generator=secret_generator())
    torch.manual_seed(0)
    b = torch.randn(8, generator=secret_generator())
    assert not torch.equal(a, b)


@pytest.mark.parametrize("private", [True, False])
def test_finetune_adam_beta1_is_the_optimizers_momentum(private):
    """finetune.adam_beta1 reaches AdamW's first-moment decay, behind opacus' DP optimizer as without DP; the
    second-moment decay stays torch's 0.999. One logical step at beta1 = 0 leaves exp_avg equal to the step's gradient."""
    from dpldm.finetune import Finetuning, plan_finetune

    n = 20
    for beta1 in (0.0, 0.5):
        torch.manual_seed(0)
        model = tiny_model()
        c = cfg("finetune", layers=(1, 7), epochs=1, batch_size=n, physical_batch_size=n, delta=1e-3, adam_beta1=beta1,
                private=private, reproducible_noise=True)
        sel, plan = plan_finetune(model, c, n=n)
        g = torch.Generator().manual_seed(0)
        ft = Finetuning(model, sel, plan, c, CFG, z=torch.randn(n, 4, 4, 4, generator=g),
                        y=torch.randint(0, 10, (n,), generator=g), seed=0)
        assert ft.optimizer.param_groups[0]["betas"] == (beta1, 0.999)
        if beta1 == 0.0:
            grads = {}
            step = ft.optimizer.step

            def recording_step(*a, step=step, sel=sel, grads=grads, **kw):  # the gradient AdamW is handed (clipped, noised)
                out = step(*a, **kw)
                grads.update({id(p): p.grad.clone() for p in sel.params if p.grad is not None})
                return out

            ft.optimizer.step = recording_step
            ft.run_epoch()
            inner = getattr(ft.optimizer, "original_optimizer", ft.optimizer)
            last = [p for p in sel.params if id(p) in grads]
            assert last and all(torch.equal(inner.state[p]["exp_avg"], grads[id(p)]) for p in last)


def test_adambc_without_noise_is_torch_adam_and_subtracts_the_noise_variance_with_a_floor():
    """dpldm.privacy.AdamBC: with noise_var 0 it takes torch Adam's steps; with noise_var phi its second moment
    is max(v_hat - phi, floor * phi), checked against the formula written out over a few steps."""
    from dpldm.privacy import AdamBC

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 5, generator=g) * 1e-3 for _ in range(4)]
    p0 = torch.randn(3, 5, generator=g)
    a, b = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    ref = torch.optim.Adam([a], lr=0.01, betas=(0.5, 0.999))
    bc = AdamBC([b], lr=0.01, betas=(0.5, 0.999), noise_var=0.0, floor=0.3)
    for gr in grads:
        a.grad, b.grad = gr.clone(), gr.clone()
        ref.step()
        bc.step()
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)

    phi, floor, lr, (b1, b2) = 1e-6, 0.3, 0.01, (0.5, 0.999)
    c = p0.clone().requires_grad_()
    opt = AdamBC([c], lr=lr, betas=(b1, b2), noise_var=phi, floor=floor)
    x, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.double), torch.zeros_like(p0, dtype=torch.double)
    floored = 0
    for t, gr in enumerate(grads, 1):
        c.grad = gr.clone()
        opt.step()
        m = b1 * m + (1 - b1) * gr.double()
        v = b2 * v + (1 - b2) * gr.double() ** 2
        v_hat = v / (1 - b2 ** t) - phi
        floored += int((v_hat < floor * phi).sum())
        x -= lr * (m / (1 - b1 ** t)) / (v_hat.clamp(min=floor * phi).sqrt() + 1e-8)
    assert 0 < floored < 4 * p0.numel()  # both branches of the max were taken
    torch.testing.assert_close(c.double(), x, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="floor"):
        AdamBC([c], lr=lr, betas=(b1, b2), noise_var=phi, floor=0.0)


@pytest.mark.parametrize("private", [True, False])
def test_finetune_adam_bc_floor_selects_adambc_with_the_plans_noise_variance_under_dp_only(private):
    """finetune.adam_bc_floor > 0: under DP the optimizer behind opacus' is AdamBC, with noise_var (sigma C / B)^2 from
    the plan (B the expected batch); without DP there is no noise to subtract and it stays AdamW. 0: AdamW."""
    from dpldm.finetune import Finetuning, plan_finetune
    from dpldm.privacy import AdamBC

    n = 20
    for floor in (0.0, 0.5):
        c = cfg("finetune", layers=(1, 7), epochs=1, batch_size=10, physical_batch_size=10, delta=1e-3, clip_norm=0.02,
                adam_bc_floor=floor, private=private, reproducible_noise=True)
        model = tiny_model()
        sel, plan = plan_finetune(model, c, n=n)
        ft = Finetuning(model, sel, plan, c, CFG, z=torch.randn(n, 4, 4, 4), y=torch.randint(0, 10, (n,)), seed=0)
        inner = getattr(ft.optimizer, "original_optimizer", ft.optimizer)
        if private and floor > 0:
            assert isinstance(inner, AdamBC)
            group = inner.param_groups[0]
            assert group["floor"] == 0.5 and group["noise_var"] == pytest.approx((plan.noise_multiplier * 0.02 / 10) ** 2)
            assert ft.optimizer.expected_batch_size == 10
            ft.run_epoch()
            assert all(int(inner.state[p]["step"]) == 2 for p in sel.params)  # one per logical step
        else:
            assert type(inner) is torch.optim.AdamW


@pytest.mark.parametrize("cosine", [False, True])
def test_dp_learning_rate_follows_its_schedule_over_the_plans_logical_steps(cosine):
    """finetune.cosine_decay: the lr of every logical step is lr * (1 + cos(pi s / S)) / 2 over the plan's S steps
    (it depends on the step index only, never on the data); off, it stays constant."""
    import math

    from dpldm.finetune import Finetuning, plan_finetune

    torch.manual_seed(0)
    model = tiny_model()
    n = 40
    c = cfg("finetune", layers=(1, 7), epochs=2, batch_size=10, physical_batch_size=10, delta=1e-3, lr=1e-3,
            cosine_decay=cosine, reproducible_noise=True)
    sel, plan = plan_finetune(model, c, n=n)
    g = torch.Generator().manual_seed(0)
    ft = Finetuning(model, sel, plan, c, CFG, z=torch.randn(n, 4, 4, 4, generator=g), y=torch.randint(0, 10, (n,), generator=g),
                    seed=0)
    used = []
    ema_step = ft.ema.step

    def recording_ema_step(*a, **kw):  # runs once per logical step, right after it: the lr that step was taken with
        used.append(ft.optimizer.param_groups[0]["lr"])
        return ema_step(*a, **kw)

    ft.ema.step = recording_ema_step
    while ft.epoch < ft.epochs:
        ft.run_epoch()
    total = plan.steps
    assert ft.steps == total == len(used) == ft.total_steps
    want = [1e-3 * (0.5 * (1 + math.cos(math.pi * s / total))) if cosine else 1e-3 for s in range(total)]
    assert used == pytest.approx(want, rel=1e-9)
    assert ("lr_sched" in ft.state_dict()) and ((ft.state_dict()["lr_sched"] is not None) == cosine)


def test_dp_finetuning_draws_timesteps_from_its_t_range_only(monkeypatch):
    """finetune.t_range: the DP loss sees timesteps in [lo, hi) only; hi above ldm.num_train_timesteps names the key."""
    import dpldm.diffusion as diffusion
    from dpldm.config import ConfigError
    from dpldm.finetune import Finetuning, plan_finetune

    torch.manual_seed(0)
    model = tiny_model()
    n = 40
    c = cfg("finetune", layers=(1, 7), epochs=1, batch_size=10, physical_batch_size=10, delta=1e-3, noise_multiplicity=2,
            t_range=(100, 300), reproducible_noise=True)
    sel, plan = plan_finetune(model, c, n=n)
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(n, 4, 4, 4, generator=g), torch.randint(0, 10, (n,), generator=g)
    seen, draw = [], diffusion.draw_timesteps
    monkeypatch.setattr(diffusion, "draw_timesteps", lambda *a, **kw: seen.append(draw(*a, **kw)) or seen[-1])
    ft = Finetuning(model, sel, plan, c, CFG, z=z, y=y, seed=0)
    ft.run_epoch()
    t = torch.cat(seen)
    assert len(seen) >= 1 and int(t.min()) >= 100 and int(t.max()) < 300
    with pytest.raises(ConfigError, match="finetune.t_range"):
        Finetuning(tiny_model(), sel, plan, cfg("finetune", t_range=(0, CFG.num_train_timesteps + 1)), CFG, z=z, y=y, seed=0)
