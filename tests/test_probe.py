"""The ablation measures (benchmark/probe.py), the MAE token switches and the shared
update budget (scales.with_update_budget)."""

from dataclasses import replace

import pytest
import torch

from conftest import draw_zero_layers
from maediff.benchmark.probe import mae_input_dependence, patch_probe, probe_draws
from maediff.config import get_preset
from maediff.models import build_model
from maediff.scales import with_update_budget


def _model(name="maediff-tiny", seed=0, **mae):
    cfg = get_preset(name)
    if mae:
        cfg = replace(cfg, mae=replace(cfg.mae, **mae))
    torch.manual_seed(seed)
    return draw_zero_layers(build_model(cfg), torch.Generator().manual_seed(seed)).eval()


def _slices(n=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 0.5 + 0.25
    brain = torch.zeros(n, 1, size, size, dtype=torch.bool)
    brain[..., 8:24, 4:28] = True
    return x * brain, brain


def test_probe_draws_are_shared_and_hold_brain():
    a, b = _model(seed=0), _model(seed=1)  # other weights, same configuration
    _, brain = _slices()
    da, db = probe_draws(a, brain, bands=4, draws=2), probe_draws(b, brain, bands=4, draws=2)
    for key in ("t", "k", "slice", "noise", "band"):
        assert torch.equal(da[key], db[key]), key
    assert len(da["t"]) == 3 * 4 * 2
    T = a.cfg.diffusion.timesteps
    for band in range(4):
        t = da["t"][da["band"] == band]
        assert t.min() >= band * T // 4 + 1 and t.max() <= (band + 1) * T // 4
    # every drawn patch holds brain
    held = a.grid.extract(brain.float()).flatten(2).amax(-1) > 0  # (n, K)
    assert bool(held[da["slice"], da["k"]].all())


def test_probe_equals_the_training_loss_at_the_same_draw():
    """With the whole slice as brain and one draw, the probe is the model's own loss
    (Alg. 1, Eq. 9) at that (t, noise, k), halved to image units."""
    model = _model()
    x, _ = _slices(n=1)
    brain = torch.ones_like(x, dtype=torch.bool)
    d = probe_draws(model, brain, bands=1, draws=1)
    got = patch_probe(model, x, brain, bands=1, draws=1)
    with torch.no_grad():
        want = model.loss(x, t=d["t"], noise=d["noise"], k=d["k"]) / 2
    assert got["l1"] == pytest.approx(float(want), rel=1e-5)
    assert got["per_draw"] == [pytest.approx(float(want), rel=1e-5)]


def test_probe_tells_a_better_prediction():
    """A model whose output is the clean image scores 0; the real model scores more."""
    model = _model()
    x, brain = _slices()
    assert patch_probe(model, x, brain)["l1"] > 0.01

    class Oracle(torch.nn.Module):
        mae = None

        def forward(self, x_tilde, t, visible=None, cond=None, num_visible=None, clean=None):
            return self.x0

    oracle = _model("ablation-unet-tiny")
    oracle.net = Oracle()
    from maediff.models.maediff import to_model_range

    # the oracle predicts the clean slice of the draw: feed one slice per call
    out = []
    for i in range(x.shape[0]):
        oracle.net.x0 = to_model_range(x[i : i + 1])
        out.append(patch_probe(oracle, x[i : i + 1], brain[i : i + 1], batch_size=1)["l1"])
    assert max(out) < 1e-6


@pytest.mark.slow  # the branch at every patch position, three models
def test_mae_input_share_is_zero_for_a_branch_that_ignores_the_input():
    model = _model()
    x, _ = _slices(n=4)
    dep = mae_input_dependence(model, x)
    assert 0.0 < dep["input_share"] <= 1.0 and dep["relative_rms"] > 0
    with torch.no_grad():  # tokens carry nothing: the branch adds a fixed map per position
        for lin in (model.net.mae.enc_embed, model.net.mae.dec_embed):
            lin.weight.zero_()
    assert mae_input_dependence(model, x)["input_share"] < 1e-9
    assert mae_input_dependence(_model("ablation-unet-tiny"), x) is None


def _encoder_latents(model, x_tilde, x0, k):
    seen = []
    orig = model.net.mae.forward_encoder

    def capture(tokens, visible, num_visible=None):
        out = orig(tokens, visible, num_visible)
        seen.append(out[-1])
        return out

    model.net.mae.forward_encoder = capture
    with torch.no_grad():
        model.denoise(x_tilde, torch.tensor([500]), k, x0)
    del model.net.mae.forward_encoder
    return seen[0]


@pytest.mark.parametrize("tokens", ["features", "clean"])
def test_clean_tokens_do_not_see_the_noised_patch(tokens):
    """mae.tokens=clean: the encoder's latents are the same whatever is inside the noised
    patch; the paper's feature tokens see it through the convolutions."""
    model = _model(tokens=tokens)
    x, _ = _slices(n=1)
    x0 = x * 2 - 1
    k = torch.tensor([5])
    m = model.patch_masks[k] > 0
    a = torch.where(m, torch.randn(x.shape, generator=torch.Generator().manual_seed(1)), x0)
    b = torch.where(m, torch.randn(x.shape, generator=torch.Generator().manual_seed(2)), x0)
    la, lb = _encoder_latents(model, a, x0, k), _encoder_latents(model, b, x0, k)
    if tokens == "clean":
        assert torch.equal(la, lb)
    else:
        assert (la - lb).abs().max() > 1e-4


def test_token_norm_gives_unit_embeddings():
    model = _model(token_norm=True)
    assert isinstance(model.net.mae.enc_norm, torch.nn.LayerNorm)
    with torch.no_grad():
        tokens = torch.randn(5, 36, model.net.mae.enc_embed.in_features)
        z = model.net.mae.enc_norm(model.net.mae.enc_embed(tokens))
    assert float(z.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-3)
    assert not isinstance(_model().net.mae.enc_norm, torch.nn.LayerNorm)  # the paper: off


@pytest.mark.slow  # end to end: trains and runs whole commands
def test_update_budget_gives_fanogan_as_many_generator_and_encoder_updates(
    tiny_bench, tmp_path, monkeypatch
):
    from maediff.training import trainer
    from maediff.training.data import prepare_training_data

    cfg = with_update_budget(get_preset("fanogan-tiny"), 3)
    assert cfg.train.max_steps == (cfg.fanogan.n_critic + 1) * 3 + 3
    assert with_update_budget(get_preset("dae-tiny"), 3).train.max_steps == 3
    groups = []
    real = trainer._step
    monkeypatch.setattr(trainer, "_step", lambda run, b, g: groups.append(g) or real(run, b, g))
    data = prepare_training_data(cfg, tiny_bench, progress=False)
    trainer.train(cfg, data, tmp_path / "run", device="cpu", progress=False)
    assert groups.count("generator") == 3 and groups.count("encoder") == 3
    assert groups.count("critic") == 3 * cfg.fanogan.n_critic


def test_compare_probes_pairs_runs_by_fold_and_seed(tmp_path):
    """benchmarks/compare_probes.py: differences per seed and per draw, by hand."""
    import importlib.util
    import json
    from pathlib import Path

    def write(folder, run, draws, share=None):
        d = tmp_path / folder / run
        d.mkdir(parents=True)
        rec = {"probe": {"l1": sum(draws) / len(draws), "per_draw": draws}}
        if share is not None:
            rec["mae"] = {"input_share": share}
        (d / "probe.json").write_text(json.dumps(rec))

    write("ref", "fold0-seed0", [0.10, 0.20])
    write("ref", "fold0-seed1", [0.30, 0.30])
    write("var", "fold0-seed0", [0.12, 0.20], share=0.1)
    write("var", "fold0-seed1", [0.26, 0.30], share=0.3)
    write("var", "fold0-seed2", [9.0, 9.0], share=0.5)  # no reference run: left out
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_probes.py"
    spec = importlib.util.spec_from_file_location("compare_probes", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (row,) = mod.compare(tmp_path / "ref", {"v": tmp_path / "var"})
    assert row["runs"] == ["fold0-seed0", "fold0-seed1"]
    assert row["diff_mean"] == pytest.approx((0.01 - 0.02) / 2)  # +0.01, -0.02
    assert row["draw_diff"] == pytest.approx((0.02 + 0 - 0.04 + 0) / 4)
    assert row["input_share"] == pytest.approx(0.2)
