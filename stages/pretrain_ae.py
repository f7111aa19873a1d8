"""Stage pretrain_ae: the KL autoencoder on the *public* train split only.

Also fixes the latent scale factor (1 / std of the public train latents, posterior means), stored
in the model's config so that both encode stages apply the same public constant."""
from __future__ import annotations

import math

import numpy as np
import torch

from dpldm.config import load_section, to_dict
from dpldm.data import images_to_tensor, tensor_to_images
from dpldm.diffusion import resolve_precision
from dpldm.models import build_autoencoder, encode_mean, latent_shape
from dpldm.training import autoencoder_loss, make_adamw
from stages.common import (image_grid, live, progress, read_images, save_model, save_png, setup_runtime,
                           stage_main)

INPUTS = ("public",)
OUTPUTS = ("model", "grid", "live")


def run(params: dict, inputs: dict, outputs: dict) -> dict:
    cfg = load_section(params, "ae")
    device, seed = setup_runtime(params, stage="pretrain_ae")
    train_x, _, meta = read_images(inputs["public"], split="train")
    test_x, test_y, _ = read_images(inputs["public"], split="test")
    c, size = meta["channels"], meta["height"]
    ae = build_autoencoder(cfg, channels=c, image_size=size).to(device)
    precision = resolve_precision(cfg.precision, device)
    print(f"pretrain_ae: precision {cfg.precision}" + (f" -> {precision}" if precision != cfg.precision else "") + f" on {device}",
          flush=True)
    opt = make_adamw(ae.parameters(), lr=cfg.lr)
    x = images_to_tensor(train_x)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.05)
    with live(outputs["live"]) as lv:
        bar = progress(total=total, desc="pretrain_ae")
        step = 0
        for _epoch in range(cfg.epochs):
            ae.train()
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), cfg.batch_size):
                xb = x[perm[i:i + cfg.batch_size]].to(device)
                loss, rec, kl = autoencoder_loss(ae, xb, cfg, precision=precision)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                step += 1
                if step % 20 == 0 or step == total:
                    lv.log_metric("train/recon_loss", float(rec.detach()))
                    lv.log_metric("train/kl", float(kl.detach()))
                    lv.next_step()
        bar.close()
        # held-out public reconstruction quality
        ae.eval()
        with torch.no_grad():
            xt = images_to_tensor(test_x)
            rec = torch.cat([ae.decode(ae.encode(xt[i:i + 500].to(device)).latent_dist.mean).sample.cpu()
                             for i in range(0, len(xt), 500)]).clamp(-1, 1)
        mse = float(((rec - xt) / 2).pow(2).mean())  # images in [0, 1]
        psnr = float(10 * math.log10(1.0 / max(mse, 1e-12)))
        # latent scale factor from public train latents only (DEVELOPERS.md invariant 1)
        z = encode_mean(ae, x, batch_size=500, device=device)
        scale = float(1.0 / z.std())
        metrics = {"test_mse": mse, "test_psnr_db": psnr, "latent_scale_factor": scale,
                   "num_params": sum(p.numel() for p in ae.parameters())}
        for k, v in metrics.items():
            lv.log_metric(k, v, plot=False)
    # rows alternate: 10 originals, then their reconstructions
    m = max(1, min(60, len(test_x)) // 10)
    orig, recon = test_x[:10 * m], tensor_to_images(rec[:10 * m])
    rows = np.stack([orig.reshape(m, 10, *orig.shape[1:]), recon.reshape(m, 10, *orig.shape[1:])], 1).reshape(20 * m, *orig.shape[1:])
    save_png(outputs["grid"], image_grid(rows, np.repeat(np.arange(2 * m), 10), per_class=10, num_classes=2 * m))
    save_model(outputs["model"], state_dict=ae.cpu().state_dict(), config=to_dict(cfg),
               extra={"channels": c, "image_size": size, "latent_shape": list(latent_shape(cfg, image_size=size)),
                      "latent_scale_factor": scale, "class_names": meta["class_names"], "precision": precision})
    return metrics


def main(argv=None) -> None:
    stage_main(run, inputs=INPUTS, outputs=OUTPUTS, argv=argv)


if __name__ == "__main__":
    main()
