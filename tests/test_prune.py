"""``streamkws prune``: magnitude sparsity, physically smaller structured pruning, the margin,
fine-tuning under fixed masks, and that pruned bundles reload, quantize and stream."""

from __future__ import annotations

import argparse
import copy
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from streamkws.audio.chunk import Chunk
from streamkws.bundle import load_bundle, new_bundle
from streamkws.config import Config
from streamkws.daemon import Pipeline
from streamkws.data import ClipCache, load_dataset, speaker_split
from streamkws.errors import StreamKWSError
from streamkws.features import FrontEndConfig, LogMel
from streamkws.models import build_model, count_parameters
from streamkws.models.quant import quantize_dynamic
from streamkws.tools import prune as P

torch.set_num_threads(1)

# tiny_bundle's own split (split seed 0, 30 % held out): the tool finds it in the bundle,
# and these tests measure on it independently.
SPLIT = {"val_fraction": 0.3, "seed": 0}


def conv_linear_weights(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in net.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear)}


def macs(net: nn.Module) -> int:
    return sum(P.count_macs(net, net.n_frames, net.n_mels).values())


def features(n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 98, 40, generator=g) * 3 - 5  # roughly log-Mel range


def validation(bundle, data) -> tuple[np.ndarray, np.ndarray]:
    """The held-out side of ``data``, split independently of the tool's helper."""
    _, val = speaker_split(load_dataset(data, bundle.labels), SPLIT["val_fraction"],
                           SPLIT["seed"])
    x, val = ClipCache().load_all(val)
    feats = LogMel(bundle.frontend)(x)[:, : bundle.frontend.window_frames]
    return feats.astype(np.float32), val.targets()


def clip_accuracy(bundle, feats: np.ndarray, y: np.ndarray) -> float:
    return float((bundle.predict(feats).argmax(1) == y).mean())


# --- magnitude ----------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_reaches_sparsity_and_the_table_adds_up(tiny_bundle, scope: str) -> None:
    result = P.prune_bundle(tiny_bundle, P.PruneConfig(sparsity=0.7, scope=scope))
    weights = conv_linear_weights(result.bundle.model.net)
    assert [r["layer"] for r in result.table] == list(weights)
    for row in result.table:
        w = weights[row["layer"]]
        assert row["parameters"] == w.numel()
        assert row["zeros"] == int((w == 0).sum())
        if scope == "layer":
            assert abs(row["sparsity"] - 0.7) <= 1 / w.numel() + 1e-4
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert sum(r["parameters"] for r in result.table) == total
    assert sum(r["zeros"] for r in result.table) == zeros
    assert abs(zeros / total - 0.7) <= 0.01
    assert result.report["achieved_sparsity"] == round(zeros / total, 4)
    text = P.format_magnitude(result)
    assert f"{total:,}" in text and f"{zeros:,}" in text
    # The largest weights survive: pruning by magnitude, not at random.
    orig = conv_linear_weights(tiny_bundle.model.net)
    for name, w in weights.items():
        if scope == "layer":
            assert orig[name][w != 0].abs().min() >= orig[name][w == 0].abs().max()
    # A plain float bundle: no pruning reparametrisation left in the state dict.
    keys = result.bundle.model.state_dict()
    assert not [k for k in keys if k.endswith(("_orig", "_mask"))]
    assert result.bundle.meta["pruning"]["method"] == "magnitude"


