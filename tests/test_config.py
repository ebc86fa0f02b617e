from dataclasses import replace
from pathlib import Path

import pytest

from maediff.config import (
    Config,
    GeometryConfig,
    apply_overrides,
    display_name,
    from_dict,
    get_preset,
    load_config,
    preset_names,
    save_config,
    to_dict,
)
from maediff.models.mae import MAEConfig
from maediff.models.unet import UNetConfig
from maediff.registry import preset_name, presets_of_table, split_preset_name


@pytest.mark.parametrize("name", sorted(preset_names()))
def test_presets_keep_paper_partition_counts(name):
    g = get_preset(name).geometry
    base, scale = split_preset_name(name)
    if base.startswith("anoddpm"):
        assert g.num_patches == 1 and g.patch_size == g.image_size
    elif base == "pddpm-s48":
        assert g.num_patches == 4
    elif scale == "tiny":
        assert (g.num_patches, g.num_cells) == (9, 16)
    else:
        assert (g.num_patches, g.num_cells) == (16, 36), name
    assert g.num_patches == ((g.image_size - g.patch_size + g.stride) // g.stride) ** 2


def test_every_table_row_has_a_preset_at_every_scale():
    for base in (*presets_of_table("1"), *presets_of_table("2")):
        for scale in ("paper", "cpu", "tiny"):
            cfg = get_preset(preset_name(base, scale))
            assert split_preset_name(cfg.name) == (base, scale)
    assert get_preset("paper") == replace(get_preset("maediff"), name="paper")
    assert display_name(get_preset("pddpm-s16-cpu")) == "pDDPM s16"


def test_paper_preset_values():
    c = get_preset("paper")
    assert (
        c.geometry.image_size,
        c.geometry.patch_size,
        c.geometry.stride,
        c.geometry.grid_size,
    ) == (96, 48, 16, 16)
    assert (c.unet.model_channels, c.unet.channel_mult, c.unet.num_res_blocks) == (
        128,
        (1, 2, 2),
        3,
    )
    # Table 1's MAEDiff row is Table 2's "U-Net + Att. + MAE": attention at H/2 and H/4
    assert c.unet.attention_levels == (2, 4) and c.mae.enabled
    assert to_dict(c) == to_dict(replace(get_preset("ablation-unet-att-mae"), name="paper"))
    assert (c.mae.enc_depth, c.mae.enc_dim, c.mae.enc_heads) == (12, 384, 6)
    assert (c.mae.dec_depth, c.mae.dec_dim, c.mae.dec_heads) == (8, 512, 16)
    assert (c.diffusion.schedule, c.diffusion.beta_start, c.diffusion.beta_end) == (
        "linear",
        1e-4,
        2e-2,
    )
    assert (c.diffusion.timesteps, c.diffusion.t_test) == (1000, 500)
    assert (c.train.lr, c.train.batch_size, c.train.optimizer) == (1e-4, 32, "adam")


def test_ablations_are_configs_of_one_model():
    assert not get_preset("ablation-unet").mae.enabled
    assert get_preset("ablation-unet-att").unet.attention_levels == (2, 4)
    assert get_preset("ablation-unet-mae").mae.enabled
    c = get_preset("ablation-unet-att-mae")
    assert c.mae.enabled and c.unet.attention_levels == (2, 4)
    assert get_preset("pddpm-s48").geometry.stride == 48


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(stride=12), "stride s=12"),
        (dict(patch_size=112), "patch_size p=112"),
        (dict(grid_size=6, stride=12, patch_size=48), "grid_size r=6"),
        (dict(stride=32), "do not tile"),
        (dict(image_size=100), "image_size 100"),
    ],
)
def test_invalid_geometry_names_the_value(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        Config(geometry=GeometryConfig(**kwargs))


def test_invalid_heads_and_groups():
    with pytest.raises(ValueError, match="enc_heads=5"):
        Config(mae=MAEConfig(enc_heads=5))
    with pytest.raises(ValueError, match="norm_groups=48"):
        Config(unet=UNetConfig(norm_groups=48))
    with pytest.raises(ValueError, match="attention_levels entry 8"):
        Config(unet=UNetConfig(attention_levels=(8,)))
    with pytest.raises(ValueError, match="H/8"):
        Config(unet=UNetConfig(channel_mult=(1, 2, 2, 2)))


def test_unknown_preset_and_key():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ValueError, match="train.lrr"):
        from_dict({"train": {"lrr": 1.0}})
    with pytest.raises(ValueError, match="train.batch_size"):
        from_dict({"train": {"batch_size": "big"}})


