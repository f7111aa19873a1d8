import pytest
import torch

from helpers import cfg
from dpldm.diffusion import SOLVERS, SPACINGS, Sampler, draw_timesteps, eps_loss, expand_rows, make_scheduler, sample_latents


def test_expand_rows_is_example_major():
    x = torch.tensor([10, 20, 30])
    (out,) = expand_rows(x, k=2)
    assert out.tolist() == [10, 10, 20, 20, 30, 30]


def test_official_schedule_is_linear_in_sqrt_beta():
    s = make_scheduler(cfg("ldm"))
    sb = s.betas.sqrt()
    assert torch.allclose(sb[0] ** 2, torch.tensor(0.0015)) and torch.allclose(sb[-1] ** 2, torch.tensor(0.0155))
    d = sb[1:] - sb[:-1]
    assert torch.allclose(d, d.mean().expand_as(d), atol=1e-7)


def test_every_solver_with_a_perfect_denoiser_returns_the_point_mass():
    s = make_scheduler(cfg("ldm"))
    c = torch.tensor([0.7, -1.2, 0.3, 2.0]).view(1, 4, 1, 1)
    ab = s.alphas_cumprod

    def perfect(z, t, y):  # data = point mass at c: eps = (z - sqrt(ab) c) / sqrt(1 - ab)
        a = ab[t].view(-1, 1, 1, 1)
        return (z - a.sqrt() * c) / (1 - a).sqrt()

    runs = [("ddim", 0.0), ("ddim", 1.0), ("dpmpp_2m", 0.0), ("dpmpp_2m_sde", 0.0)]
    assert {solver for solver, _ in runs} == set(SOLVERS)
    for solver, eta in runs:
        for steps in (3, 10):
            for spacing in SPACINGS:
                z = sample_latents(perfect, torch.zeros(3, dtype=torch.long), shape=(4, 1, 1), scheduler=s,
                                   sampler=Sampler(steps=steps, eta=eta, solver=solver, spacing=spacing),
                                   generator=torch.Generator().manual_seed(0))
                assert torch.allclose(z, c.expand(3, -1, -1, -1), atol=1e-4), (solver, eta, steps, spacing)