def test_magnitude_cli_writes_a_loadable_bundle(tiny_bundle, tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    out = tmp_path / "sparse.skw"
    args = parser.parse_args(["--model", str(tiny_bundle.path), "--sparsity", "0.5",
                              "--json", "--out", str(out)])
    assert P.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == str(out) and abs(report["achieved_sparsity"] - 0.5) <= 0.01
    loaded = load_bundle(out)
    assert loaded.meta["pruning"]["sparsity"] == 0.5
    assert loaded.meta["name"] == "sparse"
    zeros = sum(int((w == 0).sum()) for w in conv_linear_weights(loaded.model.net).values())
    assert zeros == sum(r["zeros"] for r in report["table"])
    q = quantize_dynamic(loaded.model)
    with torch.inference_mode():
        assert q(features()).shape == (3, len(tiny_bundle.labels))


@pytest.mark.parametrize(("after", "warned"), [(0.31, True), (0.90, False)])
def test_magnitude_warns_when_pruning_ruins_the_model(tiny_bundle, small_data, monkeypatch,
                                                      caplog, after, warned) -> None:
    """At sparsity 0.5 the shipped default falls from 0.93 to 0.31 on its validation
    speakers: such a model is still written (it was asked for) but never in silence."""
    scores = iter([0.93, after])
    monkeypatch.setattr(P, "accuracy", lambda *a: next(scores))
    P.prune_bundle(tiny_bundle, P.PruneConfig(sparsity=0.5, data=small_data, **SPLIT))
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == (["accuracy fell from 0.9300 to 0.3100 at sparsity 0.5: fine-tune "
                     "(--finetune N, with --data and --noise) or prune less"] if warned
                    else [])


def test_finetuning_keeps_pruned_weights_at_zero(tiny_bundle, small_data, data_dir) -> None:
    cfg = dict(sparsity=0.5, data=small_data, noise=data_dir / "noise", **SPLIT)
    plain = P.prune_bundle(tiny_bundle, P.PruneConfig(**cfg))
    tuned = P.prune_bundle(tiny_bundle, P.PruneConfig(**cfg, finetune=1, lr=3e-3))
    ft = tuned.report["finetune"]
    assert ft["epochs"] == 1 and len(ft["history"]) == 1
    assert ft["accuracy_before"] == plain.report["accuracy_pruned"]
    assert ft["accuracy_after"] >= ft["accuracy_before"]
    before = conv_linear_weights(plain.bundle.model.net)
    after = conv_linear_weights(tuned.bundle.model.net)
    for name, w in before.items():
        # Every weight pruned before fine-tuning is still exactly zero.
        assert torch.all(after[name][w == 0] == 0), name
    if ft["best_epoch"] == 1:  # fine-tuning was kept: the surviving weights moved
        assert any(not torch.equal(after[n], before[n]) for n in before)


# --- structured ---------------------------------------------------------------------------


def test_structured_is_physically_smaller_and_runs_everywhere(
    tiny_bundle, small_data, speech_stream, tmp_path
) -> None:
    # margin 1: everything may go, so every layer shrinks to its floor.
    result = P.prune_bundle(tiny_bundle, P.PruneConfig(method="structured", margin=1.0,
                                                       data=small_data, **SPLIT))
    assert result.report["stopped_by"] == "minimum widths"
    before, after = tiny_bundle.model.net, result.bundle.model.net
    assert count_parameters(after) < count_parameters(before)
    assert macs(after) < macs(before)
    widths = after.arch_kwargs["widths"]
    assert widths == [r["after"] for r in result.table] and max(widths) < 16
    assert result.report["macs_after"] == macs(after)
    text = P.format_structured(result)
    assert "stem.0" in text and f"16 -> {widths[0]}" in text
    for row in result.table:
        assert row["pruned"] == row["before"] - row["after"]

    out = tmp_path / "narrow.skw"
    result.bundle.save(out)
    loaded = load_bundle(out)
    assert loaded.meta["arch_kwargs"]["widths"] == widths
    x = features(4)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), result.bundle.model(x), rtol=0, atol=0)
        assert quantize_dynamic(loaded.model)(x).shape == (4, len(loaded.labels))

    pipe = Pipeline(Config(), loaded)
    for i in range(0, len(speech_stream), 1600):
        pipe.process(Chunk(speech_stream[i : i + 1600].astype(np.float32), i))
    assert pipe.inferences > 0


