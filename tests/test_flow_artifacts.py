"""What the Prefect UI shows: the scores artifact is rounded, stamped, compares with real data, and
shows the sample grid inline only when the samples may leave the private side."""
import dataclasses

from dpldm.ledger import Ledger
from pipeline.flow import scores_markdown

LEDGER = Ledger(dp_release=True, release="DP release (epsilon 10, delta 1e-05)", private=True, noise_source="secret",
                mode="attention", layers=[1, 7], train_embedder=True, selected_attention_modules=[], trainable_params=1,
                total_params=2, trainable_share=0.5, N=4000, K=1, expected_batch_size=250, physical_batch_size=250, epochs=20,
                clip_norm=0.01, accountant="prv", delta=1e-5, target_epsilon=10.0, noise_multiplier=0.875,
                sample_rate=0.0625, epsilon_spent=9.99512345, steps=320, attempt=1, epsilon_spent_all_attempts=9.99512345)
SCORES = {"cnn_accuracy": 0.8076666666666666, "cnn_accuracy_std": 0.009392668535736877, "mlp_accuracy": 0.73,
          "fid_domain": 201.94317282644602, "kid_domain_mean": 97.52057662963867, "kid_domain_std": 4.776121479564893,
          "release": "DP release (epsilon 10, delta 1e-05)"}
REFERENCE = {"real_cnn_accuracy": 0.9596666666666667, "real_cnn_accuracy_std": 0.006798692684790386, "real_mlp_accuracy": 0.932}


def test_scores_are_rounded_stamped_and_beside_the_real_reference():
    md = scores_markdown(SCORES, REFERENCE, LEDGER, b"\x89PNG fake")
    assert "DP release (epsilon 10" in md and "NOT A DP RELEASE" not in md and "epsilon spent: 9.995" in md
    assert "80.8% (std 0.9) | 96.0% (std 0.7)" in md and "73.0% | 93.2%" in md
    assert "201.9 |" in md and "97.5 (std 4.8)" in md
    assert "201.943" not in md and "0.8076" not in md
    assert "data:image/png;base64," in md and "file://" not in md


def test_samples_of_a_non_private_model_are_not_shown():
    led = dataclasses.replace(LEDGER, dp_release=False, private=False, release="not a DP release: non-private fine-tuning")
    md = scores_markdown(SCORES, REFERENCE, led, b"\x89PNG fake")
    assert "NOT A DP RELEASE" in md and "data:image" not in md and "withheld" in md


def test_flow_overrides_leave_no_trace_in_params_yaml(tmp_path):
    import pytest
    import yaml

    from pipeline.flow import overridden_params

    text = "# a comment users wrote\nfinetune:\n  epsilon: 10   # kept\n  layers: [1, 7]\n"
    (tmp_path / "params.yaml").write_text(text)
    with overridden_params(str(tmp_path), {"finetune.epsilon": 5}):
        assert yaml.safe_load((tmp_path / "params.yaml").read_text())["finetune"]["epsilon"] == 5
    assert (tmp_path / "params.yaml").read_text() == text
    with pytest.raises(RuntimeError), overridden_params(str(tmp_path), {"finetune.epsilon": 1}):
        raise RuntimeError("a stage failed")
    assert (tmp_path / "params.yaml").read_text() == text


def test_the_sample_grid_is_shrunk_to_what_the_ui_renders():
    import io

    import numpy as np
    from PIL import Image

    from pipeline.flow import ARTIFACT_PNG_BYTES, fit_png

    rng = np.random.default_rng(0)  # digit-like blocks, 2x upscaled as stages.sample writes them
    cells = (rng.random((340, 408)) > 0.7).astype(np.uint8) * 255
    big = Image.fromarray(np.kron(cells, np.ones((2, 2), dtype=np.uint8))).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, "PNG")
    limit = buf.tell() // 2
    small = fit_png(buf.getvalue(), max_bytes=limit)
    out = Image.open(io.BytesIO(small))
    assert len(small) <= limit and out.mode == "L" and out.size == (408, 340)
    assert np.array_equal(np.asarray(out), cells)  # halved exactly: no pixel invented or smeared
    assert len(fit_png(buf.getvalue())) <= ARTIFACT_PNG_BYTES