def test_spacing_places_the_steps_on_the_training_schedule():
    """sample.spacing: the timesteps the network sees, for each placement, against their definitions on [0, T) (diffusers'
    timestep_spacing); trailing starts at the last training timestep, where the sampler's pure noise belongs."""
    s = make_scheduler(cfg("ldm"))
    T, n = s.config.num_train_timesteps, 10

    def seen(spacing):
        calls = []
        sample_latents(lambda z, t, y: calls.append(int(t[0])) or torch.zeros_like(z), torch.zeros(2, dtype=torch.long),
                       shape=(1, 2, 2), scheduler=s, sampler=Sampler(steps=n, eta=0.0, spacing=spacing),
                       generator=torch.Generator().manual_seed(0))
        return calls

    assert seen("leading") == [T // n * i for i in range(n)][::-1]
    assert seen("trailing") == [T - 1 - T // n * i for i in range(n)]
    assert seen("linspace") == [round(T - 1 - (T - 1) * i / (n - 1)) for i in range(n)]
    with pytest.raises(ValueError, match="spacing"):
        seen("uniform")


def test_solvers_take_the_steps_asked_and_the_stochastic_ones_draw_noise():
    """Each solver calls the network once per step; DDIM at eta 1 and the SDE solver depend on the generator's draws
    after the initial noise, DDIM at eta 0 and DPM-Solver++ (ODE) do not; an unknown solver is refused by name."""

    s = make_scheduler(cfg("ldm"))
    net = torch.nn.Conv2d(2, 2, 1)

    def run(solver, eta, steps, seed_after):
        """(latents, timesteps seen): the generator is re-seeded with ``seed_after`` once the initial noise is drawn."""
        g, calls = torch.Generator().manual_seed(0), []

        def model(z, t, y):
            if not calls:
                g.manual_seed(seed_after)
            calls.append(int(t[0]))
            return net(z)

        z = sample_latents(model, torch.zeros(4, dtype=torch.long), shape=(2, 3, 3), scheduler=s,
                           sampler=Sampler(steps=steps, eta=eta, solver=solver), generator=g)
        return z, calls

    with torch.no_grad():
        for solver, eta, stochastic in [("ddim", 0.0, False), ("ddim", 1.0, True), ("dpmpp_2m", 1.0, False),
                                        ("dpmpp_2m_sde", 0.0, True)]:
            za, calls = run(solver, eta, 7, seed_after=1)
            zb, _ = run(solver, eta, 7, seed_after=2)
            assert len(calls) == 7 and calls == sorted(calls, reverse=True), (solver, calls)
            assert torch.equal(za, zb) != stochastic, solver
    with pytest.raises(ValueError, match="euler"):
        Sampler(steps=2, eta=0.0, solver="euler")


def test_guidance_combines_conditional_and_null():
    s = make_scheduler(cfg("ldm"))
    calls = []

    def model(z, t, y):
        calls.append(y.clone())
        return torch.zeros_like(z)

    sample_latents(model, torch.tensor([1, 2]), shape=(1, 1, 1), scheduler=s, sampler=Sampler(steps=2, eta=0.0, guidance_scale=2.0),
                   null_class=10)
    assert calls[0].tolist() == [1, 2, 10, 10]


def test_guidance_needs_a_model_pretrained_with_the_null_class():
    """generate refuses guidance for an LDM pretrained with ldm.label_dropout 0 (its null class never trained),
    naming both keys; with label dropout, or without guidance, it samples."""
    import dataclasses

    from dpldm.config import ConfigError
    from dpldm.sampling import generate

    ldm_cfg = cfg("ldm")
    s = make_scheduler(ldm_cfg)
    model = lambda z, t, y: torch.zeros_like(z)
    ae = type("AE", (), {"decode": lambda self, z: type("Out", (), {"sample": torch.zeros(len(z), 1, 4, 4)})()})()
    run = lambda c, w: generate(model, ae, torch.tensor([0, 1]), sampler=Sampler(steps=2, eta=0.0, guidance_scale=w), batch_size=2,
                                ldm_cfg=c, latent_shape=(1, 2, 2), latent_scale=1.0, scheduler=s, show_progress=False,
                                generator=torch.Generator().manual_seed(0))
    no_null = dataclasses.replace(ldm_cfg, label_dropout=0.0)
    with pytest.raises(ConfigError, match=r"sample.guidance_scale = 1.0 .*ldm.label_dropout = 0"):
        run(no_null, 1.0)
    assert run(no_null, 0.0).shape == (2, 4, 4, 1)
    assert run(dataclasses.replace(ldm_cfg, label_dropout=0.1), 1.0).shape == (2, 4, 4, 1)


def test_eps_loss_k_average_equals_mean_of_rows():
    s = make_scheduler(cfg("ldm"))
    model = lambda z, t, y: z * 0.5
    z0, y = torch.randn(3, 2, 2, 2), torch.tensor([0, 1, 2])
    per_example = eps_loss(model, z0, y, scheduler=s, generator=torch.Generator().manual_seed(0), k=4)
    assert per_example.shape == (3,)


def recording_model():
    """A stand-in network that records the timesteps it is called with."""
    seen = []

    def model(z, t, y):
        seen.append(t.clone())
        return z * 0.5

    return seen, model


def test_min_snr_weights_each_row_before_the_k_average():
    s = make_scheduler(cfg("ldm"))
    seen, model = recording_model()

    z0, y = torch.randn(3, 2, 2, 2), torch.tensor([0, 1, 2])
    plain = eps_loss(model, z0, y, scheduler=s, generator=torch.Generator().manual_seed(1), k=4, snr_gamma=0.0)
    weighted = eps_loss(model, z0, y, scheduler=s, generator=torch.Generator().manual_seed(1), k=4, snr_gamma=1.0)
    assert torch.equal(seen[0], seen[1])  # same (t, eps) draws
    # the rows again, unweighted, one by one
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (12,), generator=g)
    noise = torch.randn((12, 2, 2, 2), generator=g)
    zr = z0.repeat_interleave(4, 0)
    ab = s.alphas_cumprod[t]
    zt = ab.sqrt().view(-1, 1, 1, 1) * zr + (1 - ab).sqrt().view(-1, 1, 1, 1) * noise
    rows = ((zt * 0.5 - noise) ** 2).flatten(1).mean(1)
    snr = ab / (1 - ab)
    w = torch.minimum(snr, torch.tensor(1.0)) / snr
    assert torch.allclose(plain, rows.view(3, 4).mean(1), atol=1e-6)
    assert torch.allclose(weighted, (rows * w).view(3, 4).mean(1), atol=1e-6)
    assert (w < 1).any() and (w == 1).any()  # both regimes drawn: the test can tell weighted from plain
    assert not torch.allclose(plain, weighted)


def test_ema_is_the_running_mean_then_reaches_the_configured_decay():
    from dpldm.training import make_ema

    p = torch.nn.Parameter(torch.zeros(3))
    ema = make_ema([p], 0.9)
    iterates = [torch.full((3,), float(v)) for v in (4.0, -2.0, 7.0, 1.0, 3.0, 5.0, -1.0, 2.0, 6.0, 0.0)]
    for i, v in enumerate(iterates):  # the first 1 / (1 - 0.9) = 10 steps: the exact mean of the iterates
        p.data.copy_(v)
        ema.step([p])
        assert torch.allclose(ema.shadow_params[0], torch.stack(iterates[: i + 1]).mean(0), atol=1e-6)
    assert ema.get_decay(11) == 0.9 and ema.get_decay(10_000) == 0.9  # then the configured decay, never a lower cap
    before = ema.shadow_params[0].clone()
    p.data.fill_(10.0)
    ema.step([p])
    assert torch.allclose(ema.shadow_params[0], 0.9 * before + 0.1 * 10.0)


def test_fused_adamw_makes_the_per_tensor_adamw_update():
    """dpldm.training.make_adamw (torch's fused kernel) takes the steps torch's default per-tensor AdamW takes, up to
    float rounding, with weight decay and a changing lr; its state dict loads into a fresh one (resume)."""
    from dpldm.training import make_adamw

    torch.manual_seed(0)
    init = [torch.randn(5, 3), torch.randn(7)]
    runs = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make_adamw(params, lr=1e-2, weight_decay=0.1) if fused else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1,
                                                                                             foreach=False)
        g = torch.Generator().manual_seed(1)
        for step in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.param_groups[0]["lr"] = 1e-2 / (1 + step)
            opt.step()
        runs[fused] = (params, opt)
    assert runs[True][1].defaults["fused"] and not runs[False][1].defaults["fused"]
    for a, b, p0 in zip(runs[True][0], runs[False][0], init, strict=True):
        assert not torch.equal(a, p0) and torch.allclose(a, b, atol=1e-6)
    fresh = make_adamw([torch.nn.Parameter(t.clone()) for t in init], lr=1e-2, weight_decay=0.1)
    fresh.load_state_dict(runs[True][1].state_dict())
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], runs[True][1].state_dict()["state"][0]["exp_avg"])


