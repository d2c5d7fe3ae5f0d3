"""Simulated dynamic fixed point: the number format, the bit-width sweep, solutions on disk,
evaluation with a solution, and quantization-aware fine-tuning, on the tiny trained model."""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch

from streamkws.bundle import Bundle, load_bundle
from streamkws.errors import StreamKWSError
from streamkws.tools.sweep import (
    GROUPS,
    FixedPointModel,
    add_sweep_arguments,
    apply_solution,
    attach_fixed_point,
    evaluate_with_solution,
    fractional_length,
    load_solution,
    qat_finetune,
    quantize_tensor,
    run_sweep,
    save_solution,
    to_fixed_point,
)

BITS = [16, 8, 4, 2]


@pytest.fixture(autouse=True)
def _one_thread():
    # The suite shares two cores with model trainings.
    torch.set_num_threads(1)


def _x(seed: int = 0, n: int = 4) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 98, 40))
                            .astype(np.float32) - 5)


# -- the number format ----------------------------------------------------------------------


def test_hand_example_rounds_to_the_expected_grid():
    x = torch.tensor([0.3, -0.7, 1.2, 0.05])
    # max 1.2 -> ceil(log2 1.2) = 1 integer bit; 4 bits leave 4 - 1 (sign) - 1 = 2 fractional
    assert fractional_length(1.2, 4) == 2
    q, fl = quantize_tensor(x, 4)
    assert fl == 2
    assert q.tolist() == [0.25, -0.75, 1.25, 0.0]


def test_range_saturates_and_small_tensors_get_fractional_bits():
    assert fractional_length(1.0, 8) == 7
    assert to_fixed_point(torch.tensor([1.0, -1.0, 2.0]), 8, 7).tolist() == [127 / 128, -1.0,
                                                                              127 / 128]
    assert fractional_length(0.01, 8) == 7 + 6  # 0.01 < 2**-6
    assert fractional_length(0.0, 8) == 7
    assert fractional_length(300.0, 8) == -2  # a step of 4
    assert to_fixed_point(torch.tensor([300.0]), 8, -2).item() == 300.0


def test_sixteen_bits_is_near_lossless_and_two_bits_has_four_values():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=1000).astype(np.float32))
    q16, fl16 = quantize_tensor(x, 16)
    assert (q16 - x).abs().max() <= 2.0 ** -(fl16 + 1) + 1e-9
    assert (q16 - x).abs().max() < 1e-3 * x.abs().max()
    q2, _ = quantize_tensor(x, 2)
    assert len(torch.unique(q2)) <= 4


def test_with_no_group_rounded_the_simulation_is_the_float_model(tiny_bundle):
    before = {k: v.clone() for k, v in tiny_bundle.model.state_dict().items()}
    sim = FixedPointModel(tiny_bundle.model).eval()
    x = _x()
    with torch.no_grad():
        assert torch.allclose(sim(x), tiny_bundle.model(x), atol=1e-4)
    # The bundle's own modules were not swapped or changed.
    assert type(tiny_bundle.model.net.stem[1]).__name__ == "BatchNorm2d"
    assert all(torch.equal(v, tiny_bundle.model.state_dict()[k]) for k, v in before.items())


def test_two_bit_everything_leaves_at_most_four_values_per_tensor(tiny_bundle):
    sim = FixedPointModel(tiny_bundle.model).eval()
    x = _x()
    sim.calibrate([x])
    sim.set_bits(2, 2, 2, sim.activation_fractional_lengths(2))
    seen: dict[str, torch.Tensor] = {}
    for name in sim.activation_points[1:]:
        module = dict(sim.sim.named_modules())[name]
        module.register_forward_hook(lambda m, a, out, n=name: seen.__setitem__(n, out))
    with torch.no_grad():
        sim(x)
    assert seen and all(len(torch.unique(t)) <= 4 for t in seen.values())
    for layer in sim.weight_layers.values():
        w, _ = layer.folded()
        assert len(torch.unique(quantize_tensor(w.detach(), 2)[0])) <= 4


# -- the sweep, through the command's own argument handling ---------------------------------


