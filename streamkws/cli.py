"""The ``streamkws`` command: one entry point, one subcommand per job.

User mistakes (a bad path, config key, unreadable audio) end as one line on stderr and a
non-zero exit; only bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from streamkws import __version__, logs
from streamkws.errors import (
    EXIT_USER_ERROR,
    ArgumentParser,
    StreamKWSError,
    no_folder,
    os_error_message,
)
from streamkws.signals import StopFlag

log = logging.getLogger("streamkws")

_EARLY_STOP = StopFlag()
"""Set by SIGTERM/SIGINT before the daemon has installed its own handlers."""


def cmd_run(args: argparse.Namespace) -> int:
    from streamkws.config import find_config_file, load_default

    # Before importing the daemon (torch: a second or more on a small board): a service
    # whose config is wrong fails at once, and a restart loop costs little.
    base = load_default(args.config)
    from streamkws.daemon import Daemon, Overrides, apply_overrides, check

    if args.wait_subscribers < 0:
        raise StreamKWSError(f"--wait-subscribers must be 0 or more (got {args.wait_subscribers})")
    if not 0 <= args.wait_timeout <= 86400:  # NaN fails this too
        raise StreamKWSError(f"--wait-timeout must be 0-86400 seconds (got {args.wait_timeout})")
    overrides = Overrides(source=args.source, model=args.model, publish=args.publish,
                          realtime=args.realtime)
    cfg = apply_overrides(base, overrides)
    if args.check:
        found = find_config_file(args.config)
        print(f"{found or 'built-in defaults'}: OK: {check(cfg, overrides)}")
        return 0
    daemon = Daemon(cfg, config_path=args.config, overrides=overrides,
                    echo=None if args.quiet else sys.stdout,
                    wait_subscribers=args.wait_subscribers, wait_timeout=args.wait_timeout,
                    stop_requested=_EARLY_STOP)
    return daemon.run()


def cmd_listen(args: argparse.Namespace) -> int:
    from streamkws.listen import run_listen

    return run_listen(args)


def cmd_devices(args: argparse.Namespace) -> int:
    from streamkws.audio.mic import list_input_devices

    devices = list_input_devices()
    if args.json:  # one object, as every --json (the contract): the list under a key
        print(json.dumps({"devices": [d.__dict__ for d in devices]}))
        return 0
    if not devices:
        print("no audio input devices found (PortAudio sees none: check that a sound card, "
              "USB microphone or PulseAudio/PipeWire source is present)")
        return 0
    print(f"{'index':>5}  {'name':<40} {'channels':>8} {'default rate':>12}  host API")
    for d in devices:
        mark = "*" if d.is_default else " "
        print(f"{d.index:>4}{mark}  {d.name[:40]:<40} {d.channels:>8} "
              f"{d.default_samplerate:>12.0f}  {d.hostapi}")
    print("(* = default input; pick one with --source mic:<index or name substring>)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from streamkws.tools.outputs import check_output
    from streamkws.tools.train import config_from_args, describe, train

    cfg = config_from_args(args)
    check_output(cfg.out, inputs=(args.init, cfg.teacher, cfg.backbone))
    cfg.check_backbone()
    for d in cfg.data + cfg.extra:
        if not d.is_dir():
            raise no_folder(d)
    if args.init or args.quant_solution:
        if not (args.init and args.quant_solution):
            raise StreamKWSError("--init and --quant-solution go together "
                                 "(quantization-aware fine-tuning of an existing bundle)")
        for flag, given in (("--teacher", cfg.teacher), ("--ema", cfg.ema),
                            ("--backbone", cfg.backbone), ("--keywords", args.keywords)):
            if given:
                raise StreamKWSError(f"{flag} applies to training, not to --init fine-tuning")
        from streamkws.bundle import load_bundle
        from streamkws.tools.sweep import load_solution, qat_finetune

        # Fine-tuning starts from trained weights: a tenth of the from-scratch rate.
        lr = args.lr if args.lr is not None else 3e-4
        bundle = qat_finetune(load_bundle(args.init), load_solution(args.quant_solution),
                              cfg.data, cfg.epochs, out=cfg.out, lr=lr, config=cfg)
        # The keys of a plain run's report where they mean the same, then what is QAT's own.
        metrics = bundle.meta.get("metrics", {})
        print(json.dumps({"model": str(cfg.out), "sha256": bundle.sha256,
                          "arch": bundle.meta["arch"], "parameters": bundle.meta["parameters"],
                          "validation": metrics.get("validation"),
                          "validation_fixed_point": metrics.get("validation_fixed_point"),
                          "epochs_run": bundle.meta.get("fine_tuning", {}).get("epochs_run")}))
        return 0
    bundle = train(cfg)
    print(json.dumps(describe(bundle)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from streamkws.bundle import load_bundle
    from streamkws.tools.evaluate import evaluate, format_report, plot_confusion
    from streamkws.tools.outputs import PICTURES, check_output

    bundle = load_bundle(args.model)
    if args.plot:
        check_output(args.plot, "--plot", suffixes=PICTURES)
    if args.quant_solution or bundle.meta.get("fixed_point"):
        from streamkws.tools.sweep import evaluate_with_solution, load_solution

        solution = load_solution(args.quant_solution) if args.quant_solution else None
        m = evaluate_with_solution(bundle, args.data, solution, progress=not args.json)
    else:
        m = evaluate(bundle, args.data, progress=not args.json)
    if args.plot:
        plot_confusion(m, args.plot)
    if args.json:
        print(json.dumps(m))
    else:
        print(format_report(m))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from streamkws.bundle import load_bundle
    from streamkws.tools.outputs import check_output
    from streamkws.tools.predict import expand_paths, plot_prediction, predict_files

    bundle = load_bundle(args.model)
    if args.plot:
        plots = Path(args.plot)
        if plots.exists() and not plots.is_dir():
            raise StreamKWSError(f"--plot {plots}: not a folder")
        check_output(plots / "x.png", "--plot")
    preds, errors = predict_files(bundle, expand_paths(args.files))
    # Speech Commands repeats file names across label folders: those get the folder too.
    stems = Counter(Path(p.path).stem for p in preds)
    for p in preds:
        if args.plot:
            path = Path(p.path)
            name = path.stem if stems[path.stem] == 1 else f"{path.parent.name}_{path.stem}"
            plot_prediction(bundle, p, Path(args.plot) / f"{name}.png")
        if not args.json:
            print(f"{p.path}\t{p.label}\t{p.confidence:.3f}")
    if args.json:
        print(json.dumps({"model": bundle.name, "model_sha256": bundle.sha256,
                          "predictions": [p.__dict__ for p in preds], "errors": errors}))
    for e in errors:
        print(f"streamkws predict: error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR if errors else 0


def cmd_audit_data(args: argparse.Namespace) -> int:
    from streamkws.bundle import load_bundle
    from streamkws.tools.predict import audit

    report = audit(load_bundle(args.model), args.data, args.top)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['clips']} clips, the model disagrees with {report['disagreements']}; "
          f"the {len(report['suspects'])} most suspect, worst first:")
    for r in report["suspects"]:
        print(f"{r['loss']:7.2f}  {r['label']:>10} -> {r['predicted']:<10} {r['path']}"
              f"  ({r['why']})")
    for u in report["unreadable"]:
        print(f"unreadable: {u}")
    return 0


TOOLS = {
    "quantize": ("streamkws.tools.quantize",
                 "post-training quantization (dynamic, static, mixed, fp16) or --sweep"),
    "prune": ("streamkws.tools.prune", "fine- or coarse-grained pruning of a bundle"),
    "profile": ("streamkws.tools.profile", "parameters, MACs, sizes, latency; --compare"),
    "ensemble": ("streamkws.tools.ensemble",
                 "several trained float bundles as one model (mean of their posteriors)"),
    "export": ("streamkws.tools.export", "TorchScript or ONNX file, checked against the bundle"),
    "stream-eval": ("streamkws.tools.stream_eval",
                    "recall, false alarms/hour, latency on a long recording; --build, "
                    "calibration"),
    "bench": ("streamkws.tools.bench",
              "CPU per audio second, peak RSS, inference latency of the whole daemon; "
              "openWakeWord beside it when installed"),
}


def _setup_tool(p: argparse.ArgumentParser, module) -> None:
    module.add_arguments(p)
    p.set_defaults(func=module.run)


def _setup_quantize(p: argparse.ArgumentParser, module) -> None:
    from streamkws.tools import sweep

    module.add_arguments(p)
    sweep.add_sweep_arguments(p)
    p.add_argument("--sweep", action="store_true",
                   help="simulated fixed-point bit-width sweep instead of quantizing")
    for action in p._actions:
        if action.dest == "out":
            action.required = False  # a sweep writes a YAML solution, not a bundle

    def run(args: argparse.Namespace) -> int:
        if args.sweep:
            # The sweep simulates fixed point itself: quantizer options would do nothing.
            given = _given(p, args, ("mode", "calibration", "engine", "dynamic", "static",
                                     "skip", "out"))
            if given:
                raise StreamKWSError(f"{', '.join(given)} do(es) not apply to --sweep, which "
                                     "writes a solution (--out-solution), not a bundle")
            if args.calib_clips < 1:
                raise StreamKWSError(f"--calib-clips must be 1 or more (got {args.calib_clips})")
            return sweep.run_sweep(args)
        given = _given(p, args, ("out_solution", "bits", "margin", "calib_clips"))
        if given:
            raise StreamKWSError(f"{', '.join(given)} go(es) with --sweep (the bit-width "
                                 "sweep); quantizing does not use it")
        if not args.out:
            raise StreamKWSError("--out is required (the quantized bundle to write)")
        return module.run(args)

    p.set_defaults(func=run)


def _given(p: argparse.ArgumentParser, args: argparse.Namespace,
           names: Sequence[str]) -> list[str]:
    """The flags among ``names`` set to something other than their default."""
    return [f"--{name.replace('_', '-')}" for name in names
            if getattr(args, name, None) not in (None, p.get_default(name))]


TOOL_SETUP = {"quantize": _setup_quantize}


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}")
    return n


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    p = ArgumentParser(prog="streamkws", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"streamkws {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging (-v, -vv); run already logs its lifecycle (info)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser("run", help="the daemon: listen, detect, publish")
    r.add_argument("--config", metavar="F",
                   help="TOML config (default: $STREAMKWS_CONFIG, /etc/streamkws/streamkws.toml)")
    r.add_argument("--source", metavar="S",
                   help="mic, mic:<index or name>, wav:<path>, - (s16le on stdin), demo "
                        "(default: the config's audio.source, built in: mic)")
    r.add_argument("--model", metavar="M",
                   help="bundle path, or default / default-float / accurate (default: the "
                        "config's model.name, built in: default)")
    r.add_argument("--publish", metavar="EP",
                   help="ZeroMQ endpoint to bind, tcp:// or ipc:// (default: the config's "
                        "publish.endpoint, built in: tcp://127.0.0.1:5556)")
    pace = r.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=None,
                      help="pace file sources like a microphone")
    pace.add_argument("--fast", dest="realtime", action="store_false",
                      help="replay files as fast as the CPU allows (audio-time stamps)")
    r.add_argument("--quiet", action="store_true", help="do not print detections")
    r.add_argument("--check", action="store_true",
                   help="check the config, model, source and keys, say what would run, and "
                        "exit (0 if all is well) without listening: before a reload")
    r.add_argument("--wait-subscribers", type=int, default=0, metavar="N",
                   help="start the audio only once N subscribers are connected (replays)")
    r.add_argument("--wait-timeout", type=float, default=30.0, metavar="S",
                   help="give up waiting for subscribers after S seconds (default 30)")
    r.set_defaults(func=cmd_run)

    ls = sub.add_parser("listen", help="subscribe and print each message as a JSON line")
    from streamkws.listen import add_listen_arguments

    add_listen_arguments(ls)
    ls.set_defaults(func=cmd_listen)

    # The optimisation tools import heavy modules; only the one being run is loaded, so
    # `streamkws listen` or `devices` start at once.
    requested = next((a for a in argv or sys.argv[1:] if not a.startswith("-")), None)
    for name, (module, help_text) in TOOLS.items():
        tp = sub.add_parser(name, help=help_text)
        if name == requested:
            TOOL_SETUP.get(name, _setup_tool)(tp, importlib.import_module(module))

    d = sub.add_parser("devices", help="list audio input devices")
    d.add_argument("--json", action="store_true",
                   help='one JSON object on stdout: {"devices": [...]}')
    d.set_defaults(func=cmd_devices)

    t = sub.add_parser("train", help="train a model bundle on labelled clips")
    t.add_argument("--data", action="append", required=True, metavar="DIR",
                   help="labelled folders or a Speech Commands download (repeatable)")
    t.add_argument("--keywords", metavar="W,W,...",
                   help="the words to spot (default: yes,no,up,down,left,right,on,off,stop,"
                        "go); folders and Speech Commands files of other words train "
                        "_unknown_")
    t.add_argument("--extra", action="append", metavar="DIR",
                   help="training-only data, e.g. synthetic speech (repeatable)")
    t.add_argument("--noise", metavar="DIR", help="background noise recordings for mixing")
    t.add_argument("--arch", default="dscnn",
                   help="dscnn (default), mobilenetv2 (the shipped default's), bcresnet "
                        "(bcresnet1-3: its widths), tutorial_cnn, or speech_embedding (with "
                        "--backbone)")
    t.add_argument("--arch-arg", action="append", metavar="NAME=VALUE",
                   help="architecture option, e.g. scale=2 (repeatable)")
    t.add_argument("--epochs", type=int, default=40, help="at most this many (default 40)")
    t.add_argument("--batch-size", type=int, default=128, help="(default 128)")
    t.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 3e-3; 3e-4 with --init)")
    t.add_argument("--init", metavar="M", help="start from this bundle (with --quant-solution)")
    t.add_argument("--quant-solution", metavar="S",
                   help="fixed-point solution (YAML from quantize --sweep): quantization-aware "
                        "fine-tuning, forward in fixed point, backward in float")
    t.add_argument("--patience", type=int, default=10,
                   help="early stopping patience in epochs (default 10)")
    t.add_argument("--val-fraction", type=float, default=0.15,
                   help="share of speakers held out for validation (default 0.15)")
    t.add_argument("--seed", type=int, default=0,
                   help="initialisation, batch order and augmentation: makes a run "
                        "repeatable (default 0)")
    t.add_argument("--split-seed", type=int, default=0, metavar="N",
                   help="which speakers are held out for validation (default 0, the split "
                        "`stream-eval --speakers heldout` builds from); --seed leaves it alone")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    t.add_argument("--max-minutes", type=float,
                   help="stop after this much training time (default: no limit)")
    t.add_argument("--no-augment", action="store_true",
                   help="train on the clips as they are: no shift, speed, gain, noise, masks")
    t.add_argument("--unknown-share", type=float, metavar="F",
                   help="share of each epoch drawn from _unknown_ (default: equal to others)")
    t.add_argument("--shift-ms", type=float, default=150.0, metavar="MS",
                   help="random time shift of up to MS either way (default 150); larger "
                        "shifts teach the word off-centre, as streaming windows see it")
    t.add_argument("--reverse-as-unknown", type=float, default=0.0, metavar="P",
                   help="play this share of keyword examples backwards as _unknown_")
    t.add_argument("--warp", type=float, default=0.0, metavar="R",
                   help="vocal-tract length augmentation: scale each example's frequency "
                        "axis by a factor within 1 +- R (e.g. 0.1; default 0, off)")
    t.add_argument("--teacher", metavar="M",
                   help="distil from this bundle (an ensemble, say) trained on the same "
                        "--data and --split-seed: targets mix labels and its posteriors")
    t.add_argument("--distill-weight", type=float, default=0.5, metavar="W",
                   help="with --teacher, the teacher's share of each target (default 0.5)")
    t.add_argument("--ema", type=float, metavar="DECAY",
                   help="validate and keep an exponential moving average of the weights "
                        "(e.g. 0.999) instead of the weights themselves")
    t.add_argument("--backbone", metavar="FILE",
                   help="with --arch speech_embedding: the pretrained embedding's weights "
                        "(openWakeWord's embedding_model.onnx, or a speech_embedding bundle)")
    t.add_argument("--passes", type=int, default=12, metavar="N",
                   help="with --backbone: augmented passes over the training clips embedded "
                        "once for the head to learn from (default 12)")
    t.add_argument("--unfreeze", type=int, default=0, metavar="N",
                   help="with --backbone: also train the embedding's last N convolutions "
                        "(0..9, at a tenth of the learning rate; default 0, head only)")
    t.add_argument("--name", help="model name recorded in the bundle (default: file stem)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--out", required=True, metavar="M", help="bundle file to write")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="accuracy, per-class recall, confusion matrix")
    e.add_argument("--model", default="default", metavar="M",
                   help="bundle path or name (default: default)")
    e.add_argument("--data", required=True, metavar="DIR",
                   help="labelled clips, DIR/<label>/*.wav or a Speech Commands download "
                        "(its testing list)")
    e.add_argument("--json", action="store_true", help="one JSON object on stdout")
    e.add_argument("--plot", metavar="PNG", help="write the confusion matrix as a picture")
    e.add_argument("--quant-solution", metavar="S",
                   help="evaluate in simulated fixed point (YAML from quantize --sweep)")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="label and confidence per audio file")
    pr.add_argument("files", nargs="+", metavar="FILE|DIR")
    pr.add_argument("--model", default="default", metavar="M",
                    help="bundle path or name (default: default)")
    pr.add_argument("--json", action="store_true",
                    help='one JSON object on stdout: {"predictions": [...], "errors": [...]}')
    pr.add_argument("--plot", metavar="DIR", help="write each file's log-Mel picture here")
    pr.set_defaults(func=cmd_predict)

    a = sub.add_parser("audit-data", help="list the clips most likely mislabelled or broken")
    a.add_argument("--model", default="default", metavar="M",
                   help="bundle path or name (default: default)")
    a.add_argument("--data", required=True, type=Path, metavar="DIR",
                   help="labelled clips, DIR/<label>/*.wav")
    a.add_argument("--top", type=_positive, default=30, metavar="N",
                   help="how many clips to list (default 30)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_audit_data)
    # `-v` is the top level's, but it is natural to append it (`streamkws run ... -v`, as in
    # a unit's ExecStart=), where refusing it would leave a service failed for a log level.
    for command in sub.choices.values():
        command.add_argument("-v", "--verbose", dest="verbose_after", action="count",
                             default=0, help="more logging (-v, -vv), as before the command")
    return p


def main(argv: Sequence[str] | None = None, *, leave_at_once: bool = False) -> int:
    """Run one subcommand and return its exit status.

    ``leave_at_once`` (the installed command) ends the process as soon as ``run`` returns;
    see :func:`entry`. In-process callers (tests, embedding programs) leave it off.
    """
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    # The daemon's info lines are its lifecycle (start, device, reload, stop): what a
    # service's journal should hold; listen's, its publisher's (stopped, back). The offline
    # tools speak only when something is wrong.
    base = logging.INFO if args.command in ("run", "listen") else logging.WARNING
    logs.configure(max(logging.DEBUG, base - 10 * (args.verbose + args.verbose_after)))
    func: Callable[[argparse.Namespace], int] = args.func
    previous = {}
    if args.command == "run" and threading.current_thread() is threading.main_thread():
        # Until the daemon takes the signals over (importing torch takes a while): a reload
        # request (`systemctl reload` during start-up) must not kill it, the config it is
        # about to read being the newest anyway; a stop request is remembered, so that it
        # still ends with a final status.
        _EARLY_STOP.clear()
        previous = {sig: signal.getsignal(sig)
                    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: _EARLY_STOP.set())
    try:
        rc = func(args)
    except StreamKWSError as exc:
        print(logs.error_line(f"streamkws {args.command}: error: {exc}"), file=sys.stderr)
        rc = getattr(exc, "exit_status", EXIT_USER_ERROR)
    except KeyboardInterrupt:
        rc = 130
    except BrokenPipeError:  # e.g. `streamkws listen | head`
        rc = 0
    except OSError as exc:  # after BrokenPipeError, one of them
        print(logs.error_line(f"streamkws {args.command}: error: {os_error_message(exc)}"),
              file=sys.stderr)
        rc = EXIT_USER_ERROR
    finally:
        for sig, handler in previous.items():  # an in-process caller gets its own back
            signal.signal(sig, handler)
    if leave_at_once and args.command == "run":
        _leave(rc)
    return rc


def _leave(rc: int) -> NoReturn:
    """Exit without tearing the interpreter down.

    When ``run`` returns, the daemon has already published its final status and closed
    the device and the socket. What is left is the interpreter's own teardown with torch
    loaded: about 0.5 s of CPU on a desktop core, several times that on a small or busy
    board. That alone could push a SIGTERM stop past its 2 s budget and towards systemd's
    stop timeout, and it would also wait on any stray non-daemon thread. Logging and stdio
    are all that still needs flushing.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(rc)


def entry() -> NoReturn:
    """The installed ``streamkws`` command and ``python -m streamkws``."""
    try:
        rc = main(leave_at_once=True)
    except KeyboardInterrupt:  # Ctrl-C in the first moments, while the parser imports
        rc = 130
    raise SystemExit(rc)


if __name__ == "__main__":
    entry()