def test_bf16_sampling_runs_the_network_in_bf16_and_stays_close_to_fp32():
    """sample.precision bf16: the network sees bf16 autocast, the returned latents are fp32 and close to the fp32 path's
    (same noise draws); fp32 never autocasts; an unknown precision is refused by name."""

    s = make_scheduler(cfg("ldm"))
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 2, 1)
    seen = []

    def model(z, t, y):
        out = net(z)
        seen.append(out.dtype)
        return out

    runs = {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        runs[precision] = sample_latents(model, torch.zeros(8, dtype=torch.long), shape=(2, 3, 3), scheduler=s,
                                         sampler=Sampler(steps=5, eta=1.0, precision=precision),
                                         generator=torch.Generator().manual_seed(0))
        assert set(seen) == {torch.float32 if precision == "fp32" else torch.bfloat16}
    assert runs["bf16"].dtype == torch.float32
    assert not torch.equal(runs["bf16"], runs["fp32"])
    assert torch.allclose(runs["bf16"], runs["fp32"], atol=0.05 * runs["fp32"].abs().max().item())
    with pytest.raises(ValueError, match="fp16"):
        Sampler(steps=1, eta=1.0, precision="fp16")


def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    """sample.precision auto: bf16 where dpldm.diffusion.native_bf16 says so, fp32 elsewhere; fp32 and bf16 stay as
    given; an unknown value is refused by name. A CPU whose oneDNN is capped below bf16, or that lacks AVX512-BF16 and
    AMX, is not native."""
    import dpldm.diffusion as diffusion

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(diffusion, "native_bf16", lambda device, native=native: native)
        assert diffusion.resolve_precision("auto", "cpu") == expected
        assert diffusion.resolve_precision("fp32", "cpu") == "fp32" and diffusion.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        diffusion.resolve_precision("fp16", "cpu")
    monkeypatch.undo()
    probes = {"mkldnn": True, "avx512_bf16": True, "amx": False}
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: probes["mkldnn"], raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: probes["avx512_bf16"], raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: probes["amx"], raising=False)
    assert diffusion.native_bf16("cpu")
    probes["mkldnn"] = False  # oneDNN capped (ONEDNN_MAX_CPU_ISA=AVX2): emulated, not native
    assert not diffusion.native_bf16("cpu")
    probes.update(mkldnn=True, avx512_bf16=False)  # AVX-512 without its bf16 instructions, no AMX
    assert not diffusion.native_bf16("cpu")
    probes["amx"] = True
    assert diffusion.native_bf16("cpu")
    assert not diffusion.native_bf16("meta")