@pytest.fixture(scope="module")
def swept(tiny_bundle, small_data, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sweep") / "solution.yaml"
    p = argparse.ArgumentParser()
    add_sweep_arguments(p)
    args = p.parse_args(["--model", str(tiny_bundle.path), "--data", str(small_data),
                         "--bits", "16,8,4,2", "--margin", "0.05", "--json",
                         "--out-solution", str(out)])
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = run_sweep(args)
    return rc, json.loads(buf.getvalue()), out


def test_no_solution_is_exit_1_with_the_reason_on_stderr(tiny_bundle, small_data, tmp_path,
                                                         capsys, monkeypatch):
    # The tiny test network is near chance at any width, so the sweep's answer is faked.
    import streamkws.tools.sweep as sw

    monkeypatch.setattr(sw, "sweep", lambda *a, **k: {"solution": None, "margin": 0.0})
    out = tmp_path / "solution.yaml"
    p = argparse.ArgumentParser()
    add_sweep_arguments(p)
    args = p.parse_args(["--model", str(tiny_bundle.path), "--data", str(small_data),
                         "--bits", "2", "--margin", "0", "--json", "--out-solution", str(out)])
    assert run_sweep(args) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["solution"] is None
    assert captured.err.strip().splitlines()[-1] == (
        "streamkws quantize: no combination of --bits is within --margin 0 of float "
        f"accuracy; nothing written to {out} (a larger --margin, or wider --bits)")
    assert not out.exists()


def test_the_table_has_every_group_at_every_width(swept):
    rc, r, _ = swept
    assert rc == 0
    assert set(r["table"]) == set(GROUPS)
    for group in GROUPS:
        assert sorted(int(b) for b in r["table"][group]) == sorted(BITS)
        # 16 bits changes at most one of the 96 clips.
        assert abs(r["table"][group]["16"] - r["float_accuracy"]) <= 1 / 96 + 1e-4
    assert r["n"] == 96


def test_the_solution_is_the_cheapest_within_the_margin(swept):
    _, r, _ = swept
    sol = r["solution"]
    assert sol["accuracy"] >= sol["float_accuracy"] - 0.05 - 1e-4
    assert r["tried"][-1]["within"] and not any(t["within"] for t in r["tried"][:-1])
    costs = [t["cost_bits"] for t in r["tried"]]
    assert costs == sorted(costs) and sol["cost_bits"] == costs[-1]
    fl = sol["fractional_lengths"]
    assert "input" in fl["activations"] and "net.head.3.weight" in fl["weights"]


def test_solution_yaml_round_trips(swept, tmp_path):
    _, r, written = swept
    assert load_solution(written) == r["solution"]
    again = save_solution(r["solution"], tmp_path / "again.yaml")
    assert load_solution(again) == r["solution"]


def test_evaluating_with_the_solution_reproduces_the_sweep(swept, tiny_bundle, small_data):
    _, r, written = swept
    sol = load_solution(written)
    m = evaluate_with_solution(tiny_bundle, small_data, sol)
    assert m["accuracy"] == sol["accuracy"] and m["quantization"] == "fixed-point"
    assert m["n"] == 96 and np.trace(np.array(m["confusion"])) / 96 == pytest.approx(
        m["accuracy"], abs=1e-4)
    # Every table cell too (the tiny model is weak, so most cells tie with float; the
    # ones that do not are what this checks). One more bit of width is one more
    # fractional bit, so other widths' activation fractional lengths follow from the
    # solution's.
    acts = sol["fractional_lengths"]["activations"]
    for group in GROUPS:
        for bits in BITS:
            cell = {f"{g}_bits": bits if g == group else None for g in GROUPS}
            if group == "act":
                cell["fractional_lengths"] = {"activations": {
                    k: v + bits - sol["act_bits"] for k, v in acts.items()}}
            got = evaluate_with_solution(tiny_bundle, small_data, cell)["accuracy"]
            assert got == r["table"][group][str(bits)], (group, bits)


def test_bad_solutions_and_quantized_bundles_are_refused(tiny_bundle, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("conv_bits: 1\nfc_bits: 8\nact_bits: 8\n")
    with pytest.raises(StreamKWSError, match="conv bits"):
        load_solution(bad)
    bad.write_text("conv_bits: 8\nfc_bits: 8\nact_bits: 8\n")
    with pytest.raises(StreamKWSError, match="activation fractional lengths"):
        load_solution(bad)
    wrong = {"conv_bits": 8, "fc_bits": 8, "act_bits": 8,
             "fractional_lengths": {"activations": {"input": 4}}}
    with pytest.raises(StreamKWSError, match="another"):
        apply_solution(tiny_bundle, wrong)
    dynamic = Bundle(tiny_bundle.model, {**tiny_bundle.meta, "quantization": {"mode": "dynamic"}})
    with pytest.raises(StreamKWSError, match="float"):
        apply_solution(dynamic, {"conv_bits": 8, "fc_bits": 8, "act_bits": None})
    args = argparse.Namespace(model=str(tiny_bundle.path), data=None)
    with pytest.raises(StreamKWSError, match="--data"):
        run_sweep(args)


def test_sweep_options_leave_existing_ones_alone():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--json", action="store_true")
    add_sweep_arguments(p)
    args = p.parse_args(["--bits", "8,4"])
    assert args.model == "default" and args.bits == [8, 4] and args.margin == 0.01
    with pytest.raises(SystemExit):
        p.parse_args(["--bits", "8,1"])


# -- quantization-aware fine-tuning ---------------------------------------------------------


def test_gradients_pass_the_rounding_only_with_the_straight_through_estimator(tiny_bundle,
                                                                             swept):
    sol = swept[1]["solution"]
    sol = {**sol, "conv_bits": 4, "fc_bits": 4, "act_bits": 4, "fractional_lengths": {
        "activations": {k: v + 4 - sol["act_bits"]
                        for k, v in sol["fractional_lengths"]["activations"].items()}}}
    for ste in (True, False):
        model = copy.deepcopy(tiny_bundle.model)
        sim = attach_fixed_point(model, sol, ste=ste).train()
        sim(_x(1, 8)).logsumexp(-1).sum().backward()
        conv, lin = model.net.stem[0].weight.grad, model.net.head[3].weight.grad
        if ste:
            assert conv.abs().sum() > 0 and lin.abs().sum() > 0
            assert model.net.stem[1].weight.grad.abs().sum() > 0  # BN, through the fold
        else:  # rounding has zero gradient: plain fixed-point training cannot learn
            assert conv is None or conv.abs().sum() == 0
            assert lin is None or lin.abs().sum() == 0


def test_qat_for_one_epoch_saves_a_bundle_carrying_the_solution(tiny_bundle, small_data,
                                                                swept, tmp_path, capsys):
    from streamkws.tools.train import TrainConfig

    sol = swept[1]["solution"]
    before = {k: v.clone() for k, v in tiny_bundle.model.state_dict().items()}
    cfg = TrainConfig(data=[small_data], out=tmp_path / "unused.skw", batch_size=32,
                      val_fraction=0.3, seed=1, progress=False, threads=1, name="tiny-qat")
    out = tmp_path / "qat.skw"
    b = qat_finetune(tiny_bundle, sol, [small_data], epochs=1, out=out, lr=1e-3, config=cfg)
    assert all(torch.equal(v, tiny_bundle.model.state_dict()[k]) for k, v in before.items())
    loaded = load_bundle(out)
    fp = loaded.meta["fixed_point"]
    assert (fp["conv_bits"], fp["fc_bits"], fp["act_bits"]) == (
        sol["conv_bits"], sol["fc_bits"], sol["act_bits"])
    assert fp["fractional_lengths"]["activations"] == sol["fractional_lengths"]["activations"]
    ft = loaded.meta["fine_tuning"]
    assert ft["epochs_run"] == 1 and len(ft["history"]) == 2
    assert ft["init_sha256"] == tiny_bundle.sha256 and loaded.quantization == "none"
    # Best-of including the start: fine-tuning never lowers fixed-point validation accuracy.
    assert fp["accuracy"] == pytest.approx(
        max(h["val_accuracy_fixed_point"] for h in ft["history"]), abs=1e-4)
    assert loaded.meta["name"] == "tiny-qat"
    assert np.allclose(loaded.predict(_x().numpy()), b.predict(_x().numpy()), atol=1e-6)
    # The command line reports it with the keys a plain training run uses.
    from streamkws.cli import main
    from streamkws.tools.sweep import save_solution

    save_solution(sol, tmp_path / "sol.yaml")
    capsys.readouterr()
    assert main(["train", "--data", str(small_data), "--init", str(tiny_bundle.path),
                 "--quant-solution", str(tmp_path / "sol.yaml"), "--epochs", "1",
                 "--batch-size", "32", "--val-fraction", "0.3", "--threads", "1", "--quiet",
                 "--out", str(tmp_path / "cli-qat.skw")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"model", "sha256", "arch", "parameters", "validation"} <= set(report)
    assert report["validation_fixed_point"]["accuracy"] == pytest.approx(
        load_bundle(tmp_path / "cli-qat.skw").meta["fixed_point"]["accuracy"], abs=1e-4)
    # evaluate picks the solution up from the bundle itself.
    m = evaluate_with_solution(loaded, small_data)
    assert m["fixed_point"]["act_bits"] == sol["act_bits"] and m["n"] == 96