def test_structured_respects_the_margin(small_data) -> None:
    """On a model that really loses accuracy when narrowed (tiny_bundle is too weak to:
    it predicts one class), the search must stop at the margin, not at the floor."""
    bundle = load_bundle("default-float")
    if bundle.meta["arch"] not in P.STRUCTURED_ARCHS:
        pytest.skip(f"the bundled model is a {bundle.meta['arch']}")
    margin = 0.05
    result = P.prune_bundle(bundle, P.PruneConfig(method="structured", margin=margin,
                                                  data=small_data, **SPLIT))
    rep = result.report
    assert rep["stopped_by"] == "margin" and rep["steps"]
    assert rep["parameters_after"] < rep["parameters_before"]
    feats, y = validation(bundle, small_data)
    assert rep["validation_clips"] == len(y)
    base, pruned = clip_accuracy(bundle, feats, y), clip_accuracy(result.bundle, feats, y)
    assert rep["accuracy_unpruned"] == round(base, 4)
    assert rep["accuracy_pruned"] == round(pruned, 4)
    assert base - pruned <= margin + 1e-9
    # Every accepted step stayed within the margin too.
    assert all(s["accuracy"] >= base - margin - 1e-9 for s in rep["steps"])
    assert result.bundle.meta["pruning"]["margin"] == margin
    assert result.bundle.meta["metrics"]["validation"]["accuracy"] == round(pruned, 4)
    # The shipped model's calibrated threshold carries over, marked as not recalibrated.
    assert result.bundle.threshold == bundle.threshold
    assert result.bundle.meta["detect"]["calibration"].startswith("inherited from default-float")


@pytest.mark.parametrize("arch", ["tutorial_cnn", "mobilenetv2"])
def test_structured_other_archs_round_trip(arch: str, small_data, tmp_path) -> None:
    """The whole path for the other supported families, on untrained weights (accuracy is
    chance, so margin 1 and coarse steps: this is about shapes, not quality)."""
    torch.manual_seed(0)
    kw = {"hidden": 32} if arch == "tutorial_cnn" else {"width": 0.5}
    labels = ["yes", "no", "_unknown_", "_silence_"]
    net = build_model(arch, n_classes=4, n_frames=98, n_mels=40, **kw).eval()
    bundle = new_bundle(net, np.full(40, -6.0), np.full(40, 2.0), labels, FrontEndConfig(),
                        arch)
    result = P.prune_bundle(bundle, P.PruneConfig(method="structured", margin=1.0, step=0.5,
                                                  refine=0, data=small_data, **SPLIT))
    assert all(r["after"] < r["before"] for r in result.table)
    assert macs(result.bundle.model.net) < macs(net)
    result.bundle.save(tmp_path / "p.skw")
    loaded = load_bundle(tmp_path / "p.skw")
    x = features(2)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), result.bundle.model(x), rtol=0, atol=0)
        assert quantize_dynamic(loaded.model)(x).shape == (2, 4)


def test_shrinking_with_every_channel_kept_changes_nothing() -> None:
    for arch, kw in (("dscnn", {"channels": 8, "blocks": 2}), ("tutorial_cnn", {"hidden": 16}),
                     ("mobilenetv2", {"width": 0.5})):
        torch.manual_seed(0)
        net = build_model(arch, n_classes=4, n_frames=98, n_mels=40, **kw).eval()
        groups, lists = P.channel_groups(net)
        same = P.shrink(net, {g: torch.arange(P._width(net, grp)) for g, grp in
                              enumerate(groups)}, groups, lists)
        with torch.inference_mode():
            torch.testing.assert_close(same(features()), net(features()))