def test_generate_decodes_under_bf16_only_when_precision_resolves_to_bf16(monkeypatch):
    """generate: with precision bf16 (or auto on a native-bf16 device) the UNet and the AE decoder both run under bf16
    autocast and the images come out as with fp32 up to rounding; with fp32 nothing autocasts."""
    import dpldm.diffusion as diffusion
    from dpldm.sampling import generate

    ldm_cfg = cfg("ldm")
    s = make_scheduler(ldm_cfg)
    torch.manual_seed(0)
    net, dec = torch.nn.Conv2d(1, 1, 1), torch.nn.Conv2d(1, 1, 3, padding=1)
    seen = {"net": [], "dec": []}

    def model(z, t, y):
        out = net(z)
        seen["net"].append(out.dtype)
        return out

    def decode(z):
        out = dec(torch.nn.functional.interpolate(z, scale_factor=2))
        seen["dec"].append(out.dtype)
        return type("Out", (), {"sample": torch.tanh(out)})()

    ae = type("AE", (), {"decode": staticmethod(decode)})()
    run = lambda precision: generate(model, ae, torch.arange(6) % 3, sampler=Sampler(steps=3, eta=1.0, precision=precision),
                                     batch_size=4, ldm_cfg=ldm_cfg, latent_shape=(1, 4, 4), latent_scale=0.5, scheduler=s,
                                     show_progress=False, generator=torch.Generator().manual_seed(0))
    images = {}
    for precision, native in (("fp32", True), ("bf16", False), ("auto", True), ("auto", False)):
        monkeypatch.setattr(diffusion, "native_bf16", lambda device, native=native: native)
        seen["net"].clear(), seen["dec"].clear()
        images[precision, native] = run(precision)
        want = torch.bfloat16 if precision == "bf16" or (precision == "auto" and native) else torch.float32
        assert set(seen["net"]) == {want} and set(seen["dec"]) == {want} and len(seen["dec"]) == 2
    assert images["fp32", True].dtype == images["bf16", False].dtype == "uint8" and images["fp32", True].shape == (6, 8, 8, 1)
    assert (images["auto", True] == images["bf16", False]).all() and (images["auto", False] == images["fp32", True]).all()
    diff = abs(images["bf16", False].astype(int) - images["fp32", True].astype(int))
    assert 0 < diff.max() <= 8