def test_yaml_roundtrip(tmp_path):
    cfg = apply_overrides(
        get_preset("cpu"), ["train.lr=0.002", "unet.attention_levels=[4]", "noise.kind=gaussian"]
    )
    assert (
        cfg.train.lr == 0.002 and cfg.unet.attention_levels == (4,) and cfg.noise.kind == "gaussian"
    )
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    save_config(cfg, tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == cfg


def test_partial_yaml_starts_from_preset(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: cpu\ntrain:\n  lr: 0.01\n")
    cfg = load_config(p)
    assert cfg.name == "cpu" and cfg.train.lr == 0.01 and cfg.geometry.image_size == 48


def test_bad_yaml_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(p)
    with pytest.raises(ValueError, match="bad override"):
        apply_overrides(get_preset("tiny"), ["bad override"])
    with pytest.raises(ValueError, match="unknown config key 'train.nope'"):
        apply_overrides(get_preset("tiny"), ["train.nope=1"])


def test_overrides_read_exponent_floats_without_a_dot():
    from maediff.config import apply_overrides, get_preset

    cfg = apply_overrides(get_preset("tiny"), ["train.lr=1e-3", "train.ema_decay=9.9e-1"])
    assert cfg.train.lr == 1e-3 and cfg.train.ema_decay == 0.99
    with pytest.raises(ValueError, match="must be a number"):
        apply_overrides(get_preset("tiny"), ["train.lr=fast"])


OLD = Path(__file__).resolve().parent / "fixtures" / "v0.4.0"


@pytest.mark.parametrize("name", ["anoddpm-tiny", "dae-cpu", "fanogan-tiny"])
def test_a_0_4_0_config_with_every_section_loads_as_its_own_model(name):
    import yaml

    old = yaml.safe_load((OLD / f"{name}.yaml").read_text())
    assert {"dae", "fanogan", "svae", "autoencoder"} <= set(old)  # every model's sections
    cfg = load_config(OLD / f"{name}.yaml")
    assert cfg.train.lr == 0.002 and cfg.name == name
    # equal to today's preset with the same override, sections of other models dropped
    assert cfg == apply_overrides(get_preset(name), ["train.lr=0.002"])
    kept = to_dict(cfg)
    assert set(kept) < set(old)
    for k, v in kept.items():  # options added since take their defaults (0.4.0 behaviour)
        if not isinstance(v, dict):
            assert old[k] == v, k
            continue
        added = {f: v[f] for f in set(v) - set(old[k])}
        if k == "train" and v["epochs"] is None:  # 0.10.0: no epoch limit is null
            assert old[k]["epochs"] >= 100000 and old[k]["max_steps"] > 0
            v = {**v, "epochs": old[k]["epochs"]}
        since = {
            "inference": {"clamp": False},
            "train": {"val_every_steps": 0, "checkpoint_every_minutes": 0.0},  # off: by epochs
            "diffusion": {"background_weight": 1.0},  # the paper's loss
            "noise": {"zero_mean": False},  # the reference's fields
            "data": {"trained_on": to_dict(Config())["data"]["trained_on"]},  # no record
        }
        assert added == since.get(k, {}), k
        assert {f: x for f, x in v.items() if f not in added} == old[k], k


@pytest.mark.parametrize("name", sorted(preset_names()))
def test_every_preset_saves_and_loads_to_itself(name, tmp_path):
    cfg = get_preset(name)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_changing_the_model_by_override_gives_its_sections():
    cfg = apply_overrides(get_preset("maediff-tiny"), ["model=dae", "dae.noise_std=0.1"])
    assert cfg.section_names == ("dae",) and cfg.dae.noise_std == 0.1
    assert cfg.geometry == get_preset("maediff-tiny").geometry  # shared sections kept
    with pytest.raises(ValueError, match="unknown config section 'unet.model_channels'"):
        apply_overrides(cfg, ["unet.model_channels=8"])
    with pytest.raises(ValueError, match="unknown config key"):
        from_dict({"model": "dae", "nonsense": {}})


def test_a_model_section_reads_typed_by_its_class():
    from maediff.models.dae import DAEConfig

    cfg = get_preset("dae-tiny")
    assert cfg.section(DAEConfig) is cfg.dae and type(cfg.section(DAEConfig)) is DAEConfig
    assert cfg.holds(DAEConfig) and not cfg.holds(UNetConfig)
    with pytest.raises(
        AttributeError, match=r"no UNetConfig section \(its own sections: \['dae'\]"
    ):
        cfg.section(UNetConfig)
    assert cfg.section("dae") is cfg.dae and cfg.section("unet") is None  # by name


def test_the_scales_are_the_registrys_scale_names():
    from maediff.registry import SCALE_NAMES
    from maediff.scales import SCALES

    assert tuple(SCALES) == SCALE_NAMES
    assert {split_preset_name(preset_name("dae", s)) for s in SCALES} == {
        ("dae", s) for s in SCALE_NAMES
    }


def test_no_epoch_limit_is_a_value_and_old_large_counts_read_as_it(tmp_path):
    """train.epochs: null is "no epoch limit"; up to 0.9.0 a step or time budget lifted
    the limit with 100000 or 1000000 epochs: such a file reads as null (and an old
    benchmark run is then the configuration of today's plan), a count alone stays."""
    cfg = apply_overrides(get_preset("dae-tiny"), ["train.max_steps=5", "train.epochs=null"])
    assert cfg.train.epochs is None and cfg.train.epoch_limit == float("inf")
    with pytest.raises(ValueError, match="needs train.max_steps or train.max_minutes"):
        apply_overrides(get_preset("dae-tiny"), ["train.epochs=null"])
    for count, budget, read in (
        (1000000, "max_minutes: 3", None),
        (100000, "max_steps: 300", None),
    ):
        f = tmp_path / f"{count}.yaml"
        f.write_text(f"model: dae\ntrain:\n  epochs: {count}\n  {budget}\n")
        assert load_config(f).train.epochs is read
    f.write_text("model: dae\ntrain:\n  epochs: 100000\n")  # no other budget: the count holds
    assert load_config(f).train.epochs == 100000
    assert get_preset("dae-cpu").train.epochs is None  # the cpu scale's budget is its steps