@pytest.mark.parametrize("arch", ["dscnn", "tutorial_cnn", "mobilenetv2"])
def test_removing_a_constant_channel_is_exact(arch: str) -> None:
    """A channel whose output is constant carries no information: with its mean folded
    into the next layer, removing it must not change the outputs. Checks the slicing of
    every dependent layer and the compensation together."""
    kw = {"dscnn": {"channels": 8, "blocks": 2}, "tutorial_cnn": {"hidden": 16},
          "mobilenetv2": {"width": 0.5}}[arch]
    torch.manual_seed(0)
    net = build_model(arch, n_classes=4, n_frames=98, n_mels=40, **kw)
    with torch.no_grad():  # realistic BN statistics, then a constant channel 1 per group
        net.train()
        net(features(8, seed=5))
    net.eval()
    groups, lists = P.channel_groups(net)
    mods = dict(net.named_modules())
    for group in groups:
        # The last per-channel op before the consumer: zero its scale (BN gamma or, for a
        # linear unit, its weights), so the consumer sees a constant there. A consumer
        # that zero-pads (tutorial_cnn's second conv) sees the constant only inside the
        # padding, which a mean cannot stand in for exactly: that channel is made dead.
        last = group.producers[-1]
        pads = arch == "tutorial_cnn" and group.layer == "features.1"
        with torch.no_grad():
            mods[last].weight[1] = 0
            mods[last].bias[1] = 0.0 if pads else 0.7
    x = features(4, seed=9)
    stats = P.consumer_stats(net, groups, features(2, seed=9).numpy())
    for g, group in enumerate(groups):
        width = P._width(net, group)
        keep = torch.tensor([c for c in range(width) if c != 1])
        smaller = P.shrink(net, {g: keep}, groups, lists, stats)
        assert count_parameters(smaller) < count_parameters(net)
        with torch.inference_mode():
            torch.testing.assert_close(smaller(x), net(x), rtol=1e-4, atol=1e-4,
                                       msg=f"{arch} {group.layer}")
        twin = build_model(arch, **smaller.arch_kwargs)
        twin.load_state_dict(smaller.state_dict(), strict=True)


def test_activation_scores_rank_a_silent_channel_last() -> None:
    torch.manual_seed(0)
    net = build_model("dscnn", n_classes=4, n_frames=98, n_mels=40, channels=8, blocks=1)
    net.eval()
    groups, _ = P.channel_groups(net)
    with torch.no_grad():
        net.blocks[0][1].weight[3] = 0  # block 0's depthwise BN: channel 3 becomes constant
    stats = P.consumer_stats(net, groups, features(2).numpy())
    scores = P.channel_scores(net, groups[0], "activation", stats)
    assert int(scores.argmin()) == 3 and float(scores[3]) < 1e-6


def test_count_macs_by_hand() -> None:
    net = build_model("dscnn", n_classes=4, n_frames=98, n_mels=40, channels=8, blocks=1)
    # Stem: (98 + 8 - 10) / 2 + 1 = 49 frames, (40 + 2 - 4) / 2 + 1 = 20 bins.
    pos = 49 * 20
    want = {"stem.0": pos * 8 * 40, "blocks.0.0": pos * 8 * 9, "blocks.0.3": pos * 8 * 8,
            "head.3": 8 * 4}
    assert P.count_macs(net, 98, 40) == want


# --- errors -------------------------------------------------------------------------------


def test_user_errors(tiny_bundle) -> None:
    with pytest.raises(StreamKWSError, match="sparsity"):
        P.prune_bundle(tiny_bundle, P.PruneConfig(sparsity=1.5))
    with pytest.raises(StreamKWSError, match="--data"):
        P.prune_bundle(tiny_bundle, P.PruneConfig(method="structured"))
    with pytest.raises(StreamKWSError, match="--data"):
        P.prune_bundle(tiny_bundle, P.PruneConfig(finetune=2))
    quantized = copy.copy(tiny_bundle)
    quantized.meta = {**tiny_bundle.meta, "quantization": {"mode": "dynamic"}}
    with pytest.raises(StreamKWSError, match="float"):
        P.prune_bundle(quantized, P.PruneConfig())
    net = build_model("bcresnet", n_classes=4, n_frames=98, n_mels=40)
    bc = new_bundle(net, np.zeros(40), np.ones(40), ["a", "b", "c", "d"], FrontEndConfig(),
                    "bc")
    with pytest.raises(StreamKWSError, match="dscnn, tutorial_cnn, mobilenetv2"):
        P.prune_bundle(bc, P.PruneConfig(method="structured", data=tiny_bundle.path.parent))
    # Magnitude pruning is architecture-independent.
    assert P.prune_bundle(bc, P.PruneConfig(sparsity=0.3)).report["achieved_sparsity"] > 0.29