def test_stratified_timesteps_put_one_row_of_each_example_in_each_stratum_uniformly():
    g = torch.Generator().manual_seed(0)
    b, k, T = 20000, 2, 1000
    t = draw_timesteps(b, k, num_train_timesteps=T, generator=g, stratified=True)
    assert t.dtype == torch.long and t.shape == (b * k,)
    rows = t.view(b, k)  # example-major
    assert torch.equal(rows // (T // k), torch.arange(k).expand(b, k))  # row j of every example in stratum j
    # uniform within each stratum: every timestep drawn, the counts' chi-square within 6 sd of its T/K - 1 dof
    for j in range(k):
        counts = torch.bincount(rows[:, j] - j * T // k, minlength=T // k).double()
        e, dof = b / (T // k), T // k - 1
        chi2 = float(((counts - e) ** 2 / e).sum())
        assert counts.shape == (T // k,) and counts.min() > 0 and abs(chi2 - dof) < 6 * (2 * dof) ** 0.5, chi2
    # unbiased, with less variance: the per-example mean of t keeps the uniform mean; its variance is 1/K^2 of
    # the uniform draws' (T^2 / (12 K)), as the K rows are independent and each spans a stratum of width T / K
    uni = draw_timesteps(b, k, num_train_timesteps=T, generator=g).view(b, k).double().mean(1)
    strat = rows.double().mean(1)
    assert abs(strat.mean() - (T - 1) / 2) < 3 and abs(uni.mean() - (T - 1) / 2) < 6
    assert strat.var() < 0.6 * uni.var() / k
    # three strata that do not divide T; K = 1 is uniform over all of [0, T)
    t3 = draw_timesteps(3000, 3, num_train_timesteps=1000, generator=g, stratified=True).view(3000, 3)
    assert t3.min() >= 0 and t3.max() <= 999 and bool((t3[:, 1:] >= t3[:, :-1]).all())  # strata share boundary integers
    for j, (lo, hi) in enumerate([(0, 334), (333, 667), (666, 1000)]):  # [floor(jT/K), ceil((j+1)T/K))
        assert lo <= int(t3[:, j].min()) and int(t3[:, j].max()) < hi
    t1 = draw_timesteps(5000, 1, num_train_timesteps=1000, generator=g, stratified=True)
    assert t1.min() < 10 and t1.max() > 989


def test_eps_loss_uses_stratified_timesteps_per_example():
    s = make_scheduler(cfg("ldm"))
    seen, model = recording_model()

    z0, y = torch.randn(50, 2, 2, 2), torch.arange(50) % 10
    eps_loss(model, z0, y, scheduler=s, generator=torch.Generator().manual_seed(2), k=2, stratified=True)
    eps_loss(model, z0, y, scheduler=s, generator=torch.Generator().manual_seed(2), k=2)
    strat, plain = (x.view(50, 2) for x in seen)
    assert bool((strat[:, 0] < 500).all() and (strat[:, 1] >= 500).all())
    assert not bool((plain[:, 0] < 500).all() and (plain[:, 1] >= 500).all())


def test_timesteps_stay_in_t_range_and_cover_it():
    g = torch.Generator().manual_seed(3)
    for stratified in (False, True):
        t = draw_timesteps(30000, 2, num_train_timesteps=1000, generator=g, stratified=stratified, t_range=(200, 800))
        assert int(t.min()) == 200 and int(t.max()) == 799  # every end reached, nothing outside [lo, hi)
        assert torch.bincount(t - 200, minlength=600).min() > 0
        if stratified:  # one row of each example in each half of [200, 800)
            rows = t.view(30000, 2)
            assert bool((rows[:, 0] < 500).all() and (rows[:, 1] >= 500).all())
    # the default range is all of [0, T): the same draws as no range at all
    a = draw_timesteps(100, 2, num_train_timesteps=1000, generator=torch.Generator().manual_seed(4), stratified=True)
    b = draw_timesteps(100, 2, num_train_timesteps=1000, generator=torch.Generator().manual_seed(4), stratified=True,
                       t_range=(0, 1000))
    assert torch.equal(a, b)
    for bad in [(500, 500), (-1, 10), (0, 1001)]:
        with pytest.raises(ValueError, match="t_range"):
            draw_timesteps(4, 1, num_train_timesteps=1000, t_range=bad)


def test_eps_loss_draws_its_timesteps_from_t_range():
    s = make_scheduler(cfg("ldm"))
    seen, model = recording_model()
    eps_loss(model, torch.randn(64, 2, 2, 2), torch.arange(64) % 10, scheduler=s, generator=torch.Generator().manual_seed(5),
             k=2, stratified=True, t_range=(100, 300))
    assert int(seen[0].min()) >= 100 and int(seen[0].max()) < 300


def test_sampler_of_the_sample_section_carries_each_of_its_keys():
    """Sampler.of: every sampler setting comes from the sample section's key of the same name (params.yaml is the one
    source of its values), and "auto" precision resolves per device only through Sampler.on."""
    for key, value in (("steps", 7), ("eta", 0.25), ("guidance_scale", 0.5), ("precision", "bf16"), ("solver", "dpmpp_2m"),
                       ("spacing", "trailing")):
        assert getattr(Sampler.of(cfg("sample", **{key: value})), key) == value, key
    auto = Sampler.of(cfg("sample", precision="auto"))
    assert auto.precision == "auto" and auto.on("meta").precision == "fp32"