@pytest.mark.parametrize(("argv", "message"), [
    (["--threads", "-3"], "--threads must be within 0..1024 (got -3)"),
    (["--lr", "-1", "--finetune", "1"], "--lr must be within (0, 1] (got -1.0)"),
    (["--lr", "nan", "--finetune", "1"], "--lr must be within (0, 1] (got nan)"),
])
def test_bad_numbers_are_refused_before_any_pruning(tiny_bundle, small_data, tmp_path,
                                                    argv, message) -> None:
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_bundle.path), "--data", str(small_data),
                              "--out", str(tmp_path / "x.skw"), *argv])
    with pytest.raises(StreamKWSError, match=re.escape(message)):
        P.run(args)
    assert not (tmp_path / "x.skw").exists()


def test_data_without_one_readable_clip_is_named_as_such(tiny_bundle, tmp_path) -> None:
    for i, label in enumerate(["yes", "no", "_unknown_"]):
        (tmp_path / label).mkdir()
        for k in range(3):
            (tmp_path / label / f"{i}{k}abcd_nohash_0.wav").write_bytes(b"RIFF junk")
    with pytest.raises(StreamKWSError, match=f"^{re.escape(str(tmp_path))}: no readable clips$"):
        P.prune_bundle(tiny_bundle, P.PruneConfig(method="structured", data=tmp_path))


def test_pruning_decides_on_the_models_own_validation_speakers_whatever_its_seed(
        tiny_bundle, small_data):
    """The fine-tuning --seed must not pick the split: a model's training speakers would
    then decide and measure the pruning."""
    assert tiny_bundle.split_seed == 0 and tiny_bundle.validation_fraction == 0.3
    own_train, own_val = speaker_split(load_dataset(small_data, tiny_bundle.labels), 0.3, 0)
    for seed in (0, 3):
        d = P.load_prune_data(tiny_bundle, P.PruneConfig(data=small_data, seed=seed), None)
        assert d.summary["validation_speakers"] == len(own_val.speakers())
        assert d.summary["split"].endswith("(split seed 0, the model's own)")
        assert d.summary["validation_clips"] == len(own_val)
    assert not set(own_val.speakers()) & set(own_train.speakers())


def test_pruning_on_training_speakers_only_takes_a_split_of_its_own(tiny_bundle, small_data,
                                                                    tmp_path):
    """The README's workflow: decide on a re-split of the model's training side and keep
    every unheard speaker for the final test."""
    own_train, _ = speaker_split(load_dataset(small_data, tiny_bundle.labels), 0.3, 0)
    train_side = tmp_path / "train_side"
    for it in own_train.items:
        (train_side / it.label).mkdir(parents=True, exist_ok=True)
        (train_side / it.label / it.path.name).symlink_to(it.path)
    with pytest.raises(StreamKWSError, match="none of the model's validation speakers.*"
                                             "--split-seed"):
        P.load_prune_data(tiny_bundle, P.PruneConfig(data=train_side), None)
    d = P.load_prune_data(tiny_bundle, P.PruneConfig(data=train_side, split_seed=1), None)
    assert d.summary["validation_clips"] > 0 and d.summary["split"].endswith("(split seed 1)")


def test_the_command_lines_defaults_are_the_configs_so_a_changed_one_is_noticed():
    """config_from_args refuses an option of the other method when it differs from
    PruneConfig's default: the two sets of defaults must be one."""
    import argparse

    p = argparse.ArgumentParser()
    P.add_arguments(p)
    for names in P._ONLY_FOR.values():
        for name in names:
            assert p.get_default(name) == getattr(P.PruneConfig(), name), name
